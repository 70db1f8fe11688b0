"""Stage 05's check of the allocation's loss proxy: one MoE layer quantized at a time, the whole model measured.

The allocation minimises L = Σ Δ over linear blocks, each Δ measured locally (``mxmoe.sensitivity``: one
block quantized, every layer fed full-precision inputs). That the sum predicts what quantization does to
the model is an assumption of the paper's method, and the place to look when a mixed allocation loses to a
uniform one. ``layer_swap`` tests it layer by layer: for every MoE layer l and scheme s it quantizes every
block of layer l (routed and shared experts) with s, measures the model's mean NLL on WikiText-2
*validation* windows (not the test split, since this check may steer the method), and pairs the NLL
increase with the proxy Σ_{e,j} Δ[l, e, j, s] of a sensitivity result. ``proxy_check`` quantizes the layer
with RTN, against the RTN Δ, or with Table 1's recipe (GPTQ after a Hadamard rotation, calibrated on
WikiText-2 *train*), which repairs some schemes far more than others, against the Δ the allocations
minimise (measured with that recipe, one block at a time): the damage the quantized model actually takes,
and how well that Δ predicts it.

``agreement`` summarises the pairs as Spearman rank correlations: across layers per scheme (does Δ rank
the layers as the model does?) and over every (layer, scheme) pair (does it also rank schemes against each
other, which is what trading bits between blocks relies on?).
"""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
from tqdm.auto import tqdm

from mxmoe import plan
from mxmoe.baselines import allocation_config, quantize
from mxmoe.checkpoint import weights_id
from mxmoe.env import device_name
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.metrics import eval_windows, perplexity
from mxmoe.models.blocks import BLOCKS, moe_blocks
from mxmoe.paths import results_dir
from mxmoe.profiles import Profile, calibration, random_windows
from mxmoe.quant.apply import apply_schemes, check_scheme, expert_ids
from mxmoe.sensitivity import compute_sensitivity, sensitivity_array
from mxmoe.stages.allocation import newest_result
from mxmoe.stages.evaluate import fresh_model


