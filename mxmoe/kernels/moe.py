"""A routed MoE experts forward through ``group_gemm``, and its transformers experts implementation.

``moe_experts_forward``: sort tokens by expert, gate_up GEMM, SiLU(gate) * up, down GEMM, weighted
combine. The experts' weights follow transformers 5's fused layout: ``gate_up`` holds [2I, H] per
expert (gate rows first, then up rows) and ``down`` [H, I]. Routing and the elementwise steps are
plain torch here; the two grouped GEMMs are one launch each (plus one activation-quantization
launch each when a weight-activation scheme is present).

``attach_packed_experts(block, schemes)`` packs one MoE layer's routed experts (RTN, or the
``IntWeight``s the accuracy path produced) and ``register_experts_implementation()`` makes
``model.set_experts_implementation("mxmoe")`` run every such layer through the kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mxmoe.kernels.group_gemm import ExpertGroup, group_gemm
from mxmoe.kernels.pack import pack
from mxmoe.quant.rtn import IntWeight, quantize_weight_int
from mxmoe.schemes import Scheme

IMPLEMENTATION = "mxmoe"  # name under transformers' ALL_EXPERTS_FUNCTIONS


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


def silu_mul(gate_up_out: torch.Tensor) -> torch.Tensor:
    """[S, 2I] (gate, up) -> [S, I] silu(gate) * up."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate_up: ExpertGroup, down: ExpertGroup, act: Callable = silu_mul) -> torch.Tensor:
    """Experts part of an MoE block: ``out[t] = sum_j w[t, j] * down_e(act(gate_up_e(x_t)))`` with
    ``e = top_k_index[t, j]`` (act: silu(gate) * up by default). hidden: [T, H]; top_k_index,
    top_k_weights: [T, k]; returns [T, H]."""
    t, k = top_k_index.shape
    if len(gate_up) != len(down) or gate_up.k != hidden.shape[1] or down.n != hidden.shape[1] or gate_up.n != 2 * down.k:
        raise ValueError(f"experts do not chain: gate_up [{gate_up.n}, {gate_up.k}] x {len(gate_up)}, "
                         f"down [{down.n}, {down.k}] x {len(down)}, hidden {tuple(hidden.shape)}")
    order, offsets = route(top_k_index, len(gate_up))
    token = order // k  # [T*k] token of each sorted row
    x = hidden[token]  # [T*k, H] gathered, grouped by expert
    h = group_gemm(x, offsets, gate_up, validate=False)  # [T*k, 2I]
    a = act(h)  # [T*k, I]
    o = group_gemm(a, offsets, down, validate=False)  # [T*k, H]
    w = top_k_weights.reshape(-1)[order].to(o.dtype)  # [T*k]
    out = torch.zeros_like(hidden)
    return out.index_add_(0, token, o * w[:, None])


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


def mxmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts function: run the experts that ``attach_packed_experts`` packed."""
    groups = getattr(self, "mxmoe_groups", None)
    if groups is None:
        raise RuntimeError(f"{type(self).__name__} has no packed experts: call attach_packed_experts on its block first")
    return moe_experts_forward(hidden_states, top_k_index, top_k_weights, *groups, act=self._apply_gate)


def register_experts_implementation() -> str:
    """Register ``mxmoe`` with transformers; then ``model.set_experts_implementation("mxmoe")``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, mxmoe_experts_forward)
    return IMPLEMENTATION
