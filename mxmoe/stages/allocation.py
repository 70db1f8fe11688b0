"""Stage 04, allocation: the ILP inputs from result files, the paper's allocations solved and stored.

Reads the sensitivity (stage 01) and routing (stage 02) results of a model and the cost table of a
GPU; writes ``<results>/<model>/alloc/<setting>.json`` per allocation of ``mxmoe.plan.ALLOCATIONS``
(format: ``mxmoe.allocate.allocation_doc``), the W5A5 Pareto front ``front_w5a5.json`` and the Table 7
map ``table7.json``. ``load_allocation`` returns a stored allocation as the scheme map that
``mxmoe.quant.apply.apply_schemes`` takes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mxmoe import plan
from mxmoe.allocate import (
    LayerProblem,
    allocation_doc,
    layer_problem,
    model_dims,
    pareto_front,
    scheme_map,
    solve_model,
    solve_point,
)
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.models import load_model
from mxmoe.paths import results_dir
from mxmoe.perfmodel import load_table
from mxmoe.profiles import calibration
from mxmoe.quant.apply import scheme_map_from_rows
from mxmoe.routing import routing_report
from mxmoe.schemes import scheme_set
from mxmoe.sensitivity import compute_sensitivity


def newest_result(model: str, kind: str, prefix: str) -> Path:
    """The newest <results>/<model>/<kind>/<prefix>*.json, or MxMoEError naming what to run."""
    files = sorted((results_dir() / model / kind).glob(f"{prefix}*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MxMoEError(
            f"no {kind} result {prefix}*.json for {model} under {results_dir() / model / kind}; "
            f"run the {kind} stage (notebooks 01/02) first"
        )
    return files[-1]


def sensitivity_with(model: str, method: str, schemes: str) -> dict:
    """The newest ``method`` sensitivity result of ``model`` that measured every scheme of set ``schemes``; else the
    newest one (``mxmoe.allocate.layer_problem`` then names the schemes it lacks)."""
    need = {str(s) for s in scheme_set(schemes)}
    files = sorted((results_dir() / model / "sensitivity").glob(f"{method}_*.json"), key=lambda p: -p.stat().st_mtime)
    for f in files:
        doc = json.loads(f.read_text())
        if need <= set(doc["schemes"]):
            return doc
    return json.loads(newest_result(model, "sensitivity", f"{method}_").read_text())


def card_dims(model: str) -> dict:
    """``mxmoe.allocate.model_dims`` from <results>/<model>/model.json (the smollm2-moe card)."""
    path = results_dir() / model / "model.json"
    if not path.exists():
        raise MxMoEError(f"no model card {path}: pass dims=model_dims(loaded_model)")
    card = json.loads(path.read_text())
    n = card.get("shared_experts", 0)
    return {
        "hidden": card["hidden_size"],
        "expert_width": card["expert_width"],
        "shared_widths": [card["shared_width"] // max(n, 1)] * n,
    }


def model_shape(model: str) -> dict:
    """``card_dims`` of ``model``, else the dims of the loaded model (tiny models have no card)."""
    try:
        return card_dims(model)
    except MxMoEError:
        return model_dims(load_model(model)[0])


def routing_profile(model: str, corpus: str = plan.ALLOCATION_CORPUS) -> dict:
    """The routing result of ``corpus`` with the most tokens under <results>/<model>/routing/ (smoke: 'random')."""
    folder = results_dir() / model / "routing"
    files = list(folder.glob(f"{corpus}_*.json")) or list(folder.glob("random_*.json"))
    if not files:
        raise MxMoEError(f"no routing profile for {model} under {folder}; run notebook 02")
    return max((json.loads(f.read_text()) for f in files), key=lambda r: r["tokens"])


def layer_problems(
    model: str,
    schemes: str,
    *,
    method: str = plan.ALLOCATION_METHOD,
    batch_tokens: int = plan.ALLOCATION_BATCH,
    gpu: str = plan.ALLOCATION_GPU,
    sensitivity: "dict | None" = None,
    routing: "dict | None" = None,
    dims: "dict | None" = None,
    corpus: str = plan.ALLOCATION_CORPUS,
) -> "list[LayerProblem]":
    """The allocation inputs of every MoE layer of ``model`` for scheme set ``schemes``.

    Sensitivity, routing and dims default to the model's newest result files (``method`` sensitivity,
    ``corpus`` routing, the model card); the cost table is ``cost_tables/<gpu>.json``.
    """
    sens = sensitivity or sensitivity_with(model, method, schemes)
    rout = routing or json.loads(newest_result(model, "routing", f"{corpus}_").read_text())
    dims = dims if dims is not None else card_dims(model)
    table = load_table(gpu)
    return [layer_problem(sens, rout, dims, layer, table, schemes, batch_tokens, model) for layer in rout["layers"]]


def alloc_path(model: str, setting: str) -> Path:
    """<results>/<model>/alloc/<setting>.json."""
    return results_dir() / model / "alloc" / f"{setting}.json"


def write_allocation(doc: dict) -> Path:
    """Write an ``allocation_doc`` to <results>/<model>/alloc/<setting>.json (atomically); returns the path."""
    return write_json_atomic(alloc_path(doc["model"], doc["setting"]), doc)


def load_allocation(path_or_model: "str | Path", setting: "str | None" = None) -> dict:
    """The scheme map {(layer, expert | "shared0", block): Scheme} of an allocation file.

    Pass a path, or a model name and a setting (<results>/<model>/alloc/<setting>.json).
    """
    path = alloc_path(str(path_or_model), setting) if setting is not None else Path(path_or_model)
    if not path.exists():
        raise MxMoEError(f"no allocation file {path}; run notebooks/04_allocation.ipynb for it")
    return scheme_map_from_rows(json.loads(path.read_text())["rows"])


def solve_setting(problems: "list[LayerProblem]", setting: plan.AllocationSetting, profile: str) -> dict:
    """Solve one allocation of ``mxmoe.plan.ALLOCATIONS`` on its layer problems, write it, return its document."""
    start = time.perf_counter()
    if setting.global_budget:
        choices, _ = solve_model(
            [(p.loss, p.time, p.bits, p.size) for p in problems],
            problems[0].bits,
            setting.budget_bits,
            setting.r,
            granularity=setting.granularity,
            labels=[x for p in problems for x in p.labels],
        )
    else:
        choices = [
            solve_point(
                p.loss,
                p.time,
                p.bits,
                p.size,
                setting.budget_bits,
                setting.r,
                granularity=setting.granularity,
                labels=p.labels,
            ).choice
            for p in problems
        ]
    seconds = time.perf_counter() - start
    doc = allocation_doc(
        problems,
        choices,
        setting.name,
        setting.r,
        setting.budget_bits,
        granularity=setting.granularity,
        global_budget=setting.global_budget,
        profile=profile,
        solve_seconds=round(seconds, 3),
    )
    write_allocation(doc)
    return doc


def solve_settings(problems: dict, profile: str) -> "tuple[dict, list[dict]]":
    """Solve and write every allocation of ``mxmoe.plan.ALLOCATIONS`` (``problems``: scheme set -> layer
    problems). Returns ({setting: document}, one summary row per setting: schemes, budget, r, predicted bits,
    L, T and the solve time)."""
    docs, summary = {}, []
    for setting in plan.ALLOCATIONS:
        doc = solve_setting(problems[setting.scheme_set], setting, profile)
        docs[setting.name] = doc
        summary.append(
            {
                "setting": setting.name,
                "schemes": setting.scheme_set,
                "budget": setting.budget_bits,
                "r": setting.r,
                "bits": doc["predicted"]["bits"],
                "L": doc["predicted"]["L"],
                "T ms": doc["predicted"]["T_ms"],
                "T launch ms": doc["predicted"]["T_launch_ms"],
                "solve s": doc["solve_seconds"],
            }
        )
    return docs, summary


def predicted_vs_uniform(problems: dict, docs: dict) -> dict:
    """{label: (L, T ms)} of the uniform points and the allocations that notebook 04 compares."""

    def pred(name):
        return docs[name]["predicted"]["L"], docs[name]["predicted"]["T_ms"]

    return {
        "uniform w8a8": uniform_totals(problems["w5a5"], "w8a8_g-1_sym"),
        "uniform w4a4 g-1": uniform_totals(problems["w5a5"], "w4a4_g-1_sym"),
        "mxmoe-w5a5 (per layer)": pred("mxmoe-w5a5"),
        "mxmoe-w5a5 (global budget)": pred("mxmoe-w5a5-global"),
        "mxmoe-w5a5-expert": pred("mxmoe-w5a5-expert"),
        "uniform w3a16 g128": uniform_totals(problems["weight_only"], "w3a16_g128_asym"),
        "mxmoe-3.25 (per layer)": pred("mxmoe-3.25"),
        "mxmoe-3.25 (global budget)": pred("mxmoe-3.25-global"),
        "uniform w8a8 fp8": uniform_totals(problems["fp8"], "w8a8_g-1_sym_fp8"),
        "uniform w4a8 fp8 g-1": uniform_totals(problems["fp8"], "w4a8_g-1_sym_fp8"),
        "mxmoe-fp8-4.25 (per layer)": pred("mxmoe-fp8-4.25"),
    }


def uniform_totals(problems: "list[LayerProblem]", scheme: str) -> "tuple[float, float]":
    """(L, T ms) of every block of every layer in one ``scheme`` (the uniform point an allocation is compared to)."""
    k = [str(s) for s in problems[0].schemes].index(scheme)
    totals = [p.totals(np.full((len(p.experts), 3), k)) for p in problems]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


@dataclass
class FrontResult:
    """The model's W5A5 front: the curve over r, the marked r points and the per-layer fronts' sizes."""

    curve_r: list
    curve: list  # (L, T ms) per r of curve_r
    picks: dict  # r -> (L, T ms)
    doc: dict  # the front_w5a5.json document


def solve_front(
    model: str,
    problems: "list[LayerProblem]",
    profile: str,
    kind: str,
    batch_tokens: int = plan.ALLOCATION_BATCH,
    gpu: str = plan.ALLOCATION_GPU,
) -> FrontResult:
    """One Pareto front per layer (``plan.FRONT_SCHEME_SET`` at ``plan.FRONT_BUDGET``) summed over layers for every r;
    writes <results>/<model>/alloc/front_w5a5.json."""
    start = time.perf_counter()
    fronts = [pareto_front(p.loss, p.time, p.bits, p.size, plan.FRONT_BUDGET, labels=p.labels) for p in problems]
    seconds = time.perf_counter() - start
    grid = sorted(set(np.round(np.linspace(0, 1, 41), 4)) | set(plan.R_FRONT))
    curve = [(sum(f.pick(r).L for f in fronts), sum(f.pick(r).T for f in fronts)) for r in grid]
    picks = {r: (sum(f.pick(r).L for f in fronts), sum(f.pick(r).T for f in fronts)) for r in plan.R_FRONT}
    doc = {
        "model": model,
        "scheme_set": plan.FRONT_SCHEME_SET,
        "budget_bits": plan.FRONT_BUDGET,
        "batch_tokens": batch_tokens,
        "gpu": gpu,
        "profile": profile,
        "kind": kind,
        "per_layer_points": [len(f.points) for f in fronts],
        "per_layer_solves": [f.solves for f in fronts],
        "front_seconds": seconds,
        "curve_r": grid,
        "curve": curve,
        "picks": {str(r): v for r, v in picks.items()},
    }
    write_json_atomic(results_dir() / model / "alloc" / "front_w5a5.json", doc)
    return FrontResult(grid, curve, picks, doc)


def write_table7(model: str, setting: str, layer: int, table: dict, profile: str, kind: str) -> Path:
    """<results>/<model>/alloc/table7.json: one layer's scheme per (expert, block) of an allocation."""
    return write_json_atomic(
        results_dir() / model / "alloc" / "table7.json",
        {"setting": setting, "layer": int(layer), "map": table, "profile": profile, "kind": kind},
    )


