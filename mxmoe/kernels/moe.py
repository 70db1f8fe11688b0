"""A routed MoE experts forward through ``group_gemm``, and its transformers experts implementation.

``moe_experts_forward``: sort tokens by expert, gate_up GEMM, SiLU(gate) * up, down GEMM, weighted
combine. The experts' weights follow transformers 5's fused layout: ``gate_up`` holds [2I, H] per
expert (gate rows first, then up rows) and ``down`` [H, I]. The two grouped GEMMs are one launch
each (plus one activation-quantization launch each when a weight-activation scheme is present).

The path never synchronises with the host and has no data-dependent shape, so it can be captured
in a CUDA graph: rows per expert are counted on the device (at decode sizes one Triton program sorts
the (token, slot) pairs by expert and writes the offsets; beyond, ``scatter_add_`` into a fixed [E]
tensor and a cumulative sum), and ``group_gemm(..., validate=False)`` launches a grid
sized from host-known numbers and reads the offsets in the kernel. SiLU(gate)·up is one small
Triton kernel, and so is the combine (each token sums its k weighted expert rows in fp32, read
through the inverse of the sort: no atomics, deterministic); on a CPU without the Triton
interpreter both fall back to plain torch.

``attach_packed_experts(block, schemes)`` packs one MoE layer's routed experts (RTN, or the
``IntWeight``s the accuracy path produced) and ``register_experts_implementation()`` makes
``model.set_experts_implementation("mxmoe")`` run every such layer through the kernel.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mxmoe.env import device_guard
from mxmoe.kernels.group_gemm import INTERPRET, ExpertGroup, group_gemm
from mxmoe.kernels.pack import pack
from mxmoe.quant.rtn import IntWeight, quantize_weight_int
from mxmoe.schemes import Scheme

IMPLEMENTATION = "mxmoe"  # name under transformers' ALL_EXPERTS_FUNCTIONS


def route(top_k_index: torch.Tensor, num_experts: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Sort the (token, slot) pairs by expert, on the device (no host synchronisation).

    top_k_index: [T, k] expert ids. Returns order [T*k] (indices into the flattened pairs, grouped by
    expert, stable) and offsets [E+1] int32 (rows per expert, cumulated).
    """
    order, _, offsets = route_with_inverse(top_k_index, num_experts)
    return order, offsets


# One program sorts the (token, slot) pairs while pairs x padded experts (its one-hot cells) stay within four
# 8192-cell chunks a pass: decode batches (Qwen1.5-MoE up to 128 tokens, Qwen3-30B-A3B up to 16). The chunks run
# one after another on one SM, so from some size on the torch path's ten or so launches cost less;
# `mxmoe bench route` times both across sizes.
ROUTE_ONE_PROGRAM_CELLS = 4 * 8192


def _expert_pad(num_experts: int) -> int:
    """Padded expert count of ``_route_kernel``'s one-hot (room for the [E+1] offsets' last entry)."""
    return max(16, triton.next_power_of_2(num_experts + 1))


@triton.jit
def _route_kernel(ids_ptr, order_ptr, inv_ptr, off_ptr, P, E, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Stable counting sort of P expert ids in one program: offsets [E+1], order [P] and inv [P] (int64).

    Pass 1 counts each expert's pairs (a [BLOCK, E_PAD] one-hot per chunk); pass 2 places pair p at its
    expert's offset plus the number of earlier pairs of that expert (a running count per expert and a
    prefix sum down the chunk's one-hot). Ids must lie in [0, E)."""
    experts = tl.arange(0, E_PAD)  # [E_PAD]
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, P, BLOCK):
        p = start + tl.arange(0, BLOCK)  # [BLOCK]
        e = tl.load(ids_ptr + p, mask=p < P, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    first = tl.cumsum(counts, axis=0) - counts  # [E_PAD] exclusive: each expert's first row
    tl.store(off_ptr + experts, first, mask=experts <= E)  # offsets[E] = P: padded experts count 0
    for start in range(0, P, BLOCK):
        p = start + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + p, mask=p < P, other=-1)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, E_PAD]
        before = tl.cumsum(hit, axis=0) - hit  # earlier pairs of the same expert within the chunk
        row = tl.sum((first[None, :] + before) * hit, axis=1)  # [BLOCK] sorted row of each pair
        tl.store(order_ptr + row, p.to(tl.int64), mask=p < P)
        tl.store(inv_ptr + p, row.to(tl.int64), mask=p < P)
        first += tl.sum(hit, axis=0)


