"""Expert routing profiles: how many tokens each expert of each MoE layer receives."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mxmoe.models.blocks import moe_blocks


@torch.no_grad()
def profile_routing(model, input_ids: torch.Tensor, batch_size: int = 1) -> np.ndarray:
    """Tokens routed to each expert: int array [moe_layers, experts]; each row sums to tokens·top_k.

    input_ids: [n, seqlen] (or [seqlen]) token windows, run through the model in batches.
    """
    blocks = moe_blocks(model)
    counts = [torch.zeros(b.num_experts, dtype=torch.long) for b in blocks]

    def hook(i):
        def count(module, args):
            x = args[0].reshape(-1, blocks[i].hidden_size)  # [T, H]
            _, idx = blocks[i].route(x)  # [T, k]
            counts[i] += torch.bincount(idx.flatten().cpu(), minlength=blocks[i].num_experts)
        return count

    handles = [b.module.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    device = next(model.parameters()).device
    try:
        for s in tqdm(range(0, ids.shape[0], batch_size), desc="routing profile", unit="batch", disable=ids.shape[0] < 4):
            model(ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(counts).numpy()


def skew(counts: np.ndarray) -> np.ndarray:
    """Max/min tokens per expert for each layer of a profile [layers, experts] (inf when an expert got none)."""
    counts = np.asarray(counts, dtype=float)
    with np.errstate(divide="ignore"):
        return counts.max(axis=1) / counts.min(axis=1)