def sweep_setting(r: float, budget_bits: float = plan.FRONT_BUDGET, schemes: str = plan.FRONT_SCHEME_SET) -> str:
    """The allocation name of one r of the sweep, e.g. 'w5a5-b5-r0.25'."""
    return f"{schemes}-b{budget_bits:g}-r{r:g}"


def r_sweep_allocations(
    model: str,
    rs=plan.R_SWEEP,
    budget_bits: float = plan.FRONT_BUDGET,
    schemes: str = plan.FRONT_SCHEME_SET,
    batch_tokens: int = plan.ALLOCATION_BATCH,
    gpu: str = plan.ALLOCATION_GPU,
    method: str = plan.ALLOCATION_METHOD,
    profile: str = "",
) -> dict:
    """Allocations for several r from one Pareto front per layer: {r: (setting, scheme map, allocation doc)}.

    Each is written to <results>/<model>/alloc/<schemes>-b<budget>-r<r>.json.
    """
    problems = layer_problems(
        model,
        schemes,
        method=method,
        batch_tokens=batch_tokens,
        gpu=gpu,
        routing=routing_profile(model),
        dims=model_shape(model),
    )
    fronts = [pareto_front(p.loss, p.time, p.bits, p.size, budget_bits, labels=p.labels) for p in problems]
    out = {}
    for r in rs:
        choices = [f.pick(r).choice for f in fronts]
        setting = sweep_setting(r, budget_bits, schemes)
        doc = allocation_doc(
            problems, choices, setting, r, budget_bits, profile=profile, solve_seconds=sum(f.seconds for f in fronts)
        )
        write_allocation(doc)
        out[r] = (setting, scheme_map(problems, choices), doc)
    return out


