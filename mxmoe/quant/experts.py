"""The tokens each expert of one MoE block sees, and one expert's forward under given block schemes.

Shared by the sensitivity measurement and sequential GPTQ: both need, per expert, the rows of the
block input routed to it with their gate values, the expert's weights, its SiLU-gated intermediate
with activation fake quantization, and GPTQ-or-RTN for one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mxmoe.models.blocks import MoEBlock
from mxmoe.quant.apply import block_weight, expert_ids
from mxmoe.quant.gptq import HessianAccumulator, InsufficientCalibration, gptq_quantize_batched
from mxmoe.quant.hadamard import apply_online_hadamard
from mxmoe.quant.rtn import IntWeight, quantize_activation, quantize_weight_int
from mxmoe.schemes import BF16, Scheme


@dataclass
class ExpertTokens:
    """The tokens of one expert: inputs x [T, H] and the weight g [T, 1] its output gets in the block sum."""

    expert: "int | str"
    x: torch.Tensor
    g: torch.Tensor


@torch.no_grad()
def split_by_expert(block: MoEBlock, x: torch.Tensor) -> list[ExpertTokens]:
    """Route block inputs ``x[N, H]`` and return every expert's tokens (routed ones, then shared ones).

    A routed expert gets the rows routed to it with their routing weights; a shared expert gets
    every row, weighted by Qwen2-MoE's sigmoid shared gate when the block has one (else 1).
    """
    x = x.float()
    weights, idx = block.route(x)  # [N, k] each
    out = []
    for e in range(block.num_experts):
        rows, slot = torch.where(idx == e)
        out.append(ExpertTokens(e, x[rows], weights[rows, slot][:, None]))
    shared_g = block.shared_gate_value(x)  # [N, 1]
    out += [ExpertTokens(e, x, shared_g) for e in expert_ids(block)[block.num_experts :]]
    return out


def expert_weights(block: MoEBlock, expert, rotate_down: bool = False) -> dict[str, torch.Tensor]:
    """Float32 copies of an expert's gate/up [I, H] and down [H, I] (down rotated by the online Hadamard if asked)."""
    w = {n: block_weight(block, expert, n).detach().float().clone() for n in ("gate", "up", "down")}
    if rotate_down:
        w["down"] = apply_online_hadamard(w["down"])  # W·H/√I pairs with the rotated input
    return w


def intermediate(x: torch.Tensor, w: dict, schemes: dict) -> torch.Tensor:
    """SiLU(gate) * up [T, I] with each block's input activation fake-quantized by its scheme."""
    if x.shape[0] == 0:  # quantize_activation cannot group an empty tensor
        return x.new_zeros(0, w["gate"].shape[0])
    gate = quantize_activation(x, schemes.get("gate", BF16)) @ w["gate"].T
    up = quantize_activation(x, schemes.get("up", BF16)) @ w["up"].T
    return F.silu(gate) * up


@dataclass
class QuantizedBlock:
    """One block's quantized weight and how it was found ('rtn', 'gptq', or 'rtn-fallback' with the reason)."""

    weight: IntWeight
    how: str
    reason: str = ""


def quantize_block(
    w: torch.Tensor, scheme: Scheme, hessian: "HessianAccumulator | None", min_tokens: int, **gptq_kw
) -> QuantizedBlock:
    """GPTQ when a Hessian is given and has enough tokens, otherwise RTN; ``w`` is [out, in]."""
    return quantize_blocks(w[None], scheme, [hessian], min_tokens, **gptq_kw)[0]


GPTQ_WORK_COPIES = 8  # float32 [B, out, in] tensors a batched GPTQ holds at its peak (weights, grids, codes)


def gptq_batch_limit(w: torch.Tensor) -> int:
    """How many of the same-shape weights ``w[B, out, in]`` one batched GPTQ takes at once: on a GPU as many
    as fit half its free memory (a Mixtral layer's 8 experts x 2 blocks x 4 schemes do not fit at once),
    on the CPU all of them."""
    if w.device.type != "cuda":
        return max(1, w.shape[0])
    free = torch.cuda.mem_get_info(w.device)[0]
    return max(1, free // 2 // (GPTQ_WORK_COPIES * 4 * w.shape[1] * w.shape[2]))


def quantize_blocks(
    w: torch.Tensor, schemes: "Scheme | list", hessians: list, min_tokens: int, **gptq_kw
) -> list[QuantizedBlock]:
    """``quantize_block`` for same-shape weights ``w[B, out, in]`` at once, element b with ``hessians[b]`` (or None).

    ``schemes``: one scheme for all, or one per element. The elements with a Hessian go through batched
    GPTQ (mixed schemes allowed), ``gptq_batch_limit`` of them per call; the others, and GPTQ's
    fallbacks, get RTN.
    """
    ss = [schemes] * len(hessians) if isinstance(schemes, (str, Scheme)) else list(schemes)
    out: list = [None] * len(hessians)
    with_h = [e for e, h in enumerate(hessians) if h is not None]
    step = gptq_batch_limit(w)
    for c0 in range(0, len(with_h), step):
        part = with_h[c0 : c0 + step]
        res = gptq_quantize_batched(
            w[torch.tensor(part, device=w.device)],
            [hessians[e] for e in part],
            [ss[e] for e in part],
            min_tokens=min_tokens,
            **gptq_kw,
        )
        for e, r in zip(part, res):
            if isinstance(r, (InsufficientCalibration, torch.linalg.LinAlgError)):
                out[e] = QuantizedBlock(quantize_weight_int(w[e], ss[e]), "rtn-fallback", str(r).splitlines()[0])
            else:
                out[e] = QuantizedBlock(r, "gptq")
    for e, h in enumerate(hessians):
        if h is None:
            out[e] = QuantizedBlock(quantize_weight_int(w[e], ss[e]), "rtn")
    return out


def hessian_of(x: torch.Tensor) -> HessianAccumulator:
    """A Hessian accumulator over the rows of ``x[T, K]``."""
    acc = HessianAccumulator(x.shape[-1], device=x.device)
    acc.add(x)
    return acc
