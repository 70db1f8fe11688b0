"""Per-block quantization sensitivity (paper Eq. 6), computed locally.

Δ[layer, expert, block, scheme] = ‖Ô − O‖_F of one MoE block's output over the calibration
tokens when only that linear block of that expert is quantized, every layer fed full-precision
inputs. Only the tokens routed to the expert change, so

    Δ = ‖ g ⊙ (expert_q(x) − expert(x)) ‖_F   over the expert's tokens x, gate values g,

and no layer is ever rerun per block. Shared experts are blocks too (every token, g = 1 or
Qwen2-MoE's sigmoid gate). Methods: ``rtn``; ``gptq`` (Hessian from the expert's own tokens —
for down_proj its full-precision intermediate activations); ``gptq-had`` (the residual stream
rotated by a seeded random Hadamard with ``rotate_model`` and the down_proj input rotated online,
then GPTQ). Activations are fake-quantized per the scheme in all methods.

An expert that receives no calibration token has no measured Δ: it is stored as ``null`` and
listed under ``no_tokens`` (``sensitivity_array`` fills it, see there). A GPTQ block with too few
tokens falls back to RTN and is listed under ``rtn_fallbacks``. ``compute_sensitivity`` rewrites its
file (``mxmoe.stages.sensitivity`` names it per model, method, scheme set and calibration)
atomically after each layer, so a killed run resumes at the first missing layer.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mxmoe.env import device_name
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.models.blocks import BLOCKS, MoEBlock, moe_blocks
from mxmoe.models.placement import is_multi_device, model_devices
from mxmoe.quant.apply import block_weight, check_scheme
from mxmoe.quant.experts import expert_weights, hessian_of, quantize_blocks, split_by_expert
from mxmoe.quant.hadamard import Rotation, apply_online_hadamard, rotate_model
from mxmoe.quant.layerwise import LayerwiseRunner
from mxmoe.quant.rtn import quantize_activation

METHODS = ("rtn", "gptq", "gptq-had")
log = logging.getLogger(__name__)


class RoutedOtherwise(MxMoEError):
    """The calibration windows reached other experts or tokens per expert in a layer than ``compute_sensitivity``
    was told to expect."""


def _expert_context(block: MoEBlock, tokens, method: str, rotate_down: bool) -> dict:
    """One expert's tokens, weights, full-precision activations and output, and its Hessians (none for rtn)."""
    x, g = tokens.x, tokens.g  # [T, H], [T, 1]
    w = expert_weights(block, tokens.expert, rotate_down)
    pre = {"gate": x @ w["gate"].T, "up": x @ w["up"].T}  # [T, I] each, full precision
    h = F.silu(pre["gate"]) * pre["up"]
    h_in = apply_online_hadamard(h) if rotate_down else h  # [T, I] what down_proj reads
    ref = h_in @ w["down"].T  # [T, H]
    hessians = {}
    if method != "rtn":
        hx = hessian_of(x)
        hessians = {"gate": hx, "up": hx, "down": hessian_of(h_in)}
    return {"x": x, "g": g, "w": w, "pre": pre, "h_in": h_in, "ref": ref, "hessians": hessians}


def _delta(c: dict, name: str, s, wq: torch.Tensor, rotate_down: bool) -> float:
    """Δ of one expert (context ``c``) with only block ``name`` quantized: weight ``wq``, activations on ``s``."""
    if name == "down":
        out = quantize_activation(c["h_in"], s) @ wq.T  # [T, H]
    else:  # only this projection changes; the other one and down stay full precision
        p = quantize_activation(c["x"], s) @ wq.T  # [T, I]
        hq = F.silu(p) * c["pre"]["up"] if name == "gate" else F.silu(c["pre"]["gate"]) * p
        out = (apply_online_hadamard(hq) if rotate_down else hq) @ c["w"]["down"].T
    return float(torch.linalg.norm(c["g"] * (out - c["ref"])))


