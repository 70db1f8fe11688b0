"""Measured ceilings of the GPU at hand (copy bandwidth, bf16/int8/fp8 matmul rates) and run provenance."""

from __future__ import annotations

import datetime
import platform
import subprocess

import torch
import triton

from mxmoe.bench.timing import events_ms
from mxmoe.env import git_commit
from mxmoe.kernels.version import kernel_fingerprint


def provenance() -> dict:
    """Device, driver, library versions, date, git commit and kernel fingerprint of this measurement."""
    dev = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi unavailable"
    return {
        "device": dev.name,
        "sm": f"{dev.major}.{dev.minor}",
        "multiprocessors": dev.multi_processor_count,
        "memory_gib": round(dev.total_memory / 2**30, 1),
        "nvidia_smi": smi,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "kernel": kernel_fingerprint(),
    }


def _median_ms(fn) -> float:
    return events_ms(fn, warmup_ms=25, rep_ms=200)


def measure_roofline(size: int = 8192) -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rates on [size]^3, measured now."""
    out = {}
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    out["copy_GBps"] = 2 * src.numel() * 4 / _median_ms(lambda: dst.copy_(src)) / 1e6
    src = dst = None  # free the 2 GiB before the matmul timings
    flops = 2.0 * size**3
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out["bf16_TFLOPs"] = flops / _median_ms(lambda: a @ b) / 1e9
    ai = torch.randint(-127, 128, (size, size), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 128, (size, size), device="cuda", dtype=torch.int8).t()  # column-major
    try:
        out["int8_TOPs"] = flops / _median_ms(lambda: torch._int_mm(ai, bi)) / 1e9
    except RuntimeError as err:
        out["int8_TOPs"], out["int8_error"] = None, str(err)[:200]
    af = a.to(torch.float8_e4m3fn)
    bf = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
    one = torch.ones((), device="cuda")
    try:
        out["fp8_TFLOPs"] = (
            flops
            / _median_ms(lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16, use_fast_accum=True))
            / 1e9
        )
    except RuntimeError as err:
        out["fp8_TFLOPs"], out["fp8_error"] = None, str(err)[:200]
    return out
