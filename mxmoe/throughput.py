"""Prefill throughput and weight memory of a model, for comparing a quantized checkpoint with its base.

``prefill`` times whole-model forward passes over ``tokens`` tokens (sequences of at most
``seqlen``, random ids, no KV cache) after one warm-up pass (which compiles the Triton kernels on a
GPU). ``weight_memory`` counts the bytes the model holds: all of it, and its expert blocks alone
(packed codes + scales for a loaded checkpoint; for a float model, what those weights take in bf16).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mxmoe.models.blocks import BLOCKS, mlp_linear, moe_blocks
from mxmoe.models.placement import input_device, model_devices
from mxmoe.packed import PackedBlock, PackedExperts, QuantLinear


def _held(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def weight_memory(model: nn.Module) -> dict:
    """{"total_bytes", "expert_bytes", "expert_bf16_bytes"} of a float model or a loaded checkpoint.

    total: every parameter and buffer the model holds; expert: the routed and shared expert blocks
    as held; expert_bf16: the same blocks' parameter count × 2 bytes (the bf16 reference).
    """

    total = sum(_held(t) for t in list(model.parameters()) + list(model.buffers()))
    expert, numel = 0, 0
    for b in moe_blocks(model):
        packed = getattr(b.experts, "mxmoe_packed", None)
        if isinstance(packed, PackedExperts):
            expert += sum(blk.nbytes for blk in packed.modules() if isinstance(blk, PackedBlock))
        else:
            expert += sum(_held(t) for t in b.experts.parameters())
        numel += (
            (b.experts.gate_up_proj.numel() + b.experts.down_proj.numel())
            if b.fused
            else sum(p.numel() for p in b.experts.parameters())
        )
        for mlp in b.shared:
            for name in BLOCKS:
                lin = mlp_linear(mlp, name)
                if isinstance(lin, QuantLinear):
                    expert += lin.block.nbytes
                    numel += lin.in_features * lin.out_features
                else:
                    expert += _held(lin.weight)
                    numel += lin.weight.numel()
    return {"total_bytes": total, "expert_bytes": expert, "expert_bf16_bytes": 2 * numel}


def _sync(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


@torch.no_grad()
def prefill(model: nn.Module, tokens: int, seqlen: int = 512, repeats: int = 3, seed: int = 0) -> dict:
    """Tokens per second of forward passes over ``tokens`` random tokens in sequences of ``min(seqlen, tokens)``.

    A model spread over several GPUs (accelerate's device map) takes the ids on its input embeddings'
    device, and the clock stops when every GPU it uses is done (host wall clock between synchronisations).
    Returns {"tokens", "batch", "seqlen", "seconds" (median of ``repeats``), "tokens_per_s",
    "peak_gpu_bytes" (the largest over the model's GPUs; None on a CPU), "peak_gpu_bytes_per_device"}.
    """
    device = input_device(model)
    devices = [d for d in model_devices(model) if d.type == "cuda"]
    length = min(seqlen, tokens)
    batch = -(-tokens // length)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(device)  # [batch, length]
    model(ids, use_cache=False)  # warm-up: kernel compilation, allocator
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    times = []
    for _ in range(repeats):
        _sync(devices)
        start = time.perf_counter()
        model(ids, use_cache=False)
        _sync(devices)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peaks = {str(d): torch.cuda.max_memory_allocated(d) for d in devices}
    return {
        "tokens": batch * length,
        "batch": batch,
        "seqlen": length,
        "seconds": seconds,
        "tokens_per_s": batch * length / seconds,
        "peak_gpu_bytes": max(peaks.values()) if peaks else None,
        "peak_gpu_bytes_per_device": peaks or None,
    }
