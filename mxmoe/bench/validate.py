"""How well the performance model predicts measured grouped GEMMs (chapter 04's validation table).

The cost table holds uniform-scheme points only, so the benchmark's mixed launches are out of sample;
``holdout=True`` also removes the points of the case's own shape.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from mxmoe.bench.cases import MIXES, MODELS, UNIFORM, expert_loads
from mxmoe.env import COST_TABLES
from mxmoe.perfmodel import CostTable, gpu_key, launch_time, load_table


@lru_cache(maxsize=64)
def _without_case(table: CostTable, model: str, gemm: str) -> CostTable:
    """``table`` without the cost points measured on one (model, GEMM) case."""
    keep = tuple(p for p in table.points if (p.get("model"), p.get("gemm")) != (model, gemm))
    return dataclasses.replace(table, points=keep)


def validate(bench_path: "str | Path", table: CostTable, holdout: bool = False) -> dict:
    """Predicted vs measured time of the fused grouped GEMMs in a benchmark file (``mxmoe.bench.gemm``).

    Mixed launches (``ours_mix*``) are the test: the table holds uniform-scheme points only, so their
    mixing is out of sample. Uniform launches are reported apart. ``holdout=True`` predicts each case
    from a table without the points of its own (model, GEMM), so shapes are out of sample too.
    Returns {"cases": [...], "mixed_median_abs_err", "uniform_median_abs_err", ...}.
    """
    doc = json.loads(Path(bench_path).read_text())
    cases = []
    for r in doc["results"]:
        name = r["variant"].removeprefix("ours_")
        if not r["variant"].startswith("ours_") or "ms" not in r or r.get("mode", "fused") != "fused":
            continue
        if name not in UNIFORM and name not in MIXES:
            continue
        e, top_k = r["experts"], MODELS[r["model"]][3]
        rows = expert_loads(r["tokens"], e, top_k)
        if name in UNIFORM:
            schemes = [UNIFORM[name]] * e
        else:
            hot, cold, frac = MIXES[name]
            order = sorted(range(e), key=lambda i: -rows[i])
            hot_set = set(order[: max(1, round(frac * e))])
            schemes = [hot if i in hot_set else cold for i in range(e)]
        used = _without_case(table, r["model"], r["gemm"]) if holdout else table
        est = launch_time([(s, m, r["N"], r["K"]) for s, m in zip(schemes, rows)], used)
        cases.append(
            {
                "model": r["model"],
                "gemm": r["gemm"],
                "tokens": r["tokens"],
                "variant": name,
                "mixed": name in MIXES,
                "measured_ms": r["ms"],
                "predicted_ms": est.ms,
                "source": est.source,
                "rel_err": (est.ms - r["ms"]) / r["ms"],
            }
        )
    mixed = [abs(c["rel_err"]) for c in cases if c["mixed"]]
    uniform = [abs(c["rel_err"]) for c in cases if not c["mixed"]]
    return {
        "bench": Path(bench_path).name,
        "device": doc["provenance"]["device"],
        "table": table.gpu,
        "holdout": holdout,
        "cases": cases,
        "mixed_median_abs_err": float(np.median(mixed)) if mixed else None,
        "mixed_max_abs_err": float(np.max(mixed)) if mixed else None,
        "uniform_median_abs_err": float(np.median(uniform)) if uniform else None,
        "n_mixed": len(mixed),
        "n_uniform": len(uniform),
    }


def validation_report(gpu: str, repo_root: Path) -> dict:
    """The model's error on the benchmark runs its cost table was built from (``sources`` of
    cost_tables/<gpu>.json), all cases and shape-held-out: the same inputs give the same report.

    Returns {"median_abs_rel_error", "definition", "table", "device", "table_sources", "per_file"}.
    """
    table = load_table(gpu)
    sources = json.loads((COST_TABLES / f"{gpu_key(gpu)}.json").read_text())["sources"]
    per_file, errors = {}, []
    for rel in sources:
        path = repo_root / rel
        v, vh = validate(path, table), validate(path, table, holdout=True)
        if not v["n_mixed"]:
            continue
        drop = ("cases", "bench")
        per_file[Path(rel).name] = {
            "all": {k: x for k, x in v.items() if k not in drop},
            "holdout": {k: x for k, x in vh.items() if k not in drop},
            "cases": v["cases"],
        }
        errors += [abs(c["rel_err"]) for c in v["cases"] if c["mixed"]]
    return {
        "median_abs_rel_error": float(np.median(errors)) if errors else None,
        "definition": "median |predicted/measured - 1| over the mixed fused grouped GEMMs of the benchmark "
        "files the cost table was built from",
        "table": table.gpu,
        "device": table.device,
        "table_sources": [Path(s).name for s in sources],
        "per_file": per_file,
    }
