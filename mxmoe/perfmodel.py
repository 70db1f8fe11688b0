"""Performance model: time of linear blocks in one mixed-precision grouped-GEMM launch.

A block (one expert's gate_up, or down, GEMM) of scheme ``s`` with ``M`` routed rows, output width
``N`` and input width ``K`` runs ``ceil(M / BM) * ceil(N / BN)`` output tiles, BM x BN being the tile
our kernel uses for ``s`` at the launch's rows per expert (``mxmoe.kernels.configs.default_config``).
All tiles of a launch share the GPU's SMs, so

    launch time = c0 + (sum over tiles of their per-tile cost) / SMs,   the sum at least one tile's cost;

the *wave effect*: a launch with fewer tiles than SMs still takes one whole tile time, and a
block alone takes ``max(tiles / SMs, 1)`` tile times. A block's additive *share* of a launch,
``tiles * cost / SMs``, is what the allocation ILP sums (the wave floor is not linear; it matters
only for launches of under one wave).

Per-tile cost ``u(s, tile, K)`` (µs of one SM per tile) and a fixed launch cost ``c0`` come from the
measured cost points of ``cost_tables/<gpu>.json``, in this order; every estimate carries its source:

1. ``"cost-table"`` — the points of the same scheme and tile shape (every model shape and token
   count measured with it) are fitted by non-negative least squares on relative error:
   ``ms = c0 + max(tiles / SMs, 1) · (a + b·K)``. Linear in K: ``a`` is the K-independent part of a
   tile (output write, prologue), ``b`` the K loop; between measured K this interpolates, beyond it
   extrapolates (the fit reports its K range). Fewer than three points, or one K: ``c0 = a = 0``
   and the cost is proportional to K.
2. ``"cost-table-scaled"`` — no point of that (scheme, tile): the nearest fitted (scheme, tile) of
   the same kernel path (bf16 / weight-only int / weight-activation int / fp8), its per-tile cost
   scaled by the ratio of the two tiles' roofline times. This is how w3/w2 g128, w8a16, w4a8 and
   w4a4 g128 get times, and the w4a8 fp8 schemes (scaled from w8a8 fp8, whose codes need no
   unpacking: an optimistic estimate) until a benchmark run measures them.
3. ``"predicted-roofline"`` — no table for the GPU (or no point on the path): the tile's roofline
   time, ``max(bytes / (bandwidth / SMs), flops / (peak / SMs))``, from the table's measured
   roofline or the vendor figures in ``VENDOR`` (declared, not measured).

``mxmoe.bench.validate`` compares predictions with measured mixed grouped GEMMs of a benchmark file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mxmoe.env import COST_TABLES
from mxmoe.errors import MxMoEError
from mxmoe.kernels.configs import TileConfig, default_config, kind_of
from mxmoe.kernels.version import kernel_fingerprint
from mxmoe.schemes import Scheme

SOURCES = ("cost-table", "cost-table-scaled", "predicted-roofline")
# Declared vendor figures (dense tensor-core peaks, HBM bandwidth): used only without a measured table.
VENDOR = {
    "nvidia_h100": {
        "device": "NVIDIA H100 SXM (vendor figures)",
        "multiprocessors": 132,
        "copy_GBps": 3350.0,
        "bf16_TFLOPs": 989.0,
        "int8_TOPs": 1979.0,
        "fp8_TFLOPs": 1979.0,
    },
    "nvidia_h200": {
        "device": "NVIDIA H200 SXM (vendor figures)",
        "multiprocessors": 132,
        "copy_GBps": 4800.0,
        "bf16_TFLOPs": 989.0,
        "int8_TOPs": 1979.0,
        "fp8_TFLOPs": 1979.0,
    },
}


@dataclass(frozen=True, eq=False)  # hashed by identity: cached per loaded table
class CostTable:
    """The measured cost points and roofline of one GPU (``cost_tables/<gpu>.json``), or vendor figures only."""

    gpu: str
    device: str
    sms: int
    roofline: dict  # copy_GBps, bf16_TFLOPs, int8_TOPs, fp8_TFLOPs
    points: tuple  # cost-point dicts (scheme, K, N, tile, us_per_tile_per_sm, ...)
    measured: bool  # False: vendor figures, no cost points
    kernel: "str | None" = None  # fingerprint of the kernel the points were measured on (mxmoe.kernels.version)

    @property
    def kernel_note(self) -> "str | None":
        """None when the points were measured on the installed kernel (or there are none), else why not."""
        if not self.measured:
            return None
        if self.kernel == kernel_fingerprint():
            return None
        commits = sorted({p.get("kernel_commit") for p in self.points} - {None})
        what = (
            f"kernel commit(s) {', '.join(commits)} (recorded before kernels were fingerprinted)"
            if self.kernel is None
            else "several kernels"
            if self.kernel == "mixed"
            else f"kernel {self.kernel}"
        )
        return (
            f"cost table {self.gpu} was measured on {what}, not the installed kernel {kernel_fingerprint()}: "
            f"its times describe that kernel; re-measure with `mxmoe bench gemm --out results/kernels "
            f"--table-dir cost_tables` on this GPU"
        )


@dataclass(frozen=True)
class Estimate:
    """A predicted time (ms) and where it came from (one of SOURCES)."""

    ms: float
    source: str
    tiles: int


def gpu_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' / 'h100' / 'nvidia_h100' -> 'nvidia_h100' (the cost_tables/<gpu>.json stem)."""
    low = name.lower()
    for chip in ("h200", "h100"):
        if chip in low:
            return f"nvidia_{chip}"
    return low.replace(" ", "_")


