"""Performance model: time of linear blocks in one mixed-precision grouped-GEMM launch.

A block (one expert's gate_up, or down, GEMM) of scheme ``s`` with ``M`` routed rows, output width
``N`` and input width ``K`` runs ``ceil(M / BM) * ceil(N / BN)`` output tiles, BM x BN being the tile
our kernel uses for ``s`` at the launch's rows per expert (``mxmoe.kernels.configs.default_config``).
All tiles of a launch share the GPU's SMs, so

    launch time = (sum over tiles of their per-tile cost) / SMs,   at least one tile's cost;

the *wave effect*: a launch with fewer tiles than SMs still takes one whole tile time, and a
block alone takes ``max(tiles / SMs, 1)`` tile times. A block's additive *share* of a launch,
``tiles * cost / SMs``, is what the allocation ILP sums (the wave floor is not linear; it matters
only for launches of under one wave).

Per-tile cost ``u(s, tile, K)`` (µs of one SM per tile) comes from the measured cost points of
``kernels/<gpu>.json`` (``us_per_tile_per_sm``), in this order; every estimate carries its source:

1. ``"cost-table"`` — points of the same scheme and tile shape. Over K the cost is linear,
   ``u = a + b K`` (least squares over the per-K means when two or more K were measured; the
   intercept is the K-independent part: output write, prologue). A fit with ``a < 0`` or ``b < 0``,
   or a single measured K, falls back to ``u ∝ K`` from the nearest measured K. Outside the
   measured K range this is an extrapolation (smollm2-moe's K = 32 / 576 are far below 1408).
2. ``"cost-table-scaled"`` — no point of that (scheme, tile): the nearest measured (scheme, tile) of
   the same kernel path (bf16 / weight-only int / weight-activation int / fp8), scaled by the ratio
   of the two tiles' roofline times. This is how w3/w2 g128, w8a16, w4a8 and w4a4 g128 get times.
3. ``"predicted-roofline"`` — no table for the GPU (or no point on the path): the tile's roofline
   time, ``max(bytes / (bandwidth / SMs), flops / (peak / SMs))``, from the table's measured
   roofline or the vendor figures in ``VENDOR`` (declared, not measured).

``validate`` compares predictions with measured mixed grouped GEMMs from a benchmark file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mxmoe.errors import MxMoEError
from mxmoe.kernels.configs import TileConfig, default_config, kind_of
from mxmoe.paths import REPO_ROOT
from mxmoe.schemes import Scheme

SOURCES = ("cost-table", "cost-table-scaled", "predicted-roofline")
# Declared vendor figures (dense tensor-core peaks, HBM bandwidth): used only without a measured table.
VENDOR = {
    "nvidia_h100": {"device": "NVIDIA H100 SXM (vendor figures)", "multiprocessors": 132, "copy_GBps": 3350.0,
                    "bf16_TFLOPs": 989.0, "int8_TOPs": 1979.0, "fp8_TFLOPs": 1979.0},
    "nvidia_h200": {"device": "NVIDIA H200 SXM (vendor figures)", "multiprocessors": 132, "copy_GBps": 4800.0,
                    "bf16_TFLOPs": 989.0, "int8_TOPs": 1979.0, "fp8_TFLOPs": 1979.0},
}


@dataclass(frozen=True, eq=False)  # hashed by identity: cached per loaded table
class CostTable:
    """The measured cost points and roofline of one GPU (``kernels/<gpu>.json``), or vendor figures only."""

    gpu: str
    device: str
    sms: int
    roofline: dict  # copy_GBps, bf16_TFLOPs, int8_TOPs, fp8_TFLOPs
    points: tuple  # cost-point dicts (scheme, K, N, tile, us_per_tile_per_sm, ...)
    measured: bool  # False: vendor figures, no cost points


@dataclass(frozen=True)
class Estimate:
    """A predicted time (ms) and where it came from (one of SOURCES)."""

    ms: float
    source: str
    tiles: int


def gpu_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' / 'h100' / 'nvidia_h100' -> 'nvidia_h100' (the kernels/<gpu>.json stem)."""
    low = name.lower()
    for chip in ("h200", "h100"):
        if chip in low:
            return f"nvidia_{chip}"
    return low.replace(" ", "_")


