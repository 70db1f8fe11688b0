"""What the kernel benchmarks measure: the GEMM shapes, token counts, uniform schemes, fixed mixes and
the assumed routing skew, shared by ``mxmoe bench gemm``, the cost tables and the model's validation."""

from __future__ import annotations

import torch

from mxmoe.models.paper import PAPER_MODELS

# name: (experts, hidden H, expert intermediate I, top_k): the paper's models (mxmoe.models.zoo), and the
# embedded model (mxmoe.models.moefy): 32 routed experts of width 32, top-8, and its shared expert (width
# 512) as a one-expert "grouped" GEMM that sees every token
MODELS = {name: (s.num_experts, s.hidden, s.expert_width, s.top_k) for name, (_, s) in PAPER_MODELS.items()}
MODELS.update({"smollm2-moe": (32, 576, 32, 8), "smollm2-moe-shared": (1, 576, 512, 1)})
PAPER = tuple(PAPER_MODELS)


def gemms(model: str) -> "list[tuple[str, int, int]]":
    """The two grouped GEMMs of a ``MODELS`` entry as (name, N, K): gate_up fused (N = 2I, K = H), down (N = H, K = I)."""
    _, h, inter, _ = MODELS[model]
    return [("gate_up", 2 * inter, h), ("down", h, inter)]


TOKENS = (16, 512, 8192)
LOAD_RATIO = 8.0  # max/min expert routing probability (assumed)
UNIFORM = {
    "bf16": "bf16",
    "w4a16_g128": "w4a16_g128_asym",
    "w4a16_g-1": "w4a16_g-1_asym",
    "w3a16_g128": "w3a16_g128_asym",
    "w2a16_g128": "w2a16_g128_asym",
    "w8a8_int8": "w8a8_g-1_sym",
    "w8a8_fp8": "w8a8_g-1_sym_fp8",
    "w4a4_g-1": "w4a4_g-1_sym",
    "w4a8_fp8_g-1": "w4a8_g-1_sym_fp8",
    "w4a8_fp8_g128": "w4a8_g128_sym_fp8",
}
# mixes: (scheme of the heaviest `frac` experts, scheme of the rest); average weight bits in the name. The
# first two are the paper's; the third is the Hopper-native 4.25-bit mix, fp8 activations everywhere as in
# torch's fp8 grouped GEMM, 4-bit weights on fp8 tensor cores.
MIXES = {
    "mix4.25_w4a16+w8a8": ("w8a8_g-1_sym", "w4a16_g-1_asym", 1 / 16),
    "mix5_w4a4+w8a8": ("w8a8_g-1_sym", "w4a4_g-1_sym", 1 / 4),
    "mix4.25_w4a8+w8a8_fp8": ("w8a8_g-1_sym_fp8", "w4a8_g-1_sym_fp8", 1 / 16),
}
TABLE6_MIXES = ("mix4.25_w4a16+w8a8", "mix5_w4a4+w8a8")  # also timed per scheme and as the unified kernel


def expert_loads(tokens: int, experts: int, top_k: int, ratio: float = LOAD_RATIO) -> list[int]:
    """Rows per expert, heaviest first: tokens*top_k rows by geometric probabilities (max/min = ratio)."""
    p = torch.tensor([ratio ** (-i / max(experts - 1, 1)) for i in range(experts)], dtype=torch.float64)
    want = tokens * top_k * p / p.sum()
    rows = want.floor().long()
    for i in torch.argsort(want - rows, descending=True)[: tokens * top_k - int(rows.sum())]:
        rows[i] += 1
    return [min(int(r), tokens) for r in rows]  # an expert sees each token at most once


def expert_offsets(rows: "list[int]", device="cuda") -> torch.Tensor:
    """Row offsets of experts with ``rows`` rows each, as ``group_gemm`` takes them: [E + 1] int32, from 0."""
    return torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=device)