@lru_cache(maxsize=None)
def load_table(gpu: str = "nvidia_h100", tables_dir: "str | None" = None) -> CostTable:
    """The cost table of ``gpu`` from cost_tables/<gpu>.json (or ``tables_dir``), else its vendor figures.

    Raises MxMoEError for a GPU with neither, naming the tables and vendor entries there are.
    """
    key = gpu_key(gpu)
    folder = Path(tables_dir) if tables_dir else COST_TABLES
    path = folder / f"{key}.json"
    if path.exists():
        return read_table(path)
    if key in VENDOR:
        v = VENDOR[key]
        return CostTable(key, v["device"], v["multiprocessors"], dict(v), (), False)
    have = sorted(p.stem for p in folder.glob("*.json"))
    raise MxMoEError(
        f"no cost table {path} and no vendor figures for GPU {gpu!r}; tables: {have}, "
        f"vendor entries: {sorted(VENDOR)}; add a roofline with roofline_table(...)"
    )


def read_table(path: "str | Path") -> CostTable:
    """The cost table in one ``cost_tables/<gpu>.json``-format file (``mxmoe.bench.cost_table``)."""
    doc = json.loads(Path(path).read_text())
    sms = int(doc["provenance"][-1]["multiprocessors"])
    key = gpu_key(doc["device"])
    return CostTable(key, doc["device"], sms, dict(doc["roofline"]), tuple(doc["cost_points"]), True, doc.get("kernel"))


def roofline_table(
    gpu: str, sms: int, copy_GBps: float, bf16_TFLOPs: float, int8_TOPs: float, fp8_TFLOPs: float
) -> CostTable:
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
    """The tile configuration cost point ``p`` was timed with."""
    return TileConfig(**p["tile"])  # fields a table predates take their defaults


@dataclass(frozen=True)
class TileFit:
    """Launch time of one (scheme, tile shape) from its cost points: ms = c0 + waves · (a + b·K) / 1000."""

    c0_ms: float  # launch overhead and latency, independent of the work
    a_us: float  # per-tile µs independent of K (output write, prologue)
    b_us: float  # per-tile µs per unit of K
    points: int
    k_range: tuple


def fit_points(points: list, sms: int) -> TileFit:
    """Non-negative least squares of measured launch times on [1, waves, waves·K], waves = max(tiles / SMs, 1).

    Relative errors are minimised (small launches count as much as large ones). The wave floor is in
    the fit: a launch with fewer tiles than SMs costs one tile time. With fewer than three points or
    one K, the overhead is 0 and the per-tile cost is proportional to K (mean µs per K).
    """
    from scipy.optimize import nnls

    ks = np.array([p["K"] for p in points], dtype=float)  # [n]
    waves = np.maximum(np.array([p["tiles"] for p in points], dtype=float) / sms, 1.0)  # [n]
    ms = np.array([p["ms"] for p in points])  # [n]
    if len(points) < 3 or len(set(ks)) < 2:
        return TileFit(0.0, 0.0, float(np.mean(ms * 1e3 / waves / ks)), len(points), (ks.min(), ks.max()))
    x = np.stack([np.ones_like(ks), waves * 1e-3, waves * ks * 1e-3], 1)  # [n, 3] ms per unit of each coefficient
    coef, _ = nnls(x / ms[:, None], np.ones_like(ms))
    return TileFit(float(coef[0]), float(coef[1]), float(coef[2]), len(points), (ks.min(), ks.max()))


