"""An extension beyond the paper: the allocation's Δ calibrated to whole-model damage, one budget per model.

The paper allocates on Δ, each linear block's output error measured alone. The proxy check
(``mxmoe.stages.proxy``) measures what the whole model loses when one MoE layer takes one scheme, and on
smollm2-moe v2 the two disagree: across layers (Σ Δ grows with depth, the damage much less) and between
per-channel and grouped schemes (Δ rates w2 per-channel close to w2 g128, the model does not). Here each
layer's Δ for scheme s is rescaled so that its sum over the layer's blocks equals the measured NLL
increase of that (layer, scheme) pair: Δ still decides *which* blocks of a layer take a scheme, the
measurement decides how much the layer and the scheme matter. Only the schemes the proxy check measured
are offered (``plan.PROXY_SCHEMES``), under one budget for the whole model, so bits move to the layers
whose damage is largest. The damage is measured on WikiText-2 *validation* windows twice: with RTN (the
quantizer of Δ) and with Table 1's GPTQ after a Hadamard rotation (what the rows are quantized with), one
allocation per measurement. The rows are measured on the test windows after GPTQ, as the paper's rows are,
with the sum of the calibrated Δ the allocation chose beside the NLL increase it got (are the layers'
damages additive?). Reported beside the paper's method, never in its place.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

from mxmoe import plan
from mxmoe.allocate import LayerProblem, allocation_doc, scheme_map, solve_model
from mxmoe.baselines import QuantConfig, allocation_config, baseline
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.paths import results_dir
from mxmoe.profiles import Profile
from mxmoe.schemes import Scheme
from mxmoe.stages.allocation import allocation_inputs, load_allocation, write_allocation
from mxmoe.stages.evaluate import evaluate_config

NLL_FLOOR = 1e-3  # nats: a measured increase below it (the windows' noise, even negative) counts as this


def calibrate(problems: "list[LayerProblem]", check: dict) -> "list[LayerProblem]":
    """The layer problems restricted to the schemes ``check`` measured, each (layer, scheme) Δ rescaled so it sums
    to the measured whole-model NLL increase (at least ``NLL_FLOOR``). ``check``: a ``proxy_check`` result."""
    measured = {(p["layer"], Scheme.parse(p["scheme"])): p["nll_increase"] for p in check["pairs"].values()}
    out = []
    for p in problems:
        keep = [k for k, s in enumerate(p.schemes) if (p.layer, s) in measured]
        if not keep:
            raise MxMoEError(
                f"layer {p.layer}: the proxy check measured none of its schemes {[str(s) for s in p.schemes]}; "
                "run notebook 05's proxy check with the allocation's schemes"
            )
        loss = p.loss[:, :, keep].copy()  # [E, 3, S']
        for j, k in enumerate(keep):
            total = float(loss[:, :, j].sum())
            if total <= 0:
                raise MxMoEError(f"layer {p.layer}, {p.schemes[k]}: Δ sums to {total}; nothing to rescale")
            loss[:, :, j] *= max(measured[(p.layer, p.schemes[k])], NLL_FLOOR) / total
        out.append(
            dataclasses.replace(
                p,
                schemes=[p.schemes[k] for k in keep],
                loss=loss,
                time=p.time[:, :, keep],
                bits=p.bits[keep],
                params={**p.params, "calibrated_by": check["params"]},
            )
        )
    return out


def additive_damage(check: dict, scheme) -> float:
    """The NLL increase ``check``'s layer damages add up to with every MoE layer at ``scheme`` (each at least
    ``NLL_FLOOR``, as ``calibrate`` counts them): what the calibrated Δ predicts for the uniform model."""
    name = str(Scheme.parse(scheme))
    damages = [p["nll_increase"] for p in check["pairs"].values() if p["scheme"] == name]
    if not damages:
        raise MxMoEError(f"the proxy check measured no layer with {name}")
    return sum(max(d, NLL_FLOOR) for d in damages)


def _measured(check: dict) -> dict:
    """What the calibration measured: the proxy check's schemes, windows, their source and the quantizer."""
    return {k: check["params"][k] for k in ("schemes", "windows", "source", "quantizer")}


def calibrated_setting(setting: plan.CalibratedSetting, quantizer: str) -> plan.CalibratedSetting:
    """``setting`` for the damage measured with ``quantizer`` ("rtn" | "gptq"): its own label and allocation file."""
    return dataclasses.replace(
        setting, label=f"{setting.label} ({quantizer} damage)", name=f"{setting.name}-{quantizer}"
    )