def route_with_inverse(
    top_k_index: torch.Tensor, num_experts: int
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """``route`` plus the inverse permutation inv [T*k] (sorted row of each flattened pair).

    At decode sizes (``ROUTE_ONE_PROGRAM_CELLS``) one Triton program does it all
    (``_route_kernel``: one launch instead of the ten or so of the torch path). Otherwise counts go into
    a fixed-size [E] tensor with ``scatter_add_``. Either way nothing reads the data on the host (unlike
    ``torch.bincount``), so the call is graph-capturable.
    """
    flat = top_k_index.reshape(-1)  # [T*k]
    if _triton_ok(flat) and 0 < flat.numel() * _expert_pad(num_experts) <= ROUTE_ONE_PROGRAM_CELLS:
        return _route_one_program(flat, num_experts)
    order = torch.argsort(flat, stable=True)  # [T*k]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)  # [E]
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)  # [E+1]
    offsets[1:] = torch.cumsum(counts, 0)
    inv = torch.empty_like(order)  # [T*k]
    inv[order] = torch.arange(order.numel(), device=flat.device)
    return order, inv, offsets


def _route_one_program(flat: torch.Tensor, num_experts: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """``route_with_inverse`` of the flattened ids [P] by ``_route_kernel``: order [P], inv [P], offsets [E+1]."""
    p = flat.numel()
    order = torch.empty(p, dtype=torch.int64, device=flat.device)  # [P]
    inv = torch.empty(p, dtype=torch.int64, device=flat.device)  # [P]
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=flat.device)  # [E+1]
    e_pad = _expert_pad(num_experts)
    with device_guard(flat.device):  # Triton launches on the current GPU: make it flat's
        _route_kernel[(1,)](
            flat.contiguous(), order, inv, offsets, p, num_experts, E_PAD=e_pad, BLOCK=max(16, 8192 // e_pad)
        )
    return order, inv, offsets


def silu_mul(gate_up_out: torch.Tensor) -> torch.Tensor:
    """[S, 2I] (gate, up) -> [S, I] silu(gate) * up (plain torch; the reference of ``fused_silu_mul``)."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return F.silu(gate) * up


def _triton_ok(t: torch.Tensor) -> bool:
    """The small Triton kernels run on a GPU, or on the CPU under the interpreter."""
    return t.is_cuda or INTERPRET


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, I, stride_h, stride_o, BLOCK: tl.constexpr):
    """Row r, columns [c, c + BLOCK): out = silu(h[:, :I]) * h[:, I:], in fp32."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(h_ptr + r * stride_h + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r * stride_h + I + c, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + r * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=m)


def fused_silu_mul(gate_up_out: torch.Tensor) -> torch.Tensor:
    """[S, 2I] (gate, up) -> [S, I] silu(gate) * up in one launch (fp32 math, one rounding)."""
    s, two_i = gate_up_out.shape
    if not _triton_ok(gate_up_out):
        return silu_mul(gate_up_out)
    h = gate_up_out.contiguous()
    out = torch.empty(s, two_i // 2, dtype=h.dtype, device=h.device)  # [S, I]
    if s:
        block = 256 if not INTERPRET else 64
        with device_guard(h.device):  # Triton launches on the current GPU: make it h's
            _silu_mul_kernel[(s, triton.cdiv(two_i // 2, block))](
                h, out, two_i // 2, h.stride(0), out.stride(0), BLOCK=block
            )
    return out


@triton.jit
def _combine_kernel(o_ptr, w_ptr, inv_ptr, out_ptr, H, stride_o, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
    """Token t, columns [c, c + BLOCK): out[t] = sum_j w[t, j] * o[inv[t*K + j]] in fp32."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(inv_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += w * tl.load(o_ptr + row * stride_o + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + c, acc.to(out_ptr.dtype.element_ty), mask=m)


def combine(
    o: torch.Tensor, top_k_weights: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Weighted sum of each token's k expert rows: o [T*k, H] in sorted order, top_k_weights [T, k],
    inv [T*k] (sorted row of each pair) -> [T, H] in ``out_dtype`` (fp32 accumulation, one launch)."""
    t, k = top_k_weights.shape
    h = o.shape[1]
    if not _triton_ok(o):
        w = top_k_weights.reshape(-1)[order].to(torch.float32)  # [T*k]
        out = torch.zeros(t, h, dtype=torch.float32, device=o.device)
        return out.index_add_(0, order // k, o.float() * w[:, None]).to(out_dtype)
    out = torch.empty(t, h, dtype=out_dtype, device=o.device)  # [T, H]
    if t:
        block = 256 if not INTERPRET else 64
        with device_guard(o.device):  # Triton launches on the current GPU: make it o's
            _combine_kernel[(t, triton.cdiv(h, block))](
                o, top_k_weights.contiguous(), inv, out, h, o.stride(0), out.stride(0), K=k, BLOCK=block
            )
    return out


def moe_experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertGroup,
    down: ExpertGroup,
    act: "Callable | None" = None,
) -> torch.Tensor:
    """Experts part of an MoE block: ``out[t] = sum_j w[t, j] * down_e(act(gate_up_e(x_t)))`` with
    ``e = top_k_index[t, j]`` (act: silu(gate) * up, fused, by default). hidden: [T, H]; top_k_index,
    top_k_weights: [T, k]; returns [T, H]. No host synchronisation (module doc)."""
    t, k = top_k_index.shape
    if (
        len(gate_up) != len(down)
        or gate_up.k != hidden.shape[1]
        or down.n != hidden.shape[1]
        or gate_up.n != 2 * down.k
    ):
        raise ValueError(
            f"experts do not chain: gate_up [{gate_up.n}, {gate_up.k}] x {len(gate_up)}, "
            f"down [{down.n}, {down.k}] x {len(down)}, hidden {tuple(hidden.shape)}"
        )
    order, inv, offsets = route_with_inverse(top_k_index, len(gate_up))
    x = hidden[order // k]  # [T*k, H] gathered, grouped by expert
    h = group_gemm(x, offsets, gate_up, validate=False)  # [T*k, 2I]
    a = (act or fused_silu_mul)(h)  # [T*k, I]
    o = group_gemm(a, offsets, down, validate=False)  # [T*k, H]
    return combine(o, top_k_weights, order, inv, hidden.dtype)


def attach_packed_experts(block, schemes: "list[tuple]", int_weights: "dict | None" = None) -> int:
    """Pack the routed experts of one ``mxmoe.models.MoEBlock`` for the ``mxmoe`` experts implementation.

    schemes[e] = (gate, up, down) schemes of expert e (gate and up must match: they run as one fused
    GEMM). int_weights, optional: {(e, "gate"|"up"|"down"): IntWeight} from the accuracy path (e.g.
    GPTQ), packed exactly; blocks missing there are quantized here with RTN. Returns packed bytes.
    """
    if not block.fused:
        raise ValueError(f"{block.name}: the experts implementation needs transformers-5 fused expert tensors")
    if len(schemes) != block.num_experts:
        raise ValueError(f"{block.name}: {len(schemes)} scheme triples for {block.num_experts} experts")
    int_weights = int_weights or {}
    gate_up, down = [], []
    for e, triple in enumerate(schemes):
        g, u, d = (Scheme.parse(s) for s in triple)
        if g != u:
            raise ValueError(f"{block.name} expert {e}: gate ({g}) and up ({u}) must share a scheme (tie them)")
        parts = [int_weights.get((e, b)) or _quantize(block.expert_weight(e, b), g) for b in ("gate", "up")]
        gate_up.append(pack(_stack(parts)) if not g.is_full_precision else pack(torch.cat(parts), g))
        dw = int_weights.get((e, "down"))
        down.append(pack(dw) if dw is not None else pack(block.expert_weight(e, "down").detach(), d))
    block.experts.mxmoe_groups = (ExpertGroup(gate_up), ExpertGroup(down))
    return sum(pw.nbytes for pw in gate_up + down)


def _quantize(w: torch.Tensor, s: Scheme) -> "IntWeight | torch.Tensor":
    return w.detach() if s.is_full_precision else quantize_weight_int(w.detach(), s)


def _stack(parts: "list[IntWeight]") -> IntWeight:
    """Gate and up IntWeights [I, H] each -> one [2I, H] IntWeight (rows stacked, same scheme)."""
    g, u = parts
    if g.scheme != u.scheme:
        raise ValueError(f"gate ({g.scheme}) and up ({u.scheme}) IntWeights must share a scheme")
    return IntWeight(torch.cat([g.q, u.q]), torch.cat([g.scale, u.scale]), torch.cat([g.zero, u.zero]), g.scheme)


def mxmoe_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function: run the experts that ``attach_packed_experts`` packed."""
    groups = getattr(self, "mxmoe_groups", None)
    if groups is None:
        raise RuntimeError(
            f"{type(self).__name__} has no packed experts: call attach_packed_experts on its block first"
        )
    return moe_experts_forward(
        hidden_states, top_k_index, top_k_weights, *groups, act=None if _silu_gate(self) else self._apply_gate
    )


def _silu_gate(experts) -> bool:
    """True when an experts module gates with transformers' default silu(gate) * up (then the fused kernel runs)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without it: keep the module's own gate
        return False
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    return (
        getattr(type(experts), "_apply_gate", None) is _default_apply_gate
        and act == "silu"
        and getattr(experts, "is_concatenated", True)
    )


def register_experts_implementation() -> str:
    """Register ``mxmoe`` with transformers; then ``model.set_experts_implementation("mxmoe")``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, mxmoe_experts_forward)
    return IMPLEMENTATION


# ---- shared experts through the kernel (one-expert launches), and torch's fp8 grouped GEMM baseline ----


def _shared_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Forward of a shared-expert MLP packed by ``attach_packed_shared``: x [..., H] -> [..., H]."""
    gate_up, down = self.mxmoe_groups
    flat = x.reshape(-1, x.shape[-1])  # [T, H]
    offsets = torch.arange(2, dtype=torch.int32, device=x.device) * flat.shape[0]  # [0, T], no host copy
    h = group_gemm(flat, offsets, gate_up, validate=False)  # [T, 2I]
    o = group_gemm(fused_silu_mul(h), offsets, down, validate=False)  # [T, H]
    return o.reshape(x.shape)


def attach_packed_shared(block, schemes: "list[tuple]") -> int:
    """Pack the shared experts of one ``MoEBlock`` (schemes[s] = (gate, up, down), gate = up) and run
    them through ``group_gemm``; ``detach_packed(block)`` restores them. Returns packed bytes."""
    if len(schemes) != len(block.shared):
        raise ValueError(f"{block.name}: {len(schemes)} scheme triples for {len(block.shared)} shared experts")
    total = 0
    for s, (mlp, triple) in enumerate(zip(block.shared, schemes)):
        g, u, d = (Scheme.parse(x) for x in triple)
        if g != u:
            raise ValueError(f"{block.name} shared expert {s}: gate ({g}) and up ({u}) must share a scheme")
        if getattr(getattr(mlp, "act_fn", None), "__class__", type(None)).__name__ not in ("SiLU", "SiLUActivation"):
            raise ValueError(f"{block.name} shared expert {s}: only SiLU-gated MLPs can be packed")
        w_gu = torch.cat([block.shared_weight(s, "gate"), block.shared_weight(s, "up")]).detach()  # [2I, H]
        groups = (ExpertGroup([pack(w_gu, g)]), ExpertGroup([pack(block.shared_weight(s, "down").detach(), d)]))
        mlp.mxmoe_groups = groups
        mlp.forward = types.MethodType(_shared_forward, mlp)
        total += sum(pw.nbytes for grp in groups for pw in grp.packed)
    return total


def detach_packed(block) -> None:
    """Drop the packed experts of one ``MoEBlock`` (routed, shared, fp8) and restore the shared experts' forward."""
    for attr in ("mxmoe_groups", "mxmoe_fp8"):
        if hasattr(block.experts, attr):
            delattr(block.experts, attr)
    for mlp in block.shared:
        for attr in ("mxmoe_groups", "mxmoe_fp8"):
            if hasattr(mlp, attr):
                delattr(mlp, attr)
        if "forward" in mlp.__dict__:
            del mlp.forward


FP8_IMPLEMENTATION = "torch_fp8"  # torch._scaled_grouped_mm, rowwise e4m3 weights and activations
FP8_MAX = 448.0


def quantize_fp8_rows(x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Per-row e4m3: x [..., K] -> (codes [..., K] float8_e4m3fn, scale [...] float32), x ≈ codes · scale."""
    amax = x.abs().amax(dim=-1).float().clamp_min(1e-12)  # [...]
    scale = amax / FP8_MAX
    q = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_grouped_mm(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, ends: torch.Tensor, mm: "Callable | None" = None
) -> torch.Tensor:
    """torch's fp8 grouped GEMM, activations quantized in the call: x [S, K] bf16 rows grouped by expert,
    w_q [E, N, K] e4m3, w_scale [E, N], ends [E] int32 -> [S, N] bf16.

    Rowwise e4m3 activations, fast accumulation: as torchao's fp8 MoE training path calls it; the
    "fp8 everywhere" baseline of the benchmarks (``mm`` replaces ``torch._scaled_grouped_mm`` in tests)."""
    x_q, x_scale = quantize_fp8_rows(x)  # [S, K], [S]
    mm = mm or torch._scaled_grouped_mm
    return mm(x_q, w_q.transpose(-2, -1), x_scale, w_scale, offs=ends, out_dtype=torch.bfloat16, use_fast_accum=True)


def pad_groups(offsets: torch.Tensor, align: int) -> "tuple[torch.Tensor, torch.Tensor, int]":
    """Where every expert's group goes when padded to a multiple of ``align`` rows, on the device.

    offsets [E+1] int (rows per expert, cumulated). Returns shift [E] (padded start minus real start
    of each group: a row of expert e moves by shift[e]), ends [E] int32 (padded group ends) and the
    extra rows E·(align-1) that a buffer of S + extra rows always has room for.
    """
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)  # [E]
    padded = (counts + align - 1) // align * align  # [E]
    ends = torch.cumsum(padded, 0)  # [E]
    shift = (ends - padded) - offsets[:-1].to(torch.int64)  # [E] padded start minus real start
    return shift, ends.to(torch.int32), (offsets.numel() - 1) * (align - 1)


def _fp8_grouped_aligned(
    x: torch.Tensor,
    w_q,
    w_scale,
    offsets: torch.Tensor,
    expert_of_row: torch.Tensor,
    align: int,
    mm: "Callable | None" = None,
) -> torch.Tensor:
    """``fp8_grouped_mm`` for a kernel that needs every group's rows padded to ``align``: scatter the rows
    into a zero-padded buffer of fixed size, multiply, gather back. x [S, K]; expert_of_row [S]."""
    shift, ends, extra = pad_groups(offsets, align)
    pos = torch.arange(x.shape[0], device=x.device) + shift[expert_of_row]  # [S] padded row of each row
    xp = x.new_zeros(x.shape[0] + extra, x.shape[1])  # [S_pad, K]
    xp[pos] = x
    return fp8_grouped_mm(xp, w_q, w_scale, ends, mm)[pos]  # [S, N]


def _fp8_needs_alignment(device, k: int = 128, n: int = 128) -> int:
    """0 when ``torch._scaled_grouped_mm`` takes groups of any row count here, else 16 (it refused 3 + 5 rows)."""
    x = torch.randn(8, k, device=device, dtype=torch.bfloat16)
    w = quantize_fp8_rows(torch.randn(2, n, k, device=device, dtype=torch.bfloat16))
    try:
        fp8_grouped_mm(x, *w, torch.tensor([3, 8], dtype=torch.int32, device=device))
        torch.cuda.synchronize(device)
        return 0
    except RuntimeError:
        return 16


def attach_fp8_experts(block) -> int:
    """Quantize one ``MoEBlock``'s routed and shared experts to rowwise e4m3 for the ``torch_fp8``
    experts implementation (``torch._scaled_grouped_mm``, what a user would reach for). Returns bytes.

    Where the op needs groups of 16-row multiples (probed once per block), rows are padded to them
    on the device, as torchtitan's MoE does; ``block.experts.mxmoe_fp8_align`` says which."""
    total = 0
    w_gu = block.experts.gate_up_proj.detach()  # [E, 2I, H]
    w_dn = block.experts.down_proj.detach()  # [E, H, I]
    block.experts.mxmoe_fp8 = (quantize_fp8_rows(w_gu), quantize_fp8_rows(w_dn))
    block.experts.mxmoe_fp8_align = _fp8_needs_alignment(w_gu.device)
    total += sum(q.numel() + s.numel() * 4 for q, s in block.experts.mxmoe_fp8)
    for s, mlp in enumerate(block.shared):
        gu = torch.cat([block.shared_weight(s, "gate"), block.shared_weight(s, "up")]).detach()[None]  # [1, 2I, H]
        mlp.mxmoe_fp8 = (quantize_fp8_rows(gu), quantize_fp8_rows(block.shared_weight(s, "down").detach()[None]))
        mlp.mxmoe_fp8_align = block.experts.mxmoe_fp8_align
        mlp.forward = types.MethodType(_fp8_shared_forward, mlp)
        total += sum(q.numel() + sc.numel() * 4 for q, sc in mlp.mxmoe_fp8)
    return total


def _fp8_shared_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Shared-expert MLP through ``torch._scaled_grouped_mm`` with one group: x [..., H] -> [..., H]."""
    (gq, gs), (dq, ds) = self.mxmoe_fp8
    flat = x.reshape(-1, x.shape[-1])  # [T, H]
    t = flat.shape[0]
    t_pad = -(-t // self.mxmoe_fp8_align) * self.mxmoe_fp8_align if self.mxmoe_fp8_align else t
    if t_pad != t:  # one group: pad on the host-known row count
        flat = torch.cat([flat, flat.new_zeros(t_pad - t, flat.shape[1])])
    ends = torch.full((1,), t_pad, dtype=torch.int32, device=x.device)  # [1]
    h = fp8_grouped_mm(flat, gq, gs, ends)  # [T_pad, 2I]
    return fp8_grouped_mm(fused_silu_mul(h), dq, ds, ends)[:t].reshape(x.shape)


def torch_fp8_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function: routed experts through ``torch._scaled_grouped_mm`` (e4m3 rowwise)."""
    fp8 = getattr(self, "mxmoe_fp8", None)
    if fp8 is None:
        raise RuntimeError(f"{type(self).__name__} has no fp8 experts: call attach_fp8_experts on its block first")
    (gq, gs), (dq, ds) = fp8
    t, k = top_k_index.shape
    order, inv, offsets = route_with_inverse(top_k_index, gq.shape[0])
    x = hidden_states[order // k]  # [T*k, H] grouped by expert
    align = getattr(self, "mxmoe_fp8_align", 0)
    if align:
        expert_of_row = top_k_index.reshape(-1)[order]  # [T*k]
        h = _fp8_grouped_aligned(x, gq, gs, offsets, expert_of_row, align)  # [T*k, 2I]
        o = _fp8_grouped_aligned(fused_silu_mul(h), dq, ds, offsets, expert_of_row, align)  # [T*k, H]
    else:
        ends = offsets[1:]  # [E] int32 row ends
        h = fp8_grouped_mm(x, gq, gs, ends)  # [T*k, 2I]
        o = fp8_grouped_mm(fused_silu_mul(h), dq, ds, ends)  # [T*k, H]
    return combine(o, top_k_weights, order, inv, hidden_states.dtype)


def register_fp8_implementation() -> str:
    """Register ``torch_fp8`` with transformers; then ``model.set_experts_implementation("torch_fp8")``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(FP8_IMPLEMENTATION, torch_fp8_experts_forward)
    return FP8_IMPLEMENTATION
