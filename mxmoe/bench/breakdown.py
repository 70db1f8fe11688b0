"""Where a forward's device time goes: one profiled call, its kernels summed by name and by kind.

``kernel_breakdown(fn, device)`` runs ``fn`` once under ``torch.profiler`` and returns the device time of
every kernel (self time, microseconds), the top kernels by name and the sums per ``KINDS`` category,
matched on the lower-cased kernel name in order (the first pattern that matches wins; "other" catches
the rest). The categories are a reading aid: kernel names differ between libraries and GPUs, so the top
kernels are kept beside them, and a category's sum is only as right as its patterns. On a CPU (the dry
run) the same code sums the ATen operators' self CPU time.
"""

from __future__ import annotations

import re

import torch
from torch.profiler import ProfilerActivity, profile

# (category, pattern on the lower-cased kernel name), tried in order
KINDS = (
    ("experts GEMM", r"group_gemm|grouped|groupproblem|ptrarray|bmm"),
    ("experts glue", r"_silu_mul_kernel|_combine_kernel|act_quant|quantize_rows|sort|topk|scatter|cumsum|index|gather"),
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention|softmax"),
    ("dense GEMM", r"gemm|gemv|nvjet|xmma|cublas|cutlass|addmm|\bmm\b|linear|matmul"),
    ("norm and elementwise", r"norm|elementwise|vectorized|reduce|mul|add|silu|rsqrt|pow|mean|copy|cat|fill"),
)
TOP = 25  # kernels kept by name


def kind_of(name: str) -> str:
    """The ``KINDS`` category of one kernel or operator name ('other' when no pattern matches)."""
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_breakdown(fn, device) -> dict:
    """Profile one call of ``fn`` on ``device``: {'total_us', 'kernels', 'by_kind': {kind: us}, 'top': [[name,
    calls, us], ...]} (device kernels' self time on a GPU, operators' self CPU time on a CPU)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for evt in prof.key_averages():
        if cuda:
            us = evt.self_device_time_total if evt.device_type == torch.autograd.DeviceType.CUDA else 0.0
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append((evt.key, evt.count, float(us)))
    rows.sort(key=lambda r: -r[2])
    by_kind: dict = {}
    for name, _, us in rows:
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    return {
        "total_us": sum(us for _, _, us in rows),
        "kernels": sum(calls for _, calls, _ in rows),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [[name[:120], calls, us] for name, calls, us in rows[:TOP]],
        "timer": "device kernels (self time)" if cuda else "CPU operators (self time)",
    }