@torch.no_grad()
def group_deltas(
    block: MoEBlock, group: list, schemes, method: str, *, rotate_down: bool = False, min_tokens: int = 16, **gptq_kw
) -> list[tuple[list, list]]:
    """``expert_deltas`` of experts with same-shape weights, quantized in one batch per weight shape.

    Every (expert, block, quantized scheme) whose weight has a given shape (gate and up share one,
    and their Hessian) goes into one mixed-scheme batched GPTQ. ``group``: ``ExpertTokens`` with
    T > 0 each. Returns (Δ [3][S], fallbacks) per expert, in order.
    """
    ctx = [_expert_context(block, t, method, rotate_down) for t in group]
    batches: dict = {}  # weight shape -> [(expert, block, scheme position)]
    for j, name in enumerate(BLOCKS):
        for si, s in enumerate(schemes):
            if not s.is_full_precision:
                for e, c in enumerate(ctx):
                    batches.setdefault(tuple(c["w"][name].shape), []).append((e, j, si))
    quantized = {}  # (expert, block, scheme position) -> QuantizedBlock
    for batch in batches.values():
        w = torch.stack([ctx[e]["w"][BLOCKS[j]] for e, j, _ in batch])  # [B, out, in]
        hessians = [ctx[e]["hessians"].get(BLOCKS[j]) for e, j, _ in batch]  # shared per expert: deduped in GPTQ
        quantized.update(
            zip(batch, quantize_blocks(w, [schemes[si] for _, _, si in batch], hessians, min_tokens, **gptq_kw))
        )
    out = []
    for e, c in enumerate(ctx):
        deltas, fallbacks = [[] for _ in BLOCKS], []
        for j, name in enumerate(BLOCKS):
            for si, s in enumerate(schemes):
                if s.is_full_precision:
                    deltas[j].append(0.0)
                    continue
                q = quantized[e, j, si]
                if q.how == "rtn-fallback":
                    fallbacks.append((name, str(s), q.reason))
                deltas[j].append(_delta(c, name, s, q.weight.dequantize(), rotate_down))
        out.append((deltas, fallbacks))
    return out


def expert_deltas(
    block: MoEBlock, tokens, schemes, method: str, *, rotate_down: bool = False, min_tokens: int = 16, **gptq_kw
) -> tuple[list, list]:
    """Δ [3][S] for one expert's blocks under each scheme, and the RTN fallbacks as (block, scheme, reason).

    ``tokens`` is an ``ExpertTokens`` (x [T, H], gates g [T, 1]); T must be positive.
    """
    return group_deltas(block, [tokens], schemes, method, rotate_down=rotate_down, min_tokens=min_tokens, **gptq_kw)[0]


@torch.no_grad()
def layer_sensitivity(
    block: MoEBlock,
    x: torch.Tensor,
    schemes,
    method: str = "rtn",
    *,
    rotate_down: bool = False,
    min_tokens: int = 16,
    expect_routing: "list | None" = None,
    **gptq_kw,
) -> dict:
    """Δ of every expert block of one MoE layer from its full-precision inputs ``x[N, H]``; a JSON-ready dict.

    Experts with tokens are quantized together per weight shape (routed ones, shared ones), one
    batched GPTQ per weight shape over all blocks of that shape and quantized schemes. Keys: experts (ids), tokens (per expert), delta
    [experts][3][S] (null where an expert got no token), no_tokens (expert ids), rtn_fallbacks
    ([expert, block, scheme, reason]). ``expect_routing``: [experts, tokens per expert] the inputs must reach;
    ``RoutedOtherwise`` before any Δ is measured when they reach others.
    """
    if x.shape[0] == 0:
        raise MxMoEError(f"layer {block.layer}: no calibration tokens reached this MoE block")
    experts = split_by_expert(block, x)
    routed = [[t.expert for t in experts], [int(t.x.shape[0]) for t in experts]]
    if expect_routing is not None and routed != expect_routing:
        raise RoutedOtherwise(
            f"layer {block.layer}: the windows reach other experts or tokens per expert than expected"
        )
    by_shape: dict = {}  # gate weight shape -> indices of the experts with tokens
    for i, tokens in enumerate(experts):
        if tokens.x.shape[0]:
            by_shape.setdefault(tuple(block_weight(block, tokens.expert, "gate").shape), []).append(i)
    measured = {}
    for idx in by_shape.values():
        out = group_deltas(
            block, [experts[i] for i in idx], schemes, method, rotate_down=rotate_down, min_tokens=min_tokens, **gptq_kw
        )
        measured.update(zip(idx, out))
    result = {"experts": routed[0], "tokens": routed[1], "delta": [], "no_tokens": [], "rtn_fallbacks": []}
    for i, tokens in enumerate(experts):
        if i not in measured:
            result["delta"].append([[None] * len(schemes) for _ in BLOCKS])
            result["no_tokens"].append(tokens.expert)
            continue
        deltas, fallbacks = measured[i]
        if not all(math.isfinite(d) for row in deltas for d in row):
            raise FloatingPointError(f"layer {block.layer} expert {tokens.expert}: non-finite Δ {deltas}")
        result["delta"].append(deltas)
        result["rtn_fallbacks"] += [[tokens.expert, *f] for f in fallbacks]
    if result["no_tokens"]:
        warnings.warn(
            f"layer {block.layer}: experts {result['no_tokens']} got no calibration token; "
            "their Δ is null (see sensitivity_array)",
            stacklevel=2,
        )
    if result["rtn_fallbacks"]:
        log.warning(
            "layer %d: %d GPTQ blocks fell back to RTN (too few tokens)", block.layer, len(result["rtn_fallbacks"])
        )
    return result