def allocation_inputs(
    profile,
    method: str = plan.ALLOCATION_METHOD,
    batch_tokens: int = plan.ALLOCATION_BATCH,
    gpu: str = plan.ALLOCATION_GPU,
    corpus: str = plan.ALLOCATION_CORPUS,
) -> "tuple[dict, dict, str]":
    """The layer problems of ``profile.model`` for every scheme set of ``plan.ALLOCATIONS``, its routing and the
    sensitivity method used: (problems by scheme set, routing report, method).

    Stages 01 and 02 provide sensitivity and routing; the smoke profile's tiny random model has none
    committed, so it computes RTN sensitivity and routing on random token ids here (seconds; numbers mean nothing).
    """
    sensitivity = dims = None
    if profile.name == "smoke":
        method = "rtn"
        net, tok = load_model(profile.model)
        windows = calibration(net, tok, profile)
        sensitivity = compute_sensitivity(net, windows, scheme_set("hopper"), "rtn", progress=False)
        routing = routing_report(net, windows, batches=(batch_tokens,))
        routing["params"] = {"model": profile.model, "corpus": "random", "windows": list(windows.shape)}
        dims = model_dims(net)
    else:
        routing = json.loads(newest_result(profile.model, "routing", f"{corpus}_").read_text())
    problems = {
        s: layer_problems(
            profile.model,
            s,
            method=method,
            batch_tokens=batch_tokens,
            gpu=gpu,
            sensitivity=sensitivity,
            routing=routing,
            dims=dims,
            corpus=corpus,
        )
        for s in dict.fromkeys(a.scheme_set for a in plan.ALLOCATIONS)
    }
    return problems, routing, method
