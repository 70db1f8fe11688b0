"""Stage 01, sensitivity: Δ of every block of a model under every scheme, cached and resumable.

Writes <results>/<model>/sensitivity/<method>_<n>schemes-<hash>_<calibration>.json (format:
``mxmoe.sensitivity.compute_sensitivity``), rewritten after each layer. A scheme set that adds schemes to one
already measured on the same weights and windows measures only the added ones and merges the two (where both
routed the windows alike).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mxmoe.checkpoint import weights_id
from mxmoe.data import calibration_windows
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.models import load_model
from mxmoe.models.blocks import moe_blocks
from mxmoe.paths import results_dir
from mxmoe.profiles import random_windows
from mxmoe.quant.apply import check_scheme
from mxmoe.schemes import scheme_set
from mxmoe.sensitivity import RoutedOtherwise, compute_sensitivity, merge_schemes

log = logging.getLogger(__name__)


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
    Without a file for this scheme set, the largest complete file of a subset of it (``measured_subset``) is
    extended: only the other schemes are measured (their own file, resumable, removed once merged); where the two
    cannot be merged (``_merged``), every scheme is measured anew over every layer; the other schemes' pass stops at
    the first layer whose windows reach other tokens per expert than the subset's (a routing near-tie decided
    otherwise), before measuring it.
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
    subset = None if path.exists() else measured_subset(path, params, scheme_list, len(moe_blocks(model)))
    if subset is not None:
        have = set(subset["schemes"])
        missing = [s for s in scheme_list if str(s) not in have]
        part_path = cache_path(model_name, method, missing, tag)
        routing = {key: [lay["experts"], lay["tokens"]] for key, lay in subset["layers"].items()}
        try:  # stops at the first layer routed otherwise than the subset: no layer after it is measured in vain
            part = compute_sensitivity(
                model,
                windows,
                missing,
                method,
                path=part_path,
                params=params,
                seed=seed,
                progress=progress,
                routing=routing,
                **kw,
            )
            merged = _merged(subset, part, scheme_list)
        except RoutedOtherwise as e:
            log.warning("%s: measuring every scheme anew", e)
            merged = None
        part_path.unlink(missing_ok=True)
        if merged is not None:
            write_json_atomic(path, merged)
            return merged, path
        # measured with other settings, or the windows routed differently: the whole set is measured below
    return compute_sensitivity(
        model, windows, scheme_list, method, path=path, params=params, seed=seed, progress=progress, **kw
    ), path


def _merged(subset: dict, part: dict, schemes) -> "dict | None":
    """``subset`` and ``part`` as one result over ``schemes``, or None where they were measured with other settings
    (the scheme-set name aside) or their windows reached other tokens per expert (a routing near-tie decided
    otherwise, e.g. by a rotation computed on another machine or thread count)."""
    without_set = [{k: v for k, v in d["params"].items() if k != "scheme_set"} for d in (subset, part)]
    if without_set[0] != without_set[1]:
        return None
    try:
        return {**merge_schemes([subset, part], schemes), "params": part["params"]}
    except MxMoEError as e:
        log.warning("%s: measuring every scheme anew", e)
        return None


def measured_subset(path: Path, params: dict, schemes, layers: int) -> "dict | None":
    """The result with the most schemes among the complete files beside ``path`` (same method and calibration tag,
    every one of the model's ``layers`` MoE layers) measured on the same weights over a strict subset of ``schemes``;
    None when there is none."""
    method, tag = path.name.split("_", 1)[0], path.name.rsplit("_", 1)[1]
    want, best = {str(s) for s in schemes}, None
    for f in path.parent.glob(f"{method}_*schemes-*_{tag}"):
        doc = json.loads(f.read_text())
        old = doc.get("params", {})
        if (
            set(doc.get("schemes", ())) < want
            and len(doc.get("layers", {})) == layers
            and all(old.get(k) == params[k] for k in ("model", "weights_id", "calibration"))
            and (best is None or len(doc["schemes"]) > len(best["schemes"]))
        ):
            best = doc
    return best


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