def check_method_placement(model, method: str, stream_to=None) -> None:
    """MxMoEError when ``method`` cannot measure ``model`` where it is placed: gptq-had rotates a copy of
    the model, which does not fit beside a model spread over several devices or streamed from CPU memory
    (``stream_to``: one larger than the GPU)."""
    if method == "gptq-had" and stream_to is not None:
        raise MxMoEError(
            f"gptq-had sensitivity rotates a copy of the model, and this one is streamed to {stream_to} from CPU "
            "memory because it is larger than the device: a copy would double it. Measure with method 'gptq' "
            "(or 'rtn') there"
        )
    if method == "gptq-had" and is_multi_device(model):
        raise MxMoEError(
            "gptq-had sensitivity rotates a copy of the model, and this model is spread over "
            f"{', '.join(map(str, model_devices(model)))}: a copy does not fit beside it. Measure with "
            "method 'gptq' (or 'rtn') on a model placed over several devices"
        )


def compute_sensitivity(
    model,
    windows: torch.Tensor,
    schemes,
    method: str = "rtn",
    *,
    path=None,
    params: "dict | None" = None,
    seed: int = 0,
    min_tokens: int = 16,
    progress: bool = True,
    stream_to=None,
    layers=None,
    routing: "dict | None" = None,
    **gptq_kw,
) -> dict:
    """Δ for every MoE layer of ``model`` on calibration ``windows`` [n, seqlen]; resumable when ``path`` is given.

    ``schemes``: Scheme objects or strings. ``params`` (model, calibration, ...) go into the file and
    must match a partial file to resume from it. The model is not modified (gptq-had rotates a copy).
    A model spread over several devices (accelerate's device map) is measured layer by layer on the
    device of each layer (``LayerwiseRunner``); gptq-had refuses it: its copy would need the memory of
    a second model on every device, and rotating in place and back would leave bf16 weights changed
    by two roundings (use gptq or rtn there). ``stream_to``: measure a model held in CPU memory on this
    device, one decoder layer at a time (``LayerwiseRunner``; gptq-had refused likewise). ``layers``: measure
    only these MoE layers (default: all); the runner stops after the last of them. ``routing``: {layer key:
    [experts, tokens per expert]} the windows must reach, as in a file this result is to be merged with; the first
    layer that differs raises ``RoutedOtherwise`` before its Δ is measured (the layers before it stay in the file).
    Returns {"params", "schemes", "blocks", "layers": {str(layer): layer_sensitivity(...)}}.
    """
    if method not in METHODS:
        raise MxMoEError(f"unknown sensitivity method {method!r}; use one of {', '.join(METHODS)}")
    check_method_placement(model, method, stream_to)
    schemes = [check_scheme(s) for s in schemes]
    if not schemes:
        raise MxMoEError("no schemes given for the sensitivity measurement")
    params = {
        **(params or {}),
        "method": method,
        "seed": seed,
        "min_tokens": min_tokens,
        "windows": list(windows.shape),
        **gptq_kw,
    }
    result = {"params": params, "schemes": [str(s) for s in schemes], "blocks": list(BLOCKS), "layers": {}}
    rotate = method == "gptq-had"
    if rotate:  # the rotation rotate_model will draw, known before any copy is made
        params["rotation"] = {"seed": seed, "kind": Rotation.kind_for(model.config.hidden_size)}
    if path is not None and path.exists():  # resume: keep the layers of a file made with the same parameters
        old = json.loads(path.read_text())
        if old.get("params") == params and old.get("schemes") == result["schemes"]:
            result["layers"] = old["layers"]
            result["device"] = old.get("device", "unknown")
            if "merged_from" in old:  # made by merge_schemes
                result["merged_from"] = old["merged_from"]
    todo = [
        b.layer
        for b in moe_blocks(model)
        if str(b.layer) not in result["layers"] and (layers is None or b.layer in layers)
    ]
    if not todo:  # a complete file: no copy, no rotation
        return result
    if rotate:
        model = copy.deepcopy(model)
        rotation = rotate_model(model, seed)
        if {"seed": rotation.seed, "kind": rotation.kind} != params["rotation"]:
            raise AssertionError(f"rotation {rotation.kind} seed {rotation.seed} is not the one in params")
    blocks = {b.layer: b for b in moe_blocks(model)}
    runner = LayerwiseRunner(model, windows, stream_to)
    bar = tqdm(total=len(todo), desc=f"sensitivity {method}", unit="layer", disable=not progress)
    try:  # a layer routed otherwise stops the loop: the streamed layer still goes back
        for layer in range(max(todo) + 1):
            if layer not in todo:
                runner.advance()
                continue
            x = runner.advance(capture=blocks[layer].module)  # [N, H] full-precision block inputs
            start = time.time()
            measured = layer_sensitivity(
                blocks[layer],
                x,
                schemes,
                method,
                rotate_down=rotate,
                min_tokens=min_tokens,
                expect_routing=None if routing is None else routing.get(str(layer), []),
                **gptq_kw,
            )
            result["layers"][str(layer)] = {**measured, "seconds": round(time.time() - start, 2)}
            result["device"] = device_name()
            if path is not None:
                write_json_atomic(path, result)
            bar.update(1)
    finally:
        runner.release()
        bar.close()
    return result