@lru_cache(maxsize=None)
def table_fits(table: CostTable) -> dict:
    """{(scheme string, BM, BN): TileFit} over the table's cost points."""
    groups: dict = {}
    for p in table.points:
        t = _tile_of(p)
        groups.setdefault((str(Scheme.parse(p["scheme"])), t.bm, t.bn), []).append(p)
    return {key: fit_points(pts, table.sms) for key, pts in groups.items()}


@lru_cache(maxsize=4096)
def tile_fit(s: Scheme, tile: TileConfig, table: CostTable) -> tuple:
    """(fit, factor, source): the fit that times scheme ``s`` with ``tile`` and a factor for its per-tile cost."""
    fits = table_fits(table)
    key = (str(s), tile.bm, tile.bn)
    if key in fits:
        return fits[key], 1.0, "cost-table"
    path = kind_of(s)
    same_path = [k for k in fits if kind_of(Scheme.parse(k[0])) == path]
    if not same_path:
        return TileFit(0.0, 0.0, 0.0, 0, (0, 0)), 1.0, "predicted-roofline"

    def distance(k: tuple) -> tuple:
        ks = Scheme.parse(k[0])
        return (
            ks != s,
            abs(math.log2(k[1] * k[2] / (tile.bm * tile.bn))),
            abs(ks.bits_per_weight - s.bits_per_weight),
            -fits[k].points,
        )

    ref = min(same_path, key=distance)
    ref_k = int(np.mean(fits[ref].k_range))
    ratio = roofline_tile_us(s, tile, ref_k, table) / roofline_tile_us(
        Scheme.parse(ref[0]), TileConfig(ref[1], ref[2], tile.bk), ref_k, table
    )
    return fits[ref], ratio, "cost-table-scaled"


def tile_cost(s: Scheme, tile: TileConfig, k: int, table: CostTable) -> tuple:
    """(µs per tile on one SM, source) for scheme ``s`` with ``tile`` over input width ``k``."""
    fit, factor, source = tile_fit(s, tile, table)
    if source == "predicted-roofline":
        return roofline_tile_us(s, tile, k, table), source
    return (fit.a_us + fit.b_us * k) * factor, source


def tiles_of(rows: int, n: int, tile: TileConfig) -> int:
    """Output tiles of one block: ceil(rows / BM) * ceil(N / BN) (0 for an expert without rows)."""
    return -(-int(rows) // tile.bm) * -(-int(n) // tile.bn)


def block_time(
    s: "Scheme | str",
    rows: int,
    n: int,
    k: int,
    table: CostTable,
    rows_per_expert: "float | None" = None,
    standalone: bool = False,
) -> Estimate:
    """Time (ms) of one block of ``rows`` routed tokens, output width ``n``, input width ``k``.

    The tile is the kernel's default for ``rows_per_expert`` (the launch's mean rows per expert;
    default ``rows``). ``standalone=False``: the block's additive share of a launch (tiles x cost / SMs,
    what the ILP sums); ``True``: the block alone in a launch, with the wave floor of one tile time.
    Either way the launch's fixed cost is not included (``launch_time`` adds it once per launch).
    """
    s = Scheme.parse(s)
    tile = default_config(s, rows if rows_per_expert is None else rows_per_expert)
    us, source = tile_cost(s, tile, int(k), table)
    tiles = tiles_of(rows, n, tile)
    waves = tiles / table.sms
    if standalone and tiles:
        waves = max(waves, 1.0)
    return Estimate(waves * us / 1e3, source, tiles)


def launch_overhead(blocks: list, table: CostTable) -> float:
    """Fixed ms of a launch (overhead, latency): the largest fitted c0 among the launch's schemes."""
    mean_rows = sum(b[1] for b in blocks) / max(len(blocks), 1)
    fits = [tile_fit(s, default_config(s, mean_rows), table) for s in {Scheme.parse(b[0]) for b in blocks}]
    return max((f.c0_ms for f, _, source in fits if source != "predicted-roofline"), default=0.0)


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
    ms += launch_overhead(blocks, table)
    source = max((p.source for p in parts), key=SOURCES.index, default="cost-table")
    return Estimate(ms, source, sum(p.tiles for p in parts))