@lru_cache(maxsize=None)
def load_table(gpu: str = "nvidia_h100", kernels_dir: "str | None" = None) -> CostTable:
    """The cost table of ``gpu`` from kernels/<gpu>.json, else its vendor figures (no cost points).

    Raises MxMoEError for a GPU with neither, naming the tables and vendor entries there are.
    """
    key = gpu_key(gpu)
    folder = Path(kernels_dir) if kernels_dir else REPO_ROOT / "kernels"
    path = folder / f"{key}.json"
    if path.exists():
        doc = json.loads(path.read_text())
        sms = int(doc["provenance"][-1]["multiprocessors"])
        return CostTable(key, doc["device"], sms, dict(doc["roofline"]), tuple(doc["cost_points"]), True)
    if key in VENDOR:
        v = VENDOR[key]
        return CostTable(key, v["device"], v["multiprocessors"], dict(v), (), False)
    have = sorted(p.stem for p in folder.glob("*.json"))
    raise MxMoEError(f"no cost table {path} and no vendor figures for GPU {gpu!r}; tables: {have}, "
                     f"vendor entries: {sorted(VENDOR)}; add a roofline with roofline_table(...)")


def roofline_table(gpu: str, sms: int, copy_GBps: float, bf16_TFLOPs: float, int8_TOPs: float,
                   fp8_TFLOPs: float) -> CostTable:
    """A table with declared roofline figures only, for a GPU without measurements (predictions only)."""
    roof = {"copy_GBps": copy_GBps, "bf16_TFLOPs": bf16_TFLOPs, "int8_TOPs": int8_TOPs, "fp8_TFLOPs": fp8_TFLOPs}
    return CostTable(gpu_key(gpu), gpu, sms, roof, (), False)


def _peak_tflops(s: Scheme, roof: dict) -> float:
    """Matmul rate of the unit a scheme's dot runs on (4-bit activations compute at int8 rate on Hopper)."""
    if s.weight_only:
        return roof["bf16_TFLOPs"]
    return roof["fp8_TFLOPs"] if s.fmt == "fp8" else roof["int8_TOPs"]


def roofline_tile_us(s: Scheme, tile: TileConfig, k: int, table: CostTable) -> float:
    """Roofline time (µs) of one full BM x BN tile over K on one SM: max(bytes / BW_SM, flops / peak_SM)."""
    a_bytes = 2.0 if s.weight_only else s.a_bits / 8
    nbytes = tile.bn * k * s.bits_per_weight / 8 + tile.bm * k * a_bytes + tile.bm * tile.bn * 2  # weights, x, y
    flops = 2.0 * tile.bm * tile.bn * k
    bw = table.roofline["copy_GBps"] * 1e9 / table.sms  # bytes/s per SM
    peak = _peak_tflops(s, table.roofline) * 1e12 / table.sms
    return max(nbytes / bw, flops / peak) * 1e6


def _tile_of(p: dict) -> TileConfig:
    t = p["tile"]
    return TileConfig(t["bm"], t["bn"], t["bk"], t.get("stages", 3), t.get("swap_ab", False))


def _same_shape(a: TileConfig, b: TileConfig) -> bool:
    return (a.bm, a.bn) == (b.bm, b.bn)


def _fit_over_k(points: list, k: int) -> float:
    """Per-tile µs at ``k`` from points of one (scheme, tile): linear in K, or proportional (see module doc)."""
    by_k: dict = {}
    for p in points:
        by_k.setdefault(p["K"], []).append(p["us_per_tile_per_sm"])
    ks = np.array(sorted(by_k), dtype=float)  # [n_k]
    us = np.array([np.mean(by_k[x]) for x in sorted(by_k)])  # [n_k]
    if len(ks) >= 2:
        b, a = np.polyfit(ks, us, 1)
        if a >= 0 and b >= 0:
            return float(a + b * k)
    near = int(np.argmin(np.abs(ks - k)))
    return float(us[near] * k / ks[near])


