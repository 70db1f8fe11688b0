"""Tile-shape search per scheme and rows-per-expert class on the GPU at hand.

``sweep`` times candidate tile configs (and warp counts) of one scheme on one grouped-GEMM case
and returns every timing; the benchmark runs it under a time budget and records the results, and
``best_configs`` reduces them to the table that ``configs.default_config`` can be given.
"""

from __future__ import annotations

import time

import torch

from mxmoe.bench.timing import events_ms
from mxmoe.kernels.configs import TileConfig, check_config
from mxmoe.kernels.group_gemm import ExpertGroup, group_gemm, quantize_activations
from mxmoe.schemes import Scheme

# (bm, bn, bk, stages, num_warps): memory-bound (few rows per expert) and compute-bound candidates
# (bk applies to bf16 only: packed weights are read in K blocks of 128)
SMALL = [
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 256, 64, 3, 4),
    (32, 128, 128, 4, 4),
    (64, 128, 64, 4, 8),
    (64, 128, 128, 3, 8),
    (64, 256, 64, 3, 8),
]
LARGE = [(128, 128, 128, 3, 8), (128, 256, 64, 3, 8), (128, 256, 128, 2, 8), (64, 256, 64, 4, 8)]


def rows_class(rows_per_expert: float) -> str:
    """Shape class of a launch by average rows per expert: 'le16', 'le32', 'le64' or 'gt64'."""
    for limit in (16, 32, 64):
        if rows_per_expert <= limit:
            return f"le{limit}"
    return "gt64"


def sweep(
    x: torch.Tensor, offsets: torch.Tensor, group: ExpertGroup, scheme: Scheme, candidates, deadline: float
) -> list[dict]:
    """Time ``group_gemm`` with each candidate config for ``scheme`` until ``deadline`` (time.time())."""
    out, seen = [], set()
    x_q = quantize_activations(x, offsets, group)
    for bm, bn, bk, st, nw in candidates:
        if (bm, bn, bk if scheme.is_full_precision else 128, st, nw) in seen:
            continue
        seen.add((bm, bn, bk if scheme.is_full_precision else 128, st, nw))
        if time.time() > deadline:
            break
        cfg = TileConfig(bm, bn, bk if scheme.is_full_precision else 128, st)
        try:
            check_config(scheme, cfg)
        except ValueError:
            continue
        fn = lambda: group_gemm(x, offsets, group, x_q=x_q, configs={scheme: cfg}, num_warps=nw, validate=False)  # noqa: E731
        t0 = time.time()
        try:
            fn()
            ms = events_ms(fn, warmup_ms=10, rep_ms=50)
        except RuntimeError as err:  # e.g. out of shared memory for this tile
            out.append({"config": cfg.as_dict(), "num_warps": nw, "error": str(err).splitlines()[0][:200]})
            continue
        out.append(
            {"config": cfg.as_dict(), "num_warps": nw, "ms": ms, "compile_and_time_s": round(time.time() - t0, 1)}
        )
    return out


def best_configs(tuning: list[dict]) -> dict:
    """{scheme: {rows class: {config, num_warps, ms}}} from sweep records with scheme/class keys."""
    best: dict = {}
    for rec in tuning:
        ok = [r for r in rec["timings"] if "ms" in r]
        if ok:
            top = min(ok, key=lambda r: r["ms"])
            best.setdefault(rec["scheme"], {})[rec["rows_class"]] = {**top, "case": rec["case"]}
    return best
