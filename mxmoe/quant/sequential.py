"""GPTQ over a whole MoE model, layer by layer (the "GPTQ" / "GPTQ*" accuracy path).

For each MoE layer in order: the calibration windows run through the model as quantized so far
(upstream experts' weights quantized, activation fake quant on) to give the block input; each
expert's gate and up are quantized with the Hessian of the tokens routed to it, then its down with
the Hessian of its intermediate activations computed from the already-quantized gate/up (true
sequential, QuaRot/GPTQ style). Experts with fewer than ``min_tokens`` tokens (or none) fall back
to RTN, with a warning, and are listed in the report. With ``hadamard=True`` the residual stream is
rotated first (``rotate_model``, seeded) and the down_proj inputs are rotated online, as in QuaRot.
Attention, routers and embeddings stay full precision.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mxmoe.quant.apply import install_activation_quant, rotate_down_inputs, set_block_weight, validate_scheme_map
from mxmoe.quant.experts import expert_weights, hessian_of, intermediate, quantize_blocks, split_by_expert
from mxmoe.quant.hadamard import Rotation, apply_online_hadamard, rotate_model
from mxmoe.quant.layerwise import LayerwiseRunner
from mxmoe.schemes import BF16


@dataclass
class GPTQReport:
    """What ``quantize_model_gptq`` did.

    gptq_blocks: blocks quantized by GPTQ; rtn_fallbacks: one dict per block that fell back to RTN
    (layer, expert, block, tokens, reason); rotation: the residual rotation used (None without
    ``hadamard``); seconds: wall time.
    """

    gptq_blocks: int = 0
    rtn_fallbacks: list = field(default_factory=list)
    rotation: "Rotation | None" = None
    online_hadamard: bool = False
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-ready counts and the fallback list."""
        return {
            "gptq_blocks": self.gptq_blocks,
            "rtn_fallbacks": len(self.rtn_fallbacks),
            "fallbacks": self.rtn_fallbacks,
            "online_hadamard": self.online_hadamard,
            "rotation": None if self.rotation is None else {"seed": self.rotation.seed, "kind": self.rotation.kind},
            "seconds": round(self.seconds, 1),
        }


@torch.no_grad()
def quantize_model_gptq(
    model,
    windows: torch.Tensor,
    scheme_map: dict,
    *,
    hadamard: bool = False,
    seed: int = 0,
    rotation: "Rotation | None" = None,
    min_tokens: int = 16,
    progress: bool = True,
    int_weights: "dict | None" = None,
    stream_to: "torch.device | str | None" = None,
    layer_inputs: "dict | None" = None,
    **gptq_kw,
) -> GPTQReport:
    """Quantize ``model`` in place with GPTQ per ``scheme_map`` {(layer, expert, block): Scheme} on ``windows`` [n, seqlen].

    ``hadamard`` rotates the residual stream first (``rotation`` or a random Hadamard from ``seed``)
    and the down_proj inputs online. ``gptq_kw`` go to ``gptq_quantize`` (blocksize, percdamp,
    act_order, ...). The model ends fake-quantized exactly as ``apply_schemes`` leaves it.
    ``int_weights``, when given, receives the ``IntWeight`` of every quantized block keyed like the
    scheme map (what a checkpoint stores; down weights as the model holds them, rotated with ``hadamard``).
    ``stream_to``: quantize a model held in CPU memory on this device, one decoder layer at a time
    (``LayerwiseRunner``); the layers before the last quantized one pass through it too, the rest never do.
    ``layer_inputs``: a dict the caller keeps across calls that each quantize *one* layer of a fresh copy of
    the same model, on the same windows and rotation, with different schemes (the proxy check). That layer's
    inputs come from the full-precision layers before it, so they are the same for every scheme: the first
    call stores them there ({layer: [N, H]}, one layer at a time) and the next ones skip the calibration
    forward. Ignored when several layers are quantized, and with ``stream_to``.
    """
    start = time.time()
    blocks, plan = validate_scheme_map(model, scheme_map)
    report = GPTQReport(online_hadamard=hadamard)
    if hadamard:
        report.rotation = rotate_model(model, seed, rotation=rotation)
        rotate_down_inputs(model)
    install_activation_quant(model, plan, online_hadamard=hadamard)
    todo = sorted(layer for layer in blocks if any(k[0] == layer and not s.is_full_precision for k, s in plan.items()))
    bar = tqdm(total=len(todo), desc="GPTQ", unit="layer", disable=not progress)

    def quantize_layer(layer: int, x: torch.Tensor, home) -> None:  # x: [N, H] the layer's calibration inputs
        b, before = blocks[layer], len(report.rtn_fallbacks)
        _quantize_layer(b, split_by_expert(b, x), plan, report, hadamard, min_tokens, gptq_kw, int_weights, home)
        if len(report.rtn_fallbacks) > before:
            warnings.warn(
                f"GPTQ layer {layer}: {len(report.rtn_fallbacks) - before} blocks had fewer than "
                f"{min_tokens} calibration tokens and were quantized with RTN",
                stacklevel=3,
            )
        bar.update(1)

    reuse = layer_inputs is not None and len(todo) == 1 and stream_to is None
    if reuse and todo[0] in layer_inputs:
        quantize_layer(todo[0], layer_inputs[todo[0]], None)  # stored by an earlier call
    else:
        if reuse:
            layer_inputs.clear()  # another layer's inputs: not needed again
        runner = LayerwiseRunner(model, windows, stream_to)
        for layer in range(max(todo) + 1 if todo else 0):
            if layer in todo:
                x = runner.block_inputs(blocks[layer].module)  # [N, H] inputs from the model quantized so far
                if reuse:
                    layer_inputs[layer] = x
                quantize_layer(layer, x, runner.home_device)
            if layer != todo[-1]:  # past the last quantized layer no input is needed
                runner.advance()
        runner.release()
    bar.close()
    report.seconds = time.time() - start
    return report