@lru_cache(maxsize=4096)
def tile_cost(s: Scheme, tile: TileConfig, k: int, table: CostTable) -> tuple[float, str]:
    """(µs per tile on one SM, source) for scheme ``s`` with ``tile`` over input width ``k``."""
    pts = [p for p in table.points if Scheme.parse(p["scheme"]) == s and _same_shape(_tile_of(p), tile)]
    if pts:
        return _fit_over_k(pts, k), "cost-table"
    path = kind_of(s)
    same_path = [p for p in table.points if kind_of(Scheme.parse(p["scheme"])) == path]
    if not same_path:
        return roofline_tile_us(s, tile, k, table), "predicted-roofline"

    def distance(p: dict) -> tuple:
        ps, pt = Scheme.parse(p["scheme"]), _tile_of(p)
        return (ps != s, abs(math.log2(pt.bm * pt.bn / (tile.bm * tile.bn))), abs(ps.bits_per_weight - s.bits_per_weight))

    best = min(same_path, key=distance)
    ref_s, ref_tile = Scheme.parse(best["scheme"]), _tile_of(best)
    ref_pts = [p for p in same_path if p["scheme"] == best["scheme"] and _same_shape(_tile_of(p), ref_tile)]
    ratio = roofline_tile_us(s, tile, k, table) / roofline_tile_us(ref_s, ref_tile, k, table)
    return _fit_over_k(ref_pts, k) * ratio, "cost-table-scaled"


def tiles_of(rows: int, n: int, tile: TileConfig) -> int:
    """Output tiles of one block: ceil(rows / BM) * ceil(N / BN) (0 for an expert without rows)."""
    return -(-int(rows) // tile.bm) * -(-int(n) // tile.bn)


def block_time(s: "Scheme | str", rows: int, n: int, k: int, table: CostTable, rows_per_expert: "float | None" = None,
               standalone: bool = False) -> Estimate:
    """Time (ms) of one block of ``rows`` routed tokens, output width ``n``, input width ``k``.

    The tile is the kernel's default for ``rows_per_expert`` (the launch's mean rows per expert;
    default ``rows``). ``standalone=False``: the block's additive share of a launch (tiles x cost / SMs,
    what the ILP sums); ``True``: the block alone in a launch, with the wave floor of one tile time.
    """
    s = Scheme.parse(s)
    tile = default_config(s, rows if rows_per_expert is None else rows_per_expert)
    us, source = tile_cost(s, tile, int(k), table)
    tiles = tiles_of(rows, n, tile)
    waves = tiles / table.sms
    if standalone and tiles:
        waves = max(waves, 1.0)
    return Estimate(waves * us / 1e3, source, tiles)


def launch_time(blocks: list, table: CostTable) -> Estimate:
    """Time (ms) of one grouped-GEMM launch of ``blocks`` = [(scheme, rows, N, K), ...] (one per expert).

    Tiles are chosen at the launch's mean rows per expert, as ``group_gemm`` does; the wave floor applies
    to the whole launch. The source is the least measured one among the blocks.
    """
    mean_rows = sum(b[1] for b in blocks) / max(len(blocks), 1)
    parts = [block_time(s, m, n, k, table, rows_per_expert=mean_rows) for s, m, n, k in blocks]
    ms = sum(p.ms for p in parts)
    busy = [p for p in parts if p.tiles]
    if busy:  # wave floor: never faster than the slowest single tile
        ms = max(ms, max(p.ms / p.tiles * table.sms for p in busy))
    source = max((p.source for p in parts), key=SOURCES.index, default="cost-table")
    return Estimate(ms, source, sum(p.tiles for p in parts))


@lru_cache(maxsize=64)
def _without_case(table: CostTable, model: str, gemm: str) -> CostTable:
    """``table`` without the cost points measured on one (model, GEMM) case."""
    keep = tuple(p for p in table.points if (p.get("model"), p.get("gemm")) != (model, gemm))
    return CostTable(table.gpu, table.device, table.sms, table.roofline, keep, table.measured)


def validate(bench_path: "str | Path", table: CostTable, holdout: bool = False) -> dict:
    """Predicted vs measured time of the fused grouped GEMMs in a benchmark file (``mxmoe.kernels.bench``).

    Mixed launches (``ours_mix*``) are the test: the table holds uniform-scheme points only, so their
    mixing is out of sample. Uniform launches are reported apart. ``holdout=True`` predicts each case
    from a table without the points of its own (model, GEMM), so shapes are out of sample too.
    Returns {"cases": [...], "mixed_median_abs_err", "uniform_median_abs_err", ...}.
    """
    from mxmoe.kernels.bench import MIXES, MODELS, UNIFORM, expert_loads

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
