"""Stage 02, routing: tokens per expert of a model on each corpus, stored per corpus and reused.

Writes <results>/<model>/routing/<corpus>_n<n>_s<seqlen>.json (format: ``mxmoe.routing.routing_report``
plus ``params``: model, corpus, windows, seqlen, seed, device, date).
"""

from __future__ import annotations

import glob
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mxmoe import plan
from mxmoe.checkpoint import weights_id
from mxmoe.env import REPO_ROOT, device_name
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.models import load_model
from mxmoe.paths import results_dir
from mxmoe.profiles import random_windows
from mxmoe.routing import corpus_windows, routing_report


def profile_corpora(
    model_name: str,
    corpora=plan.ROUTING_CORPORA,
    n: int = 8,
    seqlen: int = plan.ROUTING_SEQLEN,
    seed: int = 0,
    batches=plan.BATCHES,
    allow_random: bool = False,
) -> dict:
    """Routing of ``model_name`` on each corpus; writes results/<model>/routing/<corpus>_n<n>_s<seqlen>.json each.

    Returns {corpus: report}. Reports carry their parameters (the weights' id among them), device and
    date; a file made with the same parameters and batch sizes is reused. ``allow_random``: a
    model without a tokenizer (smoke profile) is profiled on one corpus of seeded random ids, "random".
    """
    model, tok = load_model(model_name)
    if tok is None and not allow_random:
        raise MxMoEError(f"{model_name} has no tokenizer (random tiny model): routing on text needs a real model")
    if tok is None:
        corpora = ("random",)
    weights = weights_id(model_name, model)  # a profile of other weights under the same name is not reused
    out = {}
    for corpus in corpora:
        path = results_dir() / model_name / "routing" / f"{corpus}_n{n}_s{seqlen}.json"
        params = {
            "model": model_name,
            "weights_id": weights,
            "corpus": corpus,
            "windows": n,
            "seqlen": seqlen,
            "seed": seed,
        }
        if path.exists():  # reuse a profile made with the same parameters and batch sizes
            old = json.loads(path.read_text())
            if {k: old["params"].get(k) for k in params} == params and set(old["workloads"]) == {
                str(b) for b in batches
            }:
                out[corpus] = old
                continue
        windows = (
            random_windows(model.config.vocab_size, n, seqlen, seed)
            if tok is None
            else corpus_windows(tok, corpus, n, seqlen, seed)
        )
        report = routing_report(model, windows, batches)
        report["params"] = {**params, "device": device_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        write_json_atomic(path, report)
        out[corpus] = report
    return out


# The training-free build's full-run profile, relative to the repository: the committed paper-model runs were
# skewed by it (their provenance names its former folder, results/smollm2-moe/).
EMBEDDED_PROFILE = "results/smollm2-moe-tf/routing/wikitext2_*.json"


def embedded_profile() -> dict:
    """The committed WikiText-2 routing profile that skews the paper models' random routers (``EMBEDDED_PROFILE``):
    {'counts' [L, E], 'layers', 'top_k', 'source'}."""
    files = sorted(glob.glob(str(REPO_ROOT / EMBEDDED_PROFILE)))
    if not files:
        raise FileNotFoundError(
            f"no routing profile {EMBEDDED_PROFILE} in {REPO_ROOT}: run notebook 02 on smollm2-moe-tf, "
            "or pass ratio= to target_profile"
        )
    doc = json.loads(Path(files[-1]).read_text())
    return {
        "counts": np.asarray(doc["counts"], dtype=float),
        "layers": doc["layers"],
        "top_k": doc["top_k"],
        "source": str(Path(files[-1]).relative_to(REPO_ROOT)),
    }