def _quantize_layer(
    b,
    experts: list,
    plan: dict,
    report: GPTQReport,
    rotate_down: bool,
    min_tokens: int,
    gptq_kw: dict,
    int_weights: "dict | None" = None,
    codes_device: "torch.device | None" = None,
) -> None:
    """GPTQ (or RTN fallback) of every expert's gate and up, then down, written into the model.

    Experts are independent within a layer, so gate and up of all experts, each with its own
    scheme, are quantized in one batched GPTQ per weight shape, then down likewise; down's Hessian
    comes from the expert's quantized gate/up (true sequential). The report gets the same entries,
    in the same order, as expert by expert. Each block's ``IntWeight`` goes into ``int_weights`` when given,
    moved to ``codes_device`` when that is given (a streamed model's codes stay where the model is held).
    """
    todo = []  # (tokens, schemes, weights, Hessian of x) of the experts with a quantized block
    for tokens in experts:
        schemes = {n: plan.get((b.layer, tokens.expert, n), BF16) for n in ("gate", "up", "down")}
        if not all(s.is_full_precision for s in schemes.values()):
            # the model's weights (down already rotated when rotate_down); x may have no rows: RTN then
            todo.append((tokens, schemes, expert_weights(b, tokens.expert), hessian_of(tokens.x)))
    done = {}  # (position in todo, block) -> QuantizedBlock
    for names in (("gate", "up"), ("down",)):  # gate and up share x's Hessian; down's needs them quantized
        groups: dict = {}  # weight shape -> [(position in todo, block)]
        for i, (_, schemes, w, _) in enumerate(todo):
            for name in names:
                if not schemes[name].is_full_precision:
                    groups.setdefault(tuple(w[name].shape), []).append((i, name))
        for batch in groups.values():
            hs = []
            for i, name in batch:
                tokens, schemes, w, hx = todo[i]
                if name == "down":  # from the quantized gate/up, already in w
                    h = intermediate(tokens.x, w, schemes)  # [T, I]
                    hx = hessian_of(apply_online_hadamard(h) if rotate_down and h.shape[0] else h)
                hs.append(hx)
            ws = torch.stack([todo[i][2][name] for i, name in batch])  # [B, out, in]
            qs = quantize_blocks(ws, [todo[i][1][name] for i, name in batch], hs, min_tokens, **gptq_kw)
            for (i, name), q in zip(batch, qs):
                tokens, _, w, _ = todo[i]
                w[name] = q.weight.dequantize()
                set_block_weight(b, tokens.expert, name, w[name])
                done[i, name] = q
                if int_weights is not None:
                    code = q.weight if codes_device is None else q.weight.to(codes_device)
                    int_weights[b.layer, tokens.expert, name] = code
    for i, (tokens, _, _, _) in enumerate(todo):  # report in expert, then block order
        for name in ("gate", "up", "down"):
            q = done.get((i, name))
            if q is None:
                continue
            if q.how == "rtn-fallback":
                report.rtn_fallbacks.append(
                    {
                        "layer": b.layer,
                        "expert": tokens.expert,
                        "block": name,
                        "tokens": int(tokens.x.shape[0]),
                        "reason": q.reason,
                    }
                )
            else:
                report.gptq_blocks += 1
