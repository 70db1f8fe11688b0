"""``group_gemm``: checks the inputs, builds the work-list metadata, launches the kernel (once by default)."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import triton
from triton.runtime import _allocation

from mxmoe.env import device_guard
from mxmoe.kernels import triton_kernel as tk
from mxmoe.kernels.act_quant import QuantizedRows, quantize_rows
from mxmoe.kernels.configs import (
    TileConfig,
    check_config,
    default_config,
    kind_of,
    launch_warps,
    programs_per_sm,
    tile_cost,
)
from mxmoe.kernels.pack import PACK_K, PackedWeight, paired_scales, storage_bytes
from mxmoe.schemes import HOPPER_SCHEMES, Scheme

# triton.jit chose interpreter or compiler when triton_kernel was imported; follow the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODES = ("fused", "per_scheme", "unified")  # see group_gemm


class ExpertGroup:
    """The experts of one grouped GEMM, ready to launch: device addresses of every expert's storage.

    Build once per layer and reuse; passing a plain list to ``group_gemm`` builds one per call.
    """

    def __init__(self, packed: "list[PackedWeight]"):
        if not packed:
            raise ValueError("group_gemm needs at least one expert")
        for e, pw in enumerate(packed):
            if not isinstance(pw, PackedWeight):
                raise ValueError(
                    f"expert {e}: expected a PackedWeight from mxmoe.kernels.pack, got {type(pw).__name__}"
                )
        n, k, dev = packed[0].n, packed[0].k, packed[0].device
        for e, pw in enumerate(packed):
            if (pw.n, pw.k) != (n, k):
                raise ValueError(
                    f"expert {e} has weight [N={pw.n}, K={pw.k}], expert 0 has [N={n}, K={k}]: "
                    "all experts of one grouped GEMM must share N and K"
                )
            if pw.device != dev:
                raise ValueError(f"expert {e} is on {pw.device}, expert 0 on {dev}")
            if any(t is not None and t.data_ptr() % 16 for t in (pw.data, pw.scale, pw.zero)):
                raise ValueError(
                    f"expert {e}: storage must start on a 16-byte boundary (the kernel loads 16 bytes at once)"
                )
            _check_storage(e, pw)
        self.packed = list(packed)
        self.n, self.k, self.device = n, k, dev
        self.k_pad = -(-k // 128) * 128
        self.schemes = tuple(dict.fromkeys(pw.scheme for pw in packed))  # distinct, first-seen order
        addr = [
            [pw.data.data_ptr(), *(t.data_ptr() if t is not None else 0 for t in (pw.scale, pw.zero))] for pw in packed
        ]
        self.addr = torch.tensor(addr, dtype=torch.int64, device=dev)  # [E, 3]
        self.act_schemes = tuple(s for s in self.schemes if not s.weight_only)  # activation quantizers
        self.act_slot = torch.tensor(
            [self.act_schemes.index(pw.scheme) if not pw.scheme.weight_only else -1 for pw in packed],
            dtype=torch.int32,
            device=dev,
        )  # [E]
        self._sched: dict[tuple, torch.Tensor] = {}
        self._launches: "OrderedDict[tuple, list[Launch]]" = OrderedDict()
        self._device_checked = False

    def __len__(self) -> int:
        return len(self.packed)

    def schedule(self, slots: "tuple[Scheme, ...]", only: bool = False) -> torch.Tensor:
        """[E, 2] int32 (expert, slot) with experts of earlier (heavier) slots first; ``only``: just the
        experts whose scheme is in ``slots`` (a per-scheme launch)."""
        key = (slots, only)
        if key not in self._sched:
            mine = [e for e, pw in enumerate(self.packed) if pw.scheme in slots]
            if not only and len(mine) != len(self.packed):
                raise ValueError("every expert's scheme needs a slot in the launch")
            order = sorted(mine, key=lambda e: (slots.index(self.packed[e].scheme), e))
            rows = torch.tensor([[e, slots.index(self.packed[e].scheme)] for e in order], dtype=torch.int32)
            self._sched[key] = _to_device_async(rows.reshape(-1, 2), self.device)
        return self._sched[key]

    def check_device(self) -> None:
        """``check_device`` for these experts' device and schemes, once per group."""
        if not self._device_checked:
            cuda = self.device.type == "cuda"
            check_device(cuda, torch.cuda.get_device_capability(self.device) if cuda else None, self.schemes)
            self._device_checked = True

    def launches(self, rows: int, mode: str, configs, num_programs, num_warps) -> "list[Launch]":
        """The kernel launches of a call on ``rows`` rows, prepared once per (rows, mode, grid, warps) and kept
        for the ``LAUNCH_CACHE`` most recent (given tile ``configs`` are prepared afresh every call)."""
        key = (rows, mode, num_programs, num_warps)
        prepared = None if configs else self._launches.pop(key, None)
        if prepared is None:
            prepared = _prepare_launches(self, rows, mode, configs, num_programs, num_warps)
        if not configs:
            self._launches[key] = prepared
            while len(self._launches) > LAUNCH_CACHE:
                self._launches.popitem(last=False)
        return prepared