def sensitivity_array(result: dict, layer: int, fill: str = "max") -> tuple[np.ndarray, list]:
    """Δ of one layer as float array [experts, 3, S] (routed then shared) and the expert ids.

    Experts without calibration tokens (null Δ) are filled per block and scheme with the layer's
    ``fill`` ('max', conservative: never chosen for low bits by accident; or 'mean') over the
    measured experts; 'nan' keeps NaN for callers that handle it.
    """
    key = str(layer)
    if key not in result["layers"]:
        raise MxMoEError(
            f"layer {layer} is not in the sensitivity result; layers: {sorted(map(int, result['layers']))}"
        )
    lay = result["layers"][key]
    arr = np.array([[[np.nan if v is None else v for v in row] for row in d] for d in lay["delta"]], dtype=float)
    if fill != "nan" and np.isnan(arr).any():
        measured = arr[~np.isnan(arr).any(axis=(1, 2))]
        if measured.size == 0:
            raise MxMoEError(f"layer {layer}: no expert has calibration tokens; use more calibration windows")
        value = measured.max(axis=0) if fill == "max" else measured.mean(axis=0)  # [3, S]
        arr = np.where(np.isnan(arr), value[None], arr)
    return arr, lay["experts"]


def merge_schemes(parts: "list[dict]", schemes) -> dict:
    """One sensitivity result over ``schemes`` from ``parts`` measured on the same model, windows and method, each
    over some of the schemes (Δ of a block under one scheme does not depend on the others measured beside it).

    Every part must hold every layer of the first, with the same experts and tokens per expert (the same routing
    of the same windows); else MxMoEError. The result's ``params`` are the first part's, ``device`` names each
    part's device and ``merged_from`` lists each part's schemes and device.
    """
    names = [str(check_scheme(s)) for s in schemes]
    column = {}  # scheme -> (part index, column in that part)
    for i, part in enumerate(parts):
        for j, name in enumerate(part["schemes"]):
            column.setdefault(name, (i, j))
    missing = [n for n in names if n not in column]
    if missing:
        raise MxMoEError(f"no part measured {missing}")
    first = parts[0]
    layers = {}
    for key, lay in first["layers"].items():
        same = [p["layers"].get(key) for p in parts]
        if any(s is None or (s["experts"], s["tokens"]) != (lay["experts"], lay["tokens"]) for s in same):
            raise MxMoEError(f"layer {key}: the parts differ in layers, experts or tokens per expert")
        delta = []
        for e in range(len(lay["experts"])):
            if lay["experts"][e] in lay["no_tokens"]:
                delta.append([[None] * len(names) for _ in BLOCKS])
                continue
            delta.append([[same[i]["delta"][e][b][j] for i, j in map(column.get, names)] for b in range(len(BLOCKS))])
        layers[key] = {
            **{k: lay[k] for k in ("experts", "tokens", "no_tokens")},
            "delta": delta,
            "rtn_fallbacks": [f for s in same for f in s["rtn_fallbacks"] if f[2] in names],
            "seconds": round(sum(s.get("seconds", 0.0) for s in same), 2),
        }
    devices = list(dict.fromkeys(p.get("device", "unknown") for p in parts))
    return {
        "params": first["params"],
        "schemes": names,
        "blocks": first["blocks"],
        "layers": layers,
        "device": " + ".join(devices),
        "merged_from": [{"schemes": p["schemes"], "device": p.get("device", "unknown")} for p in parts],
    }