def solve_calibrated(
    profile: Profile, problems: "list[LayerProblem]", check: dict, setting: plan.CalibratedSetting
) -> dict:
    """Solve and write one calibrated allocation on ``problems`` (``calibrate``'s; one budget over the model,
    r = 1 like Table 1's weight-only rows); returns its document with the scheme map under "scheme_map"."""
    start = time.perf_counter()
    choices, _ = solve_model(
        [(p.loss, p.time, p.bits, p.size) for p in problems],
        problems[0].bits,
        setting.budget_bits,
        1.0,
        labels=[x for p in problems for x in p.labels],
    )
    doc = allocation_doc(
        problems,
        choices,
        setting.name,
        1.0,
        setting.budget_bits,
        global_budget=True,
        profile=profile.name,
        solve_seconds=round(time.perf_counter() - start, 3),
    )
    doc["calibrated_by"] = _measured(check)
    write_allocation(doc)
    return {**doc, "scheme_map": scheme_map(problems, choices)}


def _rtn_ppl(profile: Profile, label: str, scheme=None, scheme_map=None) -> float:
    """WikiText-2 test perplexity of the model RTN-quantized with one scheme or a scheme map (no rotation)."""
    return evaluate_config(QuantConfig(label, scheme, "rtn"), profile, scheme_map=scheme_map, zeroshot=False)["ppl"]


def _beside(profile: Profile, setting: plan.CalibratedSetting) -> dict:
    """The rows a calibrated allocation is set beside, quantized with RTN (the quantizer of Δ): the uniform
    baseline's scheme and the paper's allocation at the same budget."""
    paper = plan.TABLE1_MXMOE[setting.paper]
    uniform = baseline(setting.uniform).scheme
    return {
        "uniform": {"label": setting.uniform, "ppl_rtn": _rtn_ppl(profile, f"rtn {uniform}", uniform)},
        "paper": {
            "label": setting.paper,
            "ppl_rtn": _rtn_ppl(profile, f"rtn {paper}", scheme_map=load_allocation(profile.model, paper)),
        },
    }


def _calibrated_row(
    profile: Profile,
    problems: list,
    check: dict,
    setting: plan.CalibratedSetting,
    beside: dict,
    fp_ppl: float,
    seed: int,
) -> dict:
    """One calibrated allocation (``setting`` for ``check``'s damage) solved, quantized as Table 1 and with RTN,
    measured, and set ``beside`` its comparison rows (``calibrated_rows`` documents the fields)."""
    quantizer = check["params"]["quantizer"]
    setting = calibrated_setting(setting, quantizer)
    doc = solve_calibrated(profile, problems, check, setting)
    amap = doc.pop("scheme_map")
    row = evaluate_config(allocation_config(setting.label, seed), profile, scheme_map=amap, zeroshot=False)
    counts = Counter()  # blocks per scheme over the model (update keeps schemes no block took)
    for layer in doc["layers"]:
        counts.update(layer["blocks_per_scheme"])
    return {
        "label": setting.label,
        "setting": setting.name,
        "damage": quantizer,
        "budget_bits": setting.budget_bits,
        "w_bits": row["w_bits"],
        "ppl": row["ppl"],
        # the calibrated loss of the chosen blocks: the NLL increase their measured damages add up to, beside
        # what the same damages predict for the uniform model
        "nll_increase": {
            "predicted": doc["predicted"]["L"],
            "measured": math.log(row["ppl"] / fp_ppl),
            "uniform_predicted": additive_damage(check, baseline(setting.uniform).scheme),
        },
        "ppl_rtn": _rtn_ppl(profile, f"rtn {setting.label}", scheme_map=amap),
        **beside,
        "blocks_per_scheme": dict(counts),
        "layer_bits": [round(x["bits"], 3) for x in doc["layers"]],
        "solve_seconds": doc["solve_seconds"],
        "profile": row["profile"],
        "device": row["device"],
    }


def calibrated_rows(profile: Profile, checks: "list[dict]", seed: int = 0) -> "list[dict]":
    """Each allocation of ``plan.CALIBRATED`` solved once per proxy check in ``checks`` (RTN and GPTQ damage),
    quantized like Table 1's MxMoE rows (GPTQ after a Hadamard rotation) and measured (WikiText-2 test
    perplexity, no zero-shot); then it, the uniform baseline's scheme and the paper's allocation again with RTN:
    whether the calibration fails to carry over to GPTQ or fails as such. One row per (check, setting): bits,
    both perplexities, the NLL increase the calibrated Δ predicts and the one measured (test windows, against
    full precision), the one the same damages predict for the uniform baseline, blocks per scheme over the
    model, bits per layer, the profile and device that measured it. Writes <results>/<model>/eval/calibrated.json.
    """
    inputs = allocation_inputs(profile)[0]["weight_only"]
    fp_ppl = evaluate_config(baseline("fp16"), profile, zeroshot=False)["ppl"]
    beside = {s.name: _beside(profile, s) for s in plan.CALIBRATED}  # the same for every check
    rows = []
    for check in checks:
        problems = calibrate(inputs, check)
        rows += [_calibrated_row(profile, problems, check, s, beside[s.name], fp_ppl, seed) for s in plan.CALIBRATED]
    path = results_dir() / profile.model / "eval" / "calibrated.json"
    write_json_atomic(path, {"rows": rows, "calibrated_by": [_measured(c) for c in checks]})
    return rows