LAUNCH_CACHE = 64  # prepared launches kept per group: one per recent row count (and mode, grid, warps)


def _to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without a host synchronisation: a CUDA copy goes from pinned memory,
    non-blocking (a pageable copy waits for the device, even on the first call of a layer in a forward)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _check_storage(e: int, pw: PackedWeight) -> None:
    s = pw.scheme
    want = torch.bfloat16 if s.is_full_precision else torch.uint8
    if pw.data.dtype != want or not pw.data.is_contiguous():
        raise ValueError(
            f"expert {e}: storage of a '{s}' weight must be contiguous {want}, got {pw.data.dtype}; "
            "build it with mxmoe.kernels.pack"
        )
    if not s.is_full_precision:
        expected = storage_bytes(s, pw.n, pw.k)
        zero = not s.symmetric and not paired_scales(s)  # a separate zero point tensor
        if pw.data.numel() != expected or pw.scale is None or (pw.zero is not None) != zero:
            raise ValueError(
                f"expert {e}: packed storage does not match scheme '{s}' "
                f"({pw.data.numel()} code bytes, expected {expected}); repack with mxmoe.kernels.pack"
            )


def check_device(is_cuda: bool, capability: "tuple[int, int] | None", schemes) -> None:
    """Raise RuntimeError when the kernel cannot run here: no GPU and no interpreter, or fp8 before sm_89."""
    if not is_cuda and not INTERPRET:
        raise RuntimeError(
            "group_gemm needs a CUDA GPU, or the Triton interpreter on CPU: set TRITON_INTERPRET=1 "
            "before importing mxmoe.kernels"
        )
    if is_cuda and not INTERPRET:
        for s in schemes:
            if s.fmt == "fp8" and tuple(capability) < (8, 9):
                raise RuntimeError(
                    f"scheme '{s}' needs fp8 tensor cores (sm_89 or newer); "
                    f"this GPU is sm_{capability[0]}{capability[1]}"
                )


