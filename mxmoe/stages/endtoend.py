"""Stage 05's throughput side: MoE-block throughput of an allocation, Figures 5 and 6 assembled.

Throughput here is the time of every MoE layer's two grouped-GEMM launches (gate_up fused, down) for
a batch routed like the WikiText-2 routing profile, predicted by ``mxmoe.perfmodel`` from a GPU's cost
table (the same model the allocation optimised), or measured by ``mxmoe.bench.alloc`` on a GPU and
committed under results/kernels/. Perplexities come from ``mxmoe.stages.evaluate``.
"""

from __future__ import annotations

import json

import numpy as np

from mxmoe import plan
from mxmoe.baselines import allocation_config, baseline
from mxmoe.files import write_json_atomic
from mxmoe.paths import kernel_results_dir, results_dir
from mxmoe.perfmodel import launch_time, load_table
from mxmoe.profiles import Profile
from mxmoe.routing import batch_workload
from mxmoe.schemes import Scheme
from mxmoe.stages.allocation import load_allocation, model_shape, r_sweep_allocations, routing_profile
from mxmoe.stages.evaluate import evaluate_config


def predicted_throughput(
    model: str,
    batch_tokens: int,
    gpu: str = "nvidia_h100",
    *,
    scheme: "str | None" = None,
    scheme_map: "dict | None" = None,
) -> dict:
    """Predicted MoE-block GEMM time of one batch: {'T_ms', 'tokens_per_s', 'time_source'}.

    Give one uniform ``scheme`` or an allocation ``scheme_map`` {(layer, expert, block): Scheme};
    gate_up uses the gate's scheme (gate and up are tied). Shared experts run every token.
    """
    if (scheme is None) == (scheme_map is None):
        raise ValueError("give exactly one of scheme= or scheme_map=")
    rout, dims, table = routing_profile(model), model_shape(model), load_table(gpu)
    rows = batch_workload(np.asarray(rout["counts"]), batch_tokens, rout["top_k"])  # [L, E]
    h, w = dims["hidden"], dims["expert_width"]
    total, sources = 0.0, set()
    for li, layer in enumerate(rout["layers"]):
        experts = [(e, int(m), w) for e, m in enumerate(rows[li])]
        experts += [(f"shared{i}", batch_tokens, sw) for i, sw in enumerate(dims["shared_widths"])]

        def of(e, block):
            return Scheme.parse(scheme if scheme_map is None else scheme_map[(layer, e, block)])

        gate_up = launch_time([(of(e, "gate"), m, 2 * width, h) for e, m, width in experts], table)
        down = launch_time([(of(e, "down"), m, h, width) for e, m, width in experts], table)
        total += gate_up.ms + down.ms
        sources |= {gate_up.source, down.source}
    return {"T_ms": total, "tokens_per_s": batch_tokens / (total / 1e3), "time_source": ",".join(sorted(sources))}


