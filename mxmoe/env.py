"""Where mxmoe runs: the repository's fixed folders, the cache folder and the device.

A base module: it imports nothing of mxmoe, so every layer may use it.
"""

from __future__ import annotations

import os
import platform
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