def _check_offsets(offsets: torch.Tensor, t: int, e: int) -> None:
    """Shape and dtype on the host; the values (rising from 0 to ``t``) on the host for CPU tensors and on
    the device for GPU tensors (an asynchronous device assertion: no synchronisation)."""
    if offsets.dim() != 1 or offsets.numel() != e + 1:
        raise ValueError(f"offsets must have E+1 = {e + 1} entries for {e} experts, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.is_cuda:
        ok = (offsets[0] == 0) & (offsets[-1] == t) & (offsets[1:] >= offsets[:-1]).all()
        torch._assert_async(ok, f"group_gemm: offsets must rise from 0 to the {t} rows of x")
        return
    o = offsets.tolist()
    if o[0] != 0 or o[-1] != t or any(b < a for a, b in zip(o, o[1:])):
        raise ValueError(f"offsets must rise from 0 to the {t} rows of x, got {o}")


_GROUPS: "OrderedDict[tuple, ExpertGroup]" = OrderedDict()  # recently used lists of experts -> their group
GROUP_CACHE = 16


def expert_group(packed: "list[PackedWeight] | ExpertGroup") -> ExpertGroup:
    """The ExpertGroup of a list of PackedWeights, built once and reused while the list's experts are the same
    objects (a few recent lists are kept; each group holds its experts, so their ids cannot be reused)."""
    if isinstance(packed, ExpertGroup):
        return packed
    key = tuple(map(id, packed))
    group = _GROUPS.pop(key, None)
    if group is None or any(a is not b for a, b in zip(group.packed, packed)):
        group = ExpertGroup(packed)
    _GROUPS[key] = group
    while len(_GROUPS) > GROUP_CACHE:
        _GROUPS.popitem(last=False)
    return group


def quantize_activations(x: torch.Tensor, offsets: torch.Tensor, group: ExpertGroup) -> QuantizedRows:
    """Quantize the rows of ``group``'s weight-activation experts (one launch; nothing to do without any)."""
    return quantize_rows(x, offsets.to(torch.int32), group.act_slot, group.act_schemes, INTERPRET)


def launch_plan(group: ExpertGroup, rows: int, configs: "dict | None" = None) -> "list[tuple[Scheme, TileConfig]]":
    """Slots of a launch, heaviest tile first: [(scheme, tile config)] for the schemes in ``group``."""
    configs = configs or {}
    given = {s: configs.get(s) or configs.get(str(s)) for s in group.schemes}

    def plan_for(warps: "int | None") -> "list[tuple[Scheme, TileConfig]]":
        return [(s, given[s] or default_config(s, rows / len(group), INTERPRET, warps)) for s in group.schemes]

    def warps_of(plan) -> int:
        return launch_warps([c for _, c in plan])

    plan = plan_for(None)
    if warps_of(plan) == 8 and any(c.warps == 4 for _, c in plan):
        plan = plan_for(4)  # a tile written for one warpgroup keeps the launch there if the other slots can follow
    if warps_of(plan) == 8:  # a slot needs two warpgroups: every default tile is for 8 warps
        plan = plan_for(8)
    if group.k % 8:  # TMA needs rows of whole 16-byte units
        plan = [(s, replace(c, tma=False)) for s, c in plan]
    for s, c in plan:
        check_config(s, c)
    return sorted(plan, key=lambda sc: -tile_cost(sc[0], sc[1], group.k))


def group_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: "list[PackedWeight] | ExpertGroup",
    *,
    x_q: "QuantizedRows | None" = None,
    configs: "dict | None" = None,
    num_warps: "int | None" = None,
    num_programs: "int | None" = None,
    validate: bool = True,
    mode: str = "fused",
) -> torch.Tensor:
    """Grouped GEMM ``y[r] = x[r] @ W_e^T`` for rows ``offsets[e] <= r < offsets[e+1]``, one launch.

    x: [T, K] (bf16/fp16 on GPU; fp32/fp16 under the CPU interpreter); offsets: [E+1] int rows per
    expert (on x's device); packed: E PackedWeights (any mix of schemes) or an ExpertGroup.
    Rows of weight-activation experts are quantized per each expert's scheme once, by
    ``quantize_activations`` (a second launch), unless the caller hands them over as ``x_q`` (the
    token gather of an MoE layer produces them in passing): then the GEMM is one launch.
    Returns y: [T, N] in x's dtype. ``configs`` maps a scheme (or its string) to a TileConfig. A plain
    list of experts gets its ExpertGroup built once and reused (``expert_group``). ``validate`` checks
    ``offsets``: on a GPU by an asynchronous device assertion (no synchronisation), on a CPU on the host;
    ``validate=False`` skips even that.
    ``mode`` (the paper's Table 6): "fused" (default) one launch, a compile-time-specialised path with
    its own tile per scheme; "per_scheme" one launch per scheme; "unified" one launch of the kernel
    compiled with every Hopper scheme's path and one shared tile shape.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    group = expert_group(packed)
    if x.dim() != 2 or x.shape[1] != group.k:
        raise ValueError(f"x must be [T, K={group.k}] to match the experts' weights, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.device != group.device:
        raise ValueError(f"x is on {x.device}, the experts on {group.device}")
    if offsets.device != x.device:
        raise ValueError(f"offsets are on {offsets.device}, x on {x.device}")
    if validate:
        _check_offsets(offsets, x.shape[0], len(group))
    group.check_device()
    x = x.contiguous()  # [T, K], unit stride along K
    if x.data_ptr() % 16:  # TMA loads rows from 16-byte boundaries: a fresh (aligned) copy
        x = x.clone()
    offsets = offsets.to(torch.int32)
    if x_q is None:
        x_q = quantize_activations(x, offsets, group)
    elif x_q.q.shape != x.shape or x_q.scale.shape != (x.shape[0], -(-group.k // 128)):
        raise ValueError(
            f"x_q must hold q [T, K] = {tuple(x.shape)} and scale [T, {-(-group.k // 128)}], "
            f"got {tuple(x_q.q.shape)} and {tuple(x_q.scale.shape)}"
        )
    t = x.shape[0]
    y = torch.empty(t, group.n, dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    for launch in group.launches(t, mode, configs, num_programs, num_warps):
        launch.run(x, x_q, y, offsets, group)
    return y


def _prepare_launches(group: ExpertGroup, rows: int, mode: str, configs, num_programs, num_warps) -> "list[Launch]":
    """The launches of one ``group_gemm`` call in ``mode`` (see there) on ``rows`` rows."""
    if mode == "fused":
        plan = launch_plan(group, rows, configs)
        parts = [(plan, group.schedule(tuple(s for s, _ in plan)))]
    elif mode == "per_scheme":
        parts = [([(s, c)], group.schedule((s,), only=True)) for s, c in launch_plan(group, rows, configs)]
    else:  # unified
        c = unified_config(rows / len(group))
        slots = tuple(dict.fromkeys(HOPPER_SCHEMES + group.schemes))
        parts = [([(s, c) for s in slots], group.schedule(slots))]
    return [Launch.prepare(plan, sched, group.device, num_programs, num_warps) for plan, sched in parts]


def unified_config(rows_per_expert: float) -> TileConfig:
    """The one tile shape every path of the ``unified`` kernel uses (Table 6's runtime-branch kernel)."""
    if INTERPRET:
        return TileConfig(32, 32, PACK_K, 1)
    bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64 if rows_per_expert <= 64 else 128
    return TileConfig(bm, 128, PACK_K, 3)


@dataclass(frozen=True)
class Launch:
    """One kernel launch with all but the call's tensors settled: its grid, its schedule ([E', 2] int32
    (expert, slot)) and its compile-time arguments (each slot's path and tile, warps, register cap)."""

    programs: int
    sched: torch.Tensor
    meta: dict

    @classmethod
    def prepare(cls, plan, sched: torch.Tensor, device: torch.device, num_programs, num_warps) -> "Launch":
        """The launch of ``plan`` ([(scheme, tile config)], one slot each) over the experts in ``sched``."""
        slots = tuple(s for s, _ in plan)
        cfgs = [c for _, c in plan]
        per_sm, max_registers = programs_per_sm(list(slots), cfgs)
        if num_programs is None:
            num_programs = 4 if INTERPRET else per_sm * torch.cuda.get_device_properties(device).multi_processor_count
        e = sched.shape[0]
        meta = {
            "KINDS": tuple(kind_of(s) for s in slots),
            "WBITS": tuple(s.w_bits for s in slots),
            "GROUPS": tuple(s.group_size for s in slots),
            "SYMS": tuple(s.symmetric for s in slots),
            "BMS": tuple(c.bm for c in cfgs),
            "BNS": tuple(c.bn for c in cfgs),
            "BKS": tuple(c.bk for c in cfgs),
            "STAGES": tuple(c.stages for c in cfgs),
            "SWAPS": tuple(c.swap_ab for c in cfgs),
            "TMAS": tuple(c.tma for c in cfgs),
            "NSLOTS": len(slots),
            "E_PAD": max(16, 1 << (e - 1).bit_length()),
            "INTERPRET": INTERPRET,
            "num_warps": launch_warps(cfgs) if num_warps is None else num_warps,
        }
        if not INTERPRET and max_registers is not None:
            meta["maxnreg"] = max_registers
        return cls(num_programs, sched, meta)

    def run(self, x, x_q: QuantizedRows, y, offsets, group: ExpertGroup) -> None:
        """Launch on x [T, K] (and its quantized rows), writing y [T, N]; offsets [E+1] int32."""
        if any(self.meta["TMAS"]) and not INTERPRET and not _caller_set_allocator():
            triton.set_allocator(_descriptor_scratch)
        with device_guard(x.device):  # Triton launches on the current GPU: make it x's
            tk.group_gemm_kernel[(self.programs,)](
                x,
                x_q.q,
                x_q.scale,
                y,
                offsets,
                self.sched,
                group.addr,
                self.sched.shape[0],
                group.n,
                group.k,
                group.k_pad,
                x_q.scale.shape[1],
                x.stride(0),
                y.stride(0),
                **self.meta,
            )


def _caller_set_allocator() -> bool:
    """Whether the caller gave Triton an allocator of its own (then TMA launches use it).

    Triton has no public getter: 3.6 and 3.7 keep it in the context variable ``_allocation._allocator``. A
    Triton that moved it gets ours on each TMA launch (correct, only the caller's choice is not kept).
    """
    current = getattr(_allocation, "_allocator", None)
    return current is not None and not isinstance(current.get(), _allocation.NullAllocator)


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a launch makes on the device (Triton asks its allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")
