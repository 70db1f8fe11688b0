"""A routed MoE experts forward through ``group_gemm``: sort tokens by expert, gate_up GEMM,
SiLU(gate) * up, down GEMM, weighted combine.

The experts' weights follow transformers 5's fused layout: ``gate_up`` holds [2I, H] per expert
(gate rows first, then up rows) and ``down`` [H, I]. Routing and the elementwise steps are plain
torch here; the two grouped GEMMs are one launch each (plus one activation-quantization launch
each when a weight-activation scheme is present).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mxmoe.kernels.group_gemm import ExpertGroup, group_gemm


def route(top_k_index: torch.Tensor, num_experts: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Sort the (token, slot) pairs by expert.

    top_k_index: [T, k] expert ids. Returns order [T*k] (indices into the flattened pairs, grouped by
    expert, stable) and offsets [E+1] int32 (rows per expert, cumulated).
    """
    flat = top_k_index.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def moe_experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate_up: ExpertGroup, down: ExpertGroup) -> torch.Tensor:
    """Experts part of an MoE block: ``out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))``
    with ``e = top_k_index[t, j]``. hidden: [T, H]; top_k_index, top_k_weights: [T, k]; returns [T, H]."""
    t, k = top_k_index.shape
    if len(gate_up) != len(down) or gate_up.k != hidden.shape[1] or down.n != hidden.shape[1] or gate_up.n != 2 * down.k:
        raise ValueError(f"experts do not chain: gate_up [{gate_up.n}, {gate_up.k}] x {len(gate_up)}, "
                         f"down [{down.n}, {down.k}] x {len(down)}, hidden {tuple(hidden.shape)}")
    order, offsets = route(top_k_index, len(gate_up))
    token = order // k  # [T*k] token of each sorted row
    x = hidden[token]  # [T*k, H] gathered, grouped by expert
    h = group_gemm(x, offsets, gate_up, validate=False)  # [T*k, 2I]
    a = F.silu(h[:, : down.k]) * h[:, down.k:]  # [T*k, I]
    o = group_gemm(a, offsets, down, validate=False)  # [T*k, H]
    w = top_k_weights.reshape(-1)[order].to(o.dtype)  # [T*k]
    out = torch.zeros_like(hidden)
    return out.index_add_(0, token, o * w[:, None])
