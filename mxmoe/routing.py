"""Expert routing profiles: how many tokens each expert of each MoE layer receives."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mxmoe import plan
from mxmoe.data import calibration_windows
from mxmoe.errors import MxMoEError
from mxmoe.metrics import eval_windows
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.placement import input_device


@torch.no_grad()
def profile_routing(model, input_ids: torch.Tensor, batch_size: int = 1) -> np.ndarray:
    """Tokens routed to each expert: int array [moe_layers, experts]; each row sums to tokens·top_k.

    input_ids: [n, seqlen] (or [seqlen]) token windows, run through the model in batches. A model
    spread over several devices takes its ids on the input embeddings' device; each layer counts on
    its own device and only the counts [E] come to the host.
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
    device = input_device(model)
    try:
        for s in tqdm(
            range(0, ids.shape[0], batch_size), desc="routing profile", unit="batch", disable=ids.shape[0] < 4
        ):
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


# ---- profiles across corpora, skew statistics and kernel workloads ---------------------------------


def corpus_windows(tokenizer, corpus: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Token windows [n, seqlen] of a corpus: WikiText-2 test (first windows) or random windows of C4 / sotu / gutenberg."""
    try:
        if corpus == "wikitext2":
            windows = eval_windows(tokenizer, seqlen, n)
        else:
            windows = calibration_windows(tokenizer, corpus, n, seqlen, seed)
    except ValueError as e:  # unknown corpus, or too little text for one window
        raise MxMoEError(f"routing corpus {corpus!r}: {e}") from None
    if windows.shape[0] < n:
        raise MxMoEError(f"routing corpus {corpus!r} has only {windows.shape[0]} windows of {seqlen} tokens, {n} asked")
    return windows


def gini(counts: np.ndarray) -> np.ndarray:
    """Gini coefficient of tokens per expert for each layer of [layers, experts] (0 uniform, →1 one expert)."""
    x = np.sort(np.asarray(counts, dtype=float), axis=1)  # [L, E] ascending
    n = x.shape[1]
    rank = np.arange(1, n + 1)
    total = x.sum(axis=1)
    if (total == 0).any():
        raise ValueError("a layer of the profile has no tokens: the Gini coefficient is undefined")
    return ((2 * rank - n - 1) * x).sum(axis=1) / (n * total)


def top_share(counts: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Share of all routed tokens taken by the busiest ceil(fraction·E) experts, per layer."""
    x = np.sort(np.asarray(counts, dtype=float), axis=1)[:, ::-1]
    top = max(1, int(np.ceil(fraction * x.shape[1])))
    return x[:, :top].sum(axis=1) / x.sum(axis=1)


def batch_workload(counts: np.ndarray, batch_tokens: int, top_k: int) -> np.ndarray:
    """Tokens per expert [layers, experts] (int) for a batch of ``batch_tokens`` tokens routed like the profile.

    Each row sums to ``batch_tokens · top_k``; the profile's frequencies are scaled and rounded by
    largest remainders, so rarely used experts get 0 at small batches as they would in serving.
    """
    freq = np.asarray(counts, dtype=float)
    freq = freq / freq.sum(axis=1, keepdims=True)
    exact = freq * batch_tokens * top_k  # [L, E]
    out = np.floor(exact).astype(np.int64)
    short = batch_tokens * top_k - out.sum(axis=1)  # [L]
    for layer, k in enumerate(short):
        out[layer, np.argsort(-(exact[layer] - out[layer]), kind="stable")[:k]] += 1
    return out


def skew_stats(counts: np.ndarray) -> dict:
    """Per-layer skew of a profile: max/min (None where an expert got no token), Gini, top-10% share, unused experts."""
    counts = np.asarray(counts)
    ratio = skew(counts)
    return {
        "max_over_min": [None if not np.isfinite(r) else float(r) for r in ratio],
        "gini": [float(g) for g in gini(counts)],
        "top10_share": [float(s) for s in top_share(counts, 0.1)],
        "unused_experts": [int((row == 0).sum()) for row in counts],
    }


def routing_report(model, windows: torch.Tensor, batches=plan.BATCHES) -> dict:
    """Profile ``windows`` [n, seqlen]: counts, skew statistics and batch workloads, JSON-ready."""
    blocks = moe_blocks(model)
    counts = profile_routing(model, windows)
    top_k = blocks[0].top_k
    return {
        "layers": [b.layer for b in blocks],
        "top_k": top_k,
        "tokens": int(windows.numel()),
        "counts": counts.tolist(),
        "skew": skew_stats(counts),
        "workloads": {str(bt): batch_workload(counts, bt, top_k).tolist() for bt in batches},
    }
