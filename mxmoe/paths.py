"""The results tree: which root a profile writes to (stage layer: only stages, plots and apps use it)."""

from __future__ import annotations

import os
from pathlib import Path

from mxmoe.env import REPO_ROOT, cache_dir
from mxmoe.profiles import default_profile, get_profile


def results_dir() -> Path:
    """Root of stage outputs: $MXMOE_RESULTS_DIR, else the root of this machine's default profile
    (results/ with a CUDA GPU, results/quick/ without; see ``resolve_results_dir``)."""
    if os.environ.get("MXMOE_RESULTS_DIR"):
        return Path(os.environ["MXMOE_RESULTS_DIR"])
    return resolve_results_dir(default_profile())


def smoke_results_dir() -> Path:
    """Where smoke-profile runs write (a cache folder: never committed)."""
    return cache_dir() / "smoke-results"


def resolve_results_dir(profile: str) -> Path:
    """The results root of a profile: $MXMOE_RESULTS_DIR when set, else results/ for the full (GPU) profile,
    results/quick/ for the quick (CPU) one, and a cache folder for smoke."""
    if os.environ.get("MXMOE_RESULTS_DIR"):
        return Path(os.environ["MXMOE_RESULTS_DIR"])
    if profile == "smoke":
        return smoke_results_dir()
    return REPO_ROOT / "results" / "quick" if profile == "quick" else REPO_ROOT / "results"


def use_profile_results(profile: str) -> Path:
    """Point ``results_dir()`` of this process at ``profile``'s root (unless $MXMOE_RESULTS_DIR is set); return it.

    Notebooks call it after choosing their profile, so an interactive run reads and writes the same
    files as ``make reproduce`` with that profile.
    """
    root = resolve_results_dir(profile)
    os.environ["MXMOE_RESULTS_DIR"] = str(root)
    return root


def kernel_results_dir(root: "str | Path | None" = None) -> Path:
    """Kernel benchmark results (GPU runs of ``mxmoe.bench.gemm`` / ``mxmoe.bench.alloc``), shared by every profile.

    ``<root>/kernels`` when it holds a benchmark file (root: the results root in use), else the
    committed ``results/kernels`` of the repository.
    """
    own = Path(root or results_dir()) / "kernels"
    if any(own.glob("bench_*.json")) or any(own.glob("figure5_*.json")):
        return own
    return REPO_ROOT / "results" / "kernels"


def model_dirname(model: str) -> str:
    """Folder name of a model's results: the zoo name, or an HF id / path with '/' made safe."""
    return model.strip("/").replace("/", "--")


def default_model(profile: str) -> str:
    """The model a profile runs on (``mxmoe.plan.PROFILES``)."""
    return get_profile(profile).model