def spearman(a, b) -> "float | None":
    """Spearman rank correlation of two equal-length sequences (ranks by order; None with fewer than 3 pairs)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)  # [n], [n]
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # [n] ranks
    return float(np.corrcoef(ra, rb)[0, 1])


def mean_nll(model, windows) -> float:
    """Mean next-token NLL (nats) of ``model`` over token windows [n, seqlen]."""
    return math.log(perplexity(model, windows, desc="proxy check"))


def layer_proxy(sensitivity: dict, layer: int, scheme) -> float:
    """Σ Δ over every block of one layer (routed and shared experts) under one scheme of a sensitivity result."""
    have = [str(check_scheme(s)) for s in sensitivity["schemes"]]
    name = str(check_scheme(scheme))
    if name not in have:
        raise MxMoEError(f"scheme {name} has no Δ in the sensitivity result (it has {have})")
    delta, _ = sensitivity_array(sensitivity, layer)  # [E, 3, S]
    return float(delta[:, :, have.index(name)].sum())


QUANTIZERS = ("rtn", "gptq")  # how the check quantizes a layer: RTN, or Table 1's GPTQ after a Hadamard rotation


def layer_swap(
    model,
    windows,
    sensitivity: dict,
    schemes,
    quantize_layer=apply_schemes,
    done: "dict | None" = None,
    on_pair=None,
    base_nll: "float | None" = None,
) -> dict:
    """Whole-model NLL increase and proxy Σ Δ for every (MoE layer, scheme), one layer quantized at a time.

    ``model`` stays unquantized (each pair runs on a copy, quantized in place by ``quantize_layer(copy,
    scheme_map)``; default RTN). ``done``: pairs measured before, {"<layer>/<scheme>": row}, kept;
    ``on_pair(pairs)`` is called after each new pair (to save progress); ``base_nll``: the unquantized model's
    NLL those pairs were measured against (measured here when not given). Returns
    {"base_nll", "pairs": {"<layer>/<scheme>": {"layer", "scheme", "nll_increase", "proxy"}}}.
    """
    schemes = [str(check_scheme(s)) for s in schemes]
    pairs = dict(done or {})
    todo = [(b, s) for b in moe_blocks(model) for s in schemes if f"{b.layer}/{s}" not in pairs]
    base = mean_nll(model, windows) if base_nll is None else base_nll
    for block, scheme in tqdm(todo, desc="proxy check: layer x scheme", unit="pair"):
        quantized = copy.deepcopy(model)
        quantize_layer(quantized, {(block.layer, e, n): scheme for e in expert_ids(block) for n in BLOCKS})
        pairs[f"{block.layer}/{scheme}"] = {
            "layer": block.layer,
            "scheme": scheme,
            "nll_increase": mean_nll(quantized, windows) - base,
            "proxy": layer_proxy(sensitivity, block.layer, scheme),
        }
        del quantized
        if on_pair is not None:
            on_pair(pairs)
    return {"base_nll": base, "pairs": pairs}


def agreement(pairs: dict) -> dict:
    """Spearman correlations of proxy and NLL increase: {"per scheme": {scheme: ρ across layers}, "all pairs": ρ}."""
    rows = list(pairs.values())
    per_scheme = {}
    for s in dict.fromkeys(r["scheme"] for r in rows):
        sel = [r for r in rows if r["scheme"] == s]
        per_scheme[s] = spearman([r["proxy"] for r in sel], [r["nll_increase"] for r in sel])
    return {
        "per scheme": per_scheme,
        "all pairs": spearman([r["proxy"] for r in rows], [r["nll_increase"] for r in rows]),
    }


def scheme_prices(pairs: dict, reference: str) -> dict:
    """Per scheme, the whole-model NLL increase and the proxy Δ of ``pairs`` (``layer_swap``'s), each summed over
    the layers measured with every scheme and divided by the ``reference`` scheme's sum: the exchange rates between
    schemes the model pays and those an allocation on Δ assumes. Returns {"layers": n, "schemes": {scheme:
    {"damage": ratio, "delta": ratio}}}; raises MxMoEError when ``reference`` has no pairs."""
    rows = list(pairs.values())
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    if reference not in schemes:
        raise MxMoEError(f"the proxy check has no pairs of {reference}; it has {schemes}")
    layers = set.intersection(*({r["layer"] for r in rows if r["scheme"] == s} for s in schemes))
    total = {
        s: [sum(r[k] for r in rows if r["scheme"] == s and r["layer"] in layers) for k in ("nll_increase", "proxy")]
        for s in schemes
    }
    ref = total[reference]
    return {
        "layers": len(layers),
        "schemes": {s: {"damage": nll / ref[0], "delta": proxy / ref[1]} for s, (nll, proxy) in total.items()},
    }


def proxy_inputs(profile: Profile, method: str = "rtn", schemes=plan.PROXY_SCHEMES) -> tuple:
    """(model, tokenizer, sensitivity) for ``proxy_check``: a fresh copy of ``profile.model`` and stage 01's newest
    sensitivity result of ``method`` ("rtn", "gptq", "gptq-had": what the allocations minimise); the smoke
    profile's tiny model has none committed: computed here on random ids."""
    model, tok = fresh_model(profile.model)
    if profile.name == "smoke":
        sens = compute_sensitivity(model, calibration(model, tok, profile), list(schemes), method, progress=False)
    else:
        sens = json.loads(newest_result(profile.model, "sensitivity", f"{method}_").read_text())
    return model, tok, sens


def proxy_check(
    profile: Profile,
    model,
    tok,
    sensitivity: dict,
    schemes=plan.PROXY_SCHEMES,
    quantizer: str = "rtn",
    seed: int = 0,
) -> dict:
    """``layer_swap`` on ``profile``'s validation windows, cached and resumable, with its ``agreement``.

    ``quantizer``: "rtn" (the quantizer of Δ) or "gptq" (Table 1's MxMoE recipe: GPTQ after a Hadamard rotation
    of rotation ``seed``, on the profile's WikiText-2 train calibration windows; Table 1 quantizes every layer
    this way). Windows: the first ``plan.PROXY_WINDOWS[profile.name]`` of WikiText-2 validation at the
    profile's sequence length, or random ids when ``tok`` is None (smoke). Writes
    <results>/<model>/eval/proxy_check.json (RTN) or proxy_check_gptq.json after each pair; a run with the same
    inputs resumes from it, and one with other schemes keeps the pairs of the schemes both ask for; a run with
    another sensitivity result keeps every measured pair and recomputes its proxy (the NLL does not depend on Δ).
    """
    if quantizer not in QUANTIZERS:
        raise MxMoEError(f"proxy check: quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    n = plan.PROXY_WINDOWS[profile.name]
    if tok is None:
        windows = random_windows(model.config.vocab_size, n, profile.eval_seqlen, seed=2)
        source = "random ids"
    else:
        windows = eval_windows(tok, profile.eval_seqlen, n, split="valid")
        source = "wikitext2 valid"
    params = {
        "model": profile.model,
        "weights_id": weights_id(profile.model, model),
        "schemes": [str(check_scheme(s)) for s in schemes],
        "windows": list(windows.shape),
        "source": source,
        "quantizer": quantizer,
        "sensitivity": sensitivity.get("params"),
    }
    if quantizer == "rtn":
        quantize_layer, name = apply_schemes, "proxy_check.json"
    else:  # gptq
        config = allocation_config("proxy check", seed)
        params["recipe"] = {k: v for k, v in config.as_dict().items() if k != "label"}
        params["calibration"] = [profile.calib_windows, profile.calib_seqlen]
        inputs = {}  # the quantized layer's calibration inputs, the same for each of its schemes

        @functools.cache
        def calib_windows():  # [n, seqlen] train windows, as Table 1's, built for the first pair not cached
            return calibration(model, tok, profile, seed=seed)

        def quantize_layer(m, scheme_map):
            quantize(m, config, calib_windows(), scheme_map, progress=False, layer_inputs=inputs)

        name = "proxy_check_gptq.json"
    path = results_dir() / profile.model / "eval" / name
    old = json.loads(path.read_text()) if path.exists() else {}
    # pairs of the same model, windows and quantizer are kept for the schemes still asked (a scheme added costs
    # its pairs), their proxy taken from this sensitivity result
    ignored = {"schemes": None, "sensitivity": None}
    same = {**old.get("params", {}), **ignored} == {**params, **ignored}
    done, base, device = None, None, device_name()
    if same:
        done = {
            k: {**r, "proxy": layer_proxy(sensitivity, r["layer"], r["scheme"])}
            for k, r in old["pairs"].items()
            if r["scheme"] in params["schemes"]
        }
        if old.get("base_nll") is not None:  # resumed pairs keep the base they were measured against, and its machine
            base, device = old["base_nll"], old.get("device", device)
    if base is None:
        base = mean_nll(model, windows)

    def save(pairs: dict) -> dict:
        doc = {"params": params, "profile": profile.name, "device": device, "base_nll": base, "pairs": pairs}
        doc["agreement"] = agreement(pairs)
        write_json_atomic(path, doc)
        return doc

    result = layer_swap(model, windows, sensitivity, schemes, quantize_layer, done=done, on_pair=save, base_nll=base)
    return save(result["pairs"])
