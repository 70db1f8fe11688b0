"""Where mxmoe runs: the repository's fixed folders, the cache folder and the device.

A base module: it imports nothing of mxmoe, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
COST_TABLES = REPO_ROOT / "cost_tables"  # the performance model's per-GPU cost tables, <gpu>.json


def cache_dir() -> Path:
    """Cache for built models and tokenized data: $MXMOE_CACHE_DIR, else ~/.cache/mxmoe."""
    return Path(os.environ.get("MXMOE_CACHE_DIR", Path.home() / ".cache" / "mxmoe"))


def default_device() -> torch.device:
    """Where models are loaded and quantized: $MXMOE_DEVICE if set, else the first CUDA GPU, else the CPU."""
    return torch.device(os.environ.get("MXMOE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name() -> str:
    """A short description of the machine that ran a measurement."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    """A device name as it appears in result file names: 'NVIDIA H200 (139.8 GiB)' -> 'NVIDIA_H200'."""
    return name.split(" (")[0].replace(" ", "_")


def git_commit() -> str:
    """The commit a measurement ran on: $MXMOE_COMMIT (set by whoever ships the tree to a machine without
    its git history), else the repository's HEAD, else 'unknown'."""
    commit = os.environ.get("MXMOE_COMMIT")
    if commit:
        return commit
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() or "unknown"


def device_guard(device: "torch.device | str | None"):
    """A context that makes ``device`` the current CUDA device (a no-op for a CPU or meta device, or None).

    Triton launches a kernel on the *current* CUDA device, not on its tensors' device: a model spread
    over several GPUs must make each layer's GPU current around its kernel launches.
    """
    if device is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
