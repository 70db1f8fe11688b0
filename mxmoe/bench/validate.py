"""How well the performance model predicts measured grouped GEMMs (chapter 04's validation table).

The cost table holds uniform-scheme points only, so the benchmark's mixed launches are out of sample;
``holdout=True`` also removes the points of the case's own shape.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from mxmoe.bench.cases import MIXES, MODELS, UNIFORM, expert_loads
from mxmoe.perfmodel import CostTable, launch_time


@lru_cache(maxsize=64)
def _without_case(table: CostTable, model: str, gemm: str) -> CostTable:
    """``table`` without the cost points measured on one (model, GEMM) case."""
    keep = tuple(p for p in table.points if (p.get("model"), p.get("gemm")) != (model, gemm))
    return CostTable(table.gpu, table.device, table.sms, table.roofline, keep, table.measured)


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
        cases.append({"model": r["model"], "gemm": r["gemm"], "tokens": r["tokens"], "variant": name,
                      "mixed": name in MIXES, "measured_ms": r["ms"], "predicted_ms": est.ms, "source": est.source,
                      "rel_err": (est.ms - r["ms"]) / r["ms"]})
    mixed = [abs(c["rel_err"]) for c in cases if c["mixed"]]
    uniform = [abs(c["rel_err"]) for c in cases if not c["mixed"]]
    return {"bench": str(bench_path), "device": doc["provenance"]["device"], "table": table.gpu, "holdout": holdout,
            "cases": cases,
            "mixed_median_abs_err": float(np.median(mixed)) if mixed else None,
            "mixed_max_abs_err": float(np.max(mixed)) if mixed else None,
            "uniform_median_abs_err": float(np.median(uniform)) if uniform else None,
            "n_mixed": len(mixed), "n_uniform": len(uniform)}
