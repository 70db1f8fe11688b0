"""Tile configurations per scheme: the kernel path a scheme takes, its tile shape, and its cost rank."""

from __future__ import annotations

from dataclasses import dataclass

from mxmoe.kernels import triton_kernel as tk
from mxmoe.kernels.pack import PACK_K
from mxmoe.schemes import Scheme


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of one scheme's path: BM rows x BN columns, K step BK, pipeline depth; ``swap_ab``
    (``swappable`` schemes) computes the transposed tile so the unpacked weight is the dot's A operand;
    ``warps``: the warps the tile is written for (None: as ``launch_warps`` sizes it by its outputs); ``tma``
    (bf16): x and weight tiles loaded by the tensor memory accelerator (descriptors made on the device)."""

    bm: int
    bn: int
    bk: int
    stages: int = 3
    swap_ab: bool = False
    warps: "int | None" = None
    tma: bool = False

    def as_dict(self) -> dict:
        """JSON form."""
        return {
            "bm": self.bm,
            "bn": self.bn,
            "bk": self.bk,
            "stages": self.stages,
            "swap_ab": self.swap_ab,
            "warps": self.warps,
            "tma": self.tma,
        }


def kind_of(s: Scheme) -> int:
    """The kernel path (triton_kernel.BF16 ... WA_FP8) that runs scheme ``s``."""
    if s.is_full_precision:
        return tk.BF16
    if s.weight_only:
        return tk.W_FP8 if s.fmt == "fp8" else tk.W_INT
    return tk.WA_FP8 if s.fmt == "fp8" else tk.WA_INT


def check_config(s: Scheme, c: TileConfig) -> None:
    """Raise ValueError when tile config ``c`` cannot run scheme ``s``."""
    for name, v in (("bm", c.bm), ("bn", c.bn), ("bk", c.bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile {name}={v} for '{s}' must be a power of two >= 16")
    if c.swap_ab and not swappable(s):
        raise ValueError(
            f"swap_ab is a path of weight-only packed schemes and fp8 ones with narrower codes, not of '{s}'"
        )
    if c.tma and kind_of(s) != tk.BF16:
        raise ValueError(f"tma is a path of bf16 weights, not of '{s}'")
    if not s.is_full_precision and c.bk != PACK_K:
        raise ValueError(f"tile bk={c.bk} for '{s}': packed weights are read in K blocks of {PACK_K}")


def swappable(s: Scheme) -> bool:
    """True when scheme ``s`` has a transposed-tile path (``swap_ab``): its weight is unpacked in registers and
    fed to the MMA from there (weight-only packed schemes; fp8 weight-activation schemes with codes under 8 bits)."""
    kind = kind_of(s)
    return kind in (tk.W_INT, tk.W_FP8) or (kind == tk.WA_FP8 and s.w_bits < 8)


def default_config(
    s: Scheme, rows_per_expert: float, interpret: bool = False, warps: "int | None" = None
) -> TileConfig:
    """Heuristic tile for scheme ``s`` when experts get ``rows_per_expert`` rows on average: the scheme's own
    choice (``warps`` None), one for a launch kept on one warpgroup (4), or for a launch of two (8: another
    slot's tile needs them, ``launch_warps``).

    Seeded from the first tile sweep on an H200, the swap-AB ablation and the H100 sweep of weight-activation
    tiles at 8192 tokens, and checked by the H200 sweep at 512 tokens (all in results/kernels/NOTES.md)."""
    kind = kind_of(s)
    if interpret:  # small tiles keep the CPU interpreter fast; blocks of 32 or more
        return TileConfig(32, 32, 64 if s.is_full_precision else PACK_K, 1, swap_ab=swappable(s))
    bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64 if rows_per_expert <= 64 else 128
    if kind == tk.BF16:
        # 128 x 256: 4 stages 2-4% faster than 3; loaded by TMA 0.97-1.18x as fast as by pointers at 8192 tokens (mean
        # 1.04x), where smaller tiles lose 1-3% by it (H100, results/kernels/NOTES.md)
        return TileConfig(bm, 256 if bm >= 128 else 128, 64, 4, tma=bm >= 128)
    if kind == tk.WA_FP8 and s.w_bits < 8:
        # e4m3 codes converted in registers feed the MMA as its A operand (one K=128 dot per block): tiles of
        # at most 64 tokens over one warpgroup, two CTAs per SM (grouped, whose blocks wait for their MMAs to
        # promote each partial sum: at 8192 tokens 1.26-1.30x the 128 x 128 tile over 8 warps, H100). Over 8
        # warps the 64-token tile is 1.8x slower: the 128 x 128 one there. The transposed 256-token tile over
        # 8 warps gives a wrong product on the GPU (results/kernels/NOTES.md). Per channel (no promotion per
        # K block) from 128 rows per expert: the transposed 128-token tile over one warpgroup (1.12-1.33x torch
        # fp8 at 8192 tokens where the 64-token one is 0.83-1.02x, H100).
        if bm >= 128 and warps == 8:
            return TileConfig(128, 128, PACK_K, 3)
        if bm >= 128 and s.group_size <= 0:
            return TileConfig(128, 128, PACK_K, 3, swap_ab=True, warps=4)
        return TileConfig(min(bm, 64), 128, PACK_K, 3, swap_ab=True)
    if kind in (tk.WA_INT, tk.WA_FP8):
        if bm < 128:
            return TileConfig(bm, 128, PACK_K, 3)
        if s.w_bits == 8 and warps == 4:
            # beside per-channel W4A8's one-warpgroup tile: a 4.25-bit fp8 mix at 8192 tokens 1.49-1.58x faster
            # than both slots on 8 warps; alone 1-5% slower than the 128 x 256 tile (H100)
            return TileConfig(128, 128, PACK_K, 3, warps=4)
        if s.w_bits == 8:  # codes go memory -> shared -> MMA: deep prefetch (4 x 48 KiB stages)
            return TileConfig(128, 256, PACK_K, 4)
        # narrower codes are unpacked in registers: tall tiles share each unpacked weight over more rows
        return TileConfig(256 if rows_per_expert > 256 else 128, 128, PACK_K, 3)
    return TileConfig(bm, 128, PACK_K, 3 if bm >= 64 else 4, swap_ab=True)  # unpacked weight as register A


def launch_warps(configs: "list[TileConfig]") -> int:
    """Warps of a launch (shared by all its slots): 8 (two warpgroups) when a tile is written for 8 or, not
    saying, has more than 64 x 128 outputs, else 4, so that two programs fit an SM and one unpacks while the
    other multiplies. (H100 sweep, results/kernels/NOTES.md.)"""
    return max(c.warps or (8 if c.bm * c.bn > 64 * 128 else 4) for c in configs)


def programs_per_sm(schemes: "list[Scheme]", configs: "list[TileConfig]") -> "tuple[int, int | None]":
    """(persistent programs per SM, register cap or None) of a launch. Weight-only launches of at most 4-bit
    codes fit more programs: 4 per SM with a 128-register cap when every tile is 16 rows (decode: w3a16 g128 1.11x,
    w4a16 g128 1.02x the 2-per-SM launch, H100), 3 when every tile is at most 32 rows (Qwen3-30B-A3B's 512-token
    tile: 1.04-1.14x); others keep 2, which is all that fits a bm-64 tile's 200-215 registers
    (`mxmoe bench occupancy`, results/kernels/NOTES.md)."""
    if all(s.weight_only and s.w_bits <= 4 for s in schemes):
        if all(c.bm == 16 for c in configs):
            return 4, 128
        if all(c.bm <= 32 for c in configs):
            return 3, None
    return 2, None


def tile_cost(s: Scheme, c: TileConfig, k: int) -> float:
    """Rough time of one full tile in bytes-equivalent (weight bytes + MMA work): orders the work list."""
    weight_bytes = c.bn * k * s.w_bits / 8
    flops = 2.0 * c.bm * c.bn * k
    return weight_bytes + flops / (263.0 if s.weight_only else 526.0)  # H100: 790 TFLOP/s bf16 over 3 TB/s
