"""Perplexity: GPTQ-style token perplexity of a model over token windows (zero-shot: ``mxmoe.zeroshot``).

Perplexity is token level, as in GPTQ: the split joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens, ``exp(mean NLL)`` over every predicted token.
lm-eval's word perplexity is a different number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mxmoe.data import load_text, tokenize_text
from mxmoe.errors import SeqLenTooLong


def model_context(model) -> int:
    """The longest sequence the model was built for (config.max_position_embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def eval_windows(
    tokenizer, seqlen: int, windows: int | None = None, dataset: str = "wikitext2", split: str = "test"
) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows [n, seqlen] of a split (all when None)."""
    ids = tokenize_text(tokenizer, load_text(dataset, split))
    total = ids.numel() // seqlen
    if total == 0:
        raise ValueError(f"{dataset} ({split}) has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if windows is None else min(windows, total)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: "int | None" = None, desc: str = "perplexity") -> float:
    """Token perplexity exp(mean NLL) of ``model`` over token windows [n, seqlen], deterministic.

    ``batch_size`` windows per forward (default: 8 on a GPU, 1 on a CPU).
    """
    seqlen = windows.shape[1]
    context = model_context(model)
    if context and seqlen > context:
        raise SeqLenTooLong(
            f"seqlen {seqlen} is longer than the model's context of {context} tokens; use --seqlen {context} or less"
        )
    device = model.get_input_embeddings().weight.device  # where the ids go, also for a model over several GPUs
    batch_size = batch_size or (8 if device.type == "cuda" else 1)
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        batch = windows[i : i + batch_size].to(device)  # [b, seqlen]
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, seqlen-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
