"""Stage 01, sensitivity: Δ of every block of a model under every scheme, cached and resumable.

Writes <results>/<model>/sensitivity/<method>_<n>schemes-<hash>_<calibration>.json (format:
``mxmoe.sensitivity.compute_sensitivity``), rewritten after each layer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mxmoe.checkpoint import weights_id
from mxmoe.data import calibration_windows
from mxmoe.errors import MxMoEError
from mxmoe.models import load_model
from mxmoe.paths import results_dir
from mxmoe.profiles import random_windows
from mxmoe.quant.apply import check_scheme
from mxmoe.schemes import scheme_set
from mxmoe.sensitivity import compute_sensitivity


def cache_path(model_name: str, method: str, schemes, calib: str):
    """results/<model>/sensitivity/<method>_<schemes hash>_<calib>.json for one (method, scheme set, calibration)."""
    names = ",".join(str(check_scheme(s)) for s in schemes)
    digest = hashlib.sha256(names.encode()).hexdigest()[:8]
    return results_dir() / model_name / "sensitivity" / f"{method}_{len(schemes)}schemes-{digest}_{calib}.json"


def run_sensitivity(
    model_name: str,
    method: str = "rtn",
    schemes: str = "hopper",
    calib: str = "wikitext2",
    n: int = 8,
    seqlen: int = 512,
    seed: int = 0,
    progress: bool = True,
    allow_random: bool = False,
    **kw,
) -> tuple[dict, Path]:
    """Load ``model_name``, draw ``n`` calibration windows of ``calib`` and compute (or resume) its Δ file.

    ``schemes`` is a scheme-set name or a comma-separated list (``mxmoe.schemes.scheme_set``).
    ``allow_random``: a model without a tokenizer (tiny random MoE, smoke profile) is calibrated on
    seeded random token ids instead of text (calibration tag ``random-...``).
    A file is resumed only when made from the same weights (``checkpoint.weights_id`` is in its params).
    Returns (result, path of results/<model>/sensitivity/<...>.json).
    """
    try:
        scheme_list = scheme_set(schemes)
    except ValueError as e:
        raise MxMoEError(str(e)) from None
    scheme_list = [check_scheme(s) for s in scheme_list]  # fail before loading the model
    model, tok = load_model(model_name)
    if tok is None and not allow_random:
        raise MxMoEError(f"{model_name} has no tokenizer (random tiny model): calibration on text needs a real model")
    if tok is None:
        calib = "random"
        windows = random_windows(model.config.vocab_size, n, seqlen, seed)
    else:
        windows = calibration_windows(tok, calib, n, seqlen, seed)
    tag = f"{calib}-n{n}-s{seqlen}-seed{seed}"
    path = cache_path(model_name, method, scheme_list, tag)
    params = {
        "model": model_name,
        "weights_id": weights_id(model_name, model),
        "calibration": tag,
        "scheme_set": schemes,
    }
    return compute_sensitivity(
        model, windows, scheme_list, method, path=path, params=params, seed=seed, progress=progress, **kw
    ), path


def profile_sensitivity(
    method: str, profile, schemes: str = "hopper", seed: int = 0, progress: bool = True
) -> tuple[dict, Path]:
    """``run_sensitivity`` at the sizes of a run profile (``mxmoe.profiles.Profile``) on its model.

    The smoke profile's tiny model has no tokenizer and is calibrated on random ids.
    """
    return run_sensitivity(
        profile.model,
        method,
        schemes,
        "wikitext2",
        profile.calib_windows,
        profile.calib_seqlen,
        seed,
        progress,
        allow_random=profile.name == "smoke",
    )