def measured_throughput(model: str) -> "dict | None":
    """{(setting, batch): row} from the newest GPU run of ``mxmoe.bench.alloc`` for ``model``, or None.

    Each row has ms, tokens_per_s and the run's device; the file is results/kernels/figure5_<model>_<gpu>.json.
    """
    files = sorted(kernel_results_dir().glob(f"figure5_{model}_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    doc = json.loads(files[-1].read_text())
    device = doc["provenance"]["device"]
    return {(r["setting"], r["batch"]): {**r, "device": device, "source": files[-1].name} for r in doc["rows"]}


def figure5(profile: Profile, table1: dict, table5: dict, maps: dict, gpu: str = plan.THROUGHPUT_GPU) -> dict:
    """Figure 5 rows: MoE-block throughput (measured when a GPU run of ``mxmoe bench alloc`` is committed,
    else predicted) and PPL per setting and batch; writes <results>/<model>/eval/figure5.json.

    ``table1``, ``table5``: the tables of ``mxmoe.stages.evaluate``; ``maps``: Table 1's scheme maps.
    Returns {"meta": provenance of the figure, "rows": [...]}.
    """
    model = profile.model
    measured = measured_throughput(model)
    ppl_of = {
        "fp16": table1["fp16"]["ppl"],
        "w4a4": table1["quarot-w4a4"]["ppl"],
        "w8a8": table5.get("w8a8"),
        plan.FIG5_MIXED: table1[plan.FIG5_MIXED]["ppl"],
    }
    rows = []
    for batch in plan.BATCHES:
        for label in [*plan.FIG5_UNIFORM, plan.FIG5_MIXED]:
            spec = {"scheme": plan.FIG5_UNIFORM[label]} if label in plan.FIG5_UNIFORM else {"scheme_map": maps[label]}
            row = {
                "setting": label,
                "batch": batch,
                "ppl": ppl_of.get(label),
                **predicted_throughput(model, batch, gpu, **spec),
            }
            row["predicted_tokens_per_s"] = row["tokens_per_s"]
            if measured and (label, batch) in measured:
                hit = measured[(label, batch)]
                row.update(tokens_per_s=hit["tokens_per_s"], time_source=f"measured: {hit['source']}")
            rows.append(row)
    is_measured = bool(measured) and all(r["time_source"].startswith("measured") for r in rows)
    meta = {
        "device": next(iter(measured.values()))["device"] if is_measured else f"{gpu} cost table",
        "model": model,
        "profile": profile.name,
        "kind": "smoke" if profile.name == "smoke" else ("measured" if is_measured else "predicted"),
        "ppl_device": table1["fp16"]["device"],
    }
    write_json_atomic(results_dir() / model / "eval" / "figure5.json", {**meta, "rows": rows})
    return {"meta": meta, "rows": rows}


def figure6(profile: Profile, meta: dict, seed: int = 0, gpu: str = plan.THROUGHPUT_GPU) -> "list[dict]":
    """Figure 6: one allocation per r of ``plan.R_SWEEP`` (W5A5, 5 bits), its PPL and its throughput at the
    first batch size; writes <results>/<model>/eval/figure6.json (``meta`` from ``figure5``)."""
    model, batch = profile.model, plan.BATCHES[0]
    measured = measured_throughput(model)
    sweep = r_sweep_allocations(model, plan.R_SWEEP, batch_tokens=batch, gpu=gpu, profile=profile.name)
    points = []
    for r, (setting, smap, doc) in sweep.items():
        row = evaluate_config(allocation_config(setting, seed), profile, scheme_map=smap, zeroshot=False)
        point = {
            "r": r,
            "setting": setting,
            "ppl": row["ppl"],
            "predicted_T_ms": doc["predicted"]["T_launch_ms"],
            "L": doc["predicted"]["L"],
            **predicted_throughput(model, batch, gpu, scheme_map=smap),
        }
        if measured and (setting, batch) in measured:
            point.update(tokens_per_s=measured[(setting, batch)]["tokens_per_s"], time_source="measured")
        points.append(point)
    write_json_atomic(results_dir() / model / "eval" / "figure6.json", {**meta, "batch": batch, "rows": points})
    return points


def fp8_configs(model: str, seed: int = 0) -> "list[tuple]":
    """The fp8 extension's quantizations of ``model``: [(QuantConfig, scheme map or None)] for ``plan.FP8_BASELINES``
    and the ``plan.FP8_MXMOE`` allocation (read from stage 04's file)."""
    mixed = (allocation_config(plan.FP8_MXMOE, seed), load_allocation(model, plan.FP8_MXMOE))
    return [(baseline(name), None) for name in plan.FP8_BASELINES] + [mixed]


def fp8_table(
    profile: Profile, fp16: dict, zeroshot: bool = True, seed: int = 0, gpu: str = plan.THROUGHPUT_GPU
) -> dict:
    """The fp8 extension (``fp8_configs``) beside full precision, each with its WikiText-2 PPL, zero-shot accuracies
    (when ``zeroshot``) and predicted MoE-block throughput per batch of ``plan.BATCHES`` from ``gpu``'s cost table;
    writes <results>/<model>/eval/fp8.json.

    ``fp16``: Table 1's full-precision ``evaluate_config`` row. Returns {"meta", "rows"}.
    """
    measured = [(baseline("fp16"), None, fp16)]
    measured += [
        (c, smap, evaluate_config(c, profile, scheme_map=smap, zeroshot=zeroshot))
        for c, smap in fp8_configs(profile.model, seed)
    ]
    rows = []
    for config, smap, row in measured:
        spec = {"scheme": config.scheme} if smap is None else {"scheme_map": smap}
        out = {k: row[k] for k in ("w_bits", "a_bits", "ppl", "tasks", "device")}
        for batch in plan.BATCHES:
            out[f"tokens_per_s_{batch}"] = predicted_throughput(profile.model, batch, gpu, **spec)["tokens_per_s"]
        rows.append({"setting": config.label, **out})
    meta = {"model": profile.model, "profile": profile.name, "time_source": f"{gpu} cost table (predicted)"}
    write_json_atomic(results_dir() / profile.model / "eval" / "fp8.json", {**meta, "rows": rows})
    return {"meta": meta, "rows": rows}
