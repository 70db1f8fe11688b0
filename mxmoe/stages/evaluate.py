"""Stage 05's measuring step: quantize a fresh model per recipe and measure it, cached by recipe.

``evaluate_config`` is the one path every accuracy number of the book goes through (Tables 1, 3, 4, 5
and Figure 6): the same calibration windows for GPTQ, the same WikiText-2 test windows and the same
lm-eval subsets. Rows are cached as <results>/<model>/eval/runs/<method>-<profile>-<key>.json; the
Table writers below assemble them into table1/3/4/5.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from mxmoe import plan
from mxmoe.baselines import allocation_config, baseline, quantize, rotated_uniform_config, rtn_grid_config
from mxmoe.checkpoint import weights_id
from mxmoe.data import TASKS
from mxmoe.env import device_name
from mxmoe.files import write_json_atomic
from mxmoe.metrics import perplexity
from mxmoe.models import load_model
from mxmoe.paths import results_dir
from mxmoe.profiles import Profile, calibration, evaluation
from mxmoe.quant.apply import scheme_map_to_rows
from mxmoe.zeroshot import evaluate_tasks

_PRISTINE: dict = {}  # name -> (model, tokenizer, checkpoint.weights_id)


def _pristine(name: str) -> tuple:
    """(model, tokenizer, weights id) of ``name``, loaded once per process (one model kept in memory)."""
    if name not in _PRISTINE:
        _PRISTINE.clear()
        model, tok = load_model(name)
        _PRISTINE[name] = (model, tok, weights_id(name, model))
    return _PRISTINE[name]


def fresh_model(name: str):
    """(model, tokenizer): an unquantized copy of ``name``, loaded once per process and deep-copied after."""
    model, tok, _ = _pristine(name)
    return copy.deepcopy(model), tok


def scheme_map_digest(rows: "list[dict] | None") -> "dict | None":
    """What a run row records of its scheme map (``scheme_map_to_rows`` rows; None for a uniform scheme): the
    sha256 of the rows as the cache key hashes them, the block count and the blocks per scheme."""
    if rows is None:
        return None
    return {
        "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "blocks": len(rows),
        "blocks_per_scheme": dict(Counter(r["scheme"] for r in rows)),
    }


def run_key(params: dict) -> str:
    """The cache key of an ``evaluate_config`` row: a short sha256 of its ``params``."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def evaluate_config(
    config, profile, *, scheme_map: "dict | None" = None, zeroshot: bool = True, tasks=None, progress: bool = True
) -> dict:
    """Quantize a fresh ``profile.model`` per ``config`` (``mxmoe.baselines.QuantConfig``) and measure it.

    ``scheme_map`` replaces the config's uniform scheme (an allocation). WikiText-2 perplexity on the
    profile's test windows; zero-shot accuracy on ``tasks`` (default: all) with the profile's limit
    when ``zeroshot`` and the model has a tokenizer. GPTQ calibrates on the profile's WikiText-2 train
    windows. The row is cached under results/<model>/eval/runs/, keyed by the quantization recipe (not
    its label), the scheme map's digest (``scheme_map_digest``; the allocation file holds the map itself), the
    profile sizes it used (not the profile's name) and the model's ``checkpoint.weights_id``: exactly the row's
    ``params`` (``run_key``). Returned as {"label", "w_bits", "a_bits", "ppl", "tasks", "profile", "device",
    "seconds", "params"}.
    """
    recipe = {k: v for k, v in config.as_dict().items() if k != "label"}  # the label names, the recipe decides
    rows = None if scheme_map is None else scheme_map_to_rows(scheme_map)

    def cache(tasks: list) -> tuple[dict, Path]:
        sizes = {
            k: getattr(profile, k) for k in ("model", "calib_windows", "calib_seqlen", "eval_windows", "eval_seqlen")
        }
        sizes["weights_id"] = _pristine(profile.model)[2]  # never a row of other weights under the same name
        if tasks:
            sizes["zeroshot_limit"] = profile.zeroshot_limit
        params = {"config": recipe, "profile": sizes, "tasks": tasks, "scheme_map": scheme_map_digest(rows)}
        return (
            params,
            results_dir() / profile.model / "eval" / "runs" / f"{config.method}-{profile.name}-{run_key(params)}.json",
        )

    tasks = list(tasks or TASKS) if zeroshot else []
    params, path = cache(tasks)
    # the same quantization measured before (perhaps under another label); a perplexity-only request
    # also takes the row of a run that added the default zero-shot tasks
    for hit in [path] + ([] if tasks else [cache(list(TASKS))[1]]):
        if hit.exists():
            return {**json.loads(hit.read_text()), "label": config.label}
    start = time.time()
    model, tok = fresh_model(profile.model)
    calib = calibration(model, tok, profile, seed=config.seed) if config.method == "gptq" else None
    report = quantize(model, config, calib, scheme_map, progress=progress)
    ppl = perplexity(model, evaluation(model, tok, profile), desc=f"perplexity {config.label}")
    accuracy = {}
    if tasks and tok is not None:
        accuracy = {t: r["value"] for t, r in evaluate_tasks(model, tok, tasks, profile.zeroshot_limit).items()}
    row = {
        "label": config.label,
        "w_bits": report["w_bits"],
        "a_bits": report["a_bits"],
        "ppl": ppl,
        "tasks": accuracy,
        "profile": profile.name,
        "device": device_name(),
        "seconds": round(time.time() - start, 1),
        "quantization": report,
        "params": params,
    }
    write_json_atomic(path, row)
    return row


# ---- the paper's tables, assembled from evaluate_config rows -------------------------------------

TABLE1_KEYS = ("w_bits", "a_bits", "ppl", "tasks", "profile", "device")


def table1_row(row: dict) -> dict:
    """The <results>/<model>/eval/table1.json entry of one ``evaluate_config`` row."""
    return {k: row[k] for k in TABLE1_KEYS}


def table1_mxmoe_configs(model: str, seed: int = 0) -> "list[tuple]":
    """Table 1's MxMoE rows of ``model``: [(QuantConfig, scheme map)] of the ``plan.TABLE1_MXMOE`` allocations
    (read from stage 04's files)."""
    from mxmoe.stages.allocation import load_allocation

    return [(allocation_config(label, seed), load_allocation(model, s)) for label, s in plan.TABLE1_MXMOE.items()]


def table1(profile: Profile, zeroshot: bool = True, seed: int = 0) -> "tuple[dict, dict, dict]":
    """Table 1: the baselines of ``plan.TABLE1_BASELINES`` and the allocations of ``plan.TABLE1_MXMOE``.

    Writes <results>/<model>/eval/table1.json; returns (table1 entries, full rows, scheme maps) by label.
    """
    pairs = [(baseline(name), None) for name in plan.TABLE1_BASELINES] + table1_mxmoe_configs(profile.model, seed)
    configs = [c for c, _ in pairs]
    maps = {c.label: smap for c, smap in pairs}
    rows = {c.label: evaluate_config(c, profile, scheme_map=maps[c.label], zeroshot=zeroshot) for c in configs}
    table = {label: table1_row(row) for label, row in rows.items()}
    write_json_atomic(results_dir() / profile.model / "eval" / "table1.json", table)
    return table, rows, maps


def table3(profile: Profile, measured: dict, seed: int = 0) -> dict:
    """Table 3: linear-block vs expert granularity (``plan.TABLE3``); writes table3.json.

    ``measured``: rows already measured, by allocation setting (Table 1's), so they are not quantized again.
    """
    from mxmoe.stages.allocation import alloc_path, load_allocation

    rows, row = {}, None
    for name, setting in plan.TABLE3.items():
        row = measured.get(setting) or evaluate_config(
            allocation_config(setting, seed),
            profile,
            scheme_map=load_allocation(profile.model, setting),
            zeroshot=False,
        )
        doc = json.loads(alloc_path(profile.model, setting).read_text())
        rows[name] = {
            "setting": setting,
            "ppl": row["ppl"],
            "w_bits": row["w_bits"],
            "predicted_T_ms": doc["predicted"]["T_launch_ms"],
        }
    write_json_atomic(
        results_dir() / profile.model / "eval" / "table3.json",
        {"profile": profile.name, "device": row["device"], "rows": rows},
    )
    return rows


def table5(profile: Profile, mixed_ppl: float, device: str) -> dict:
    """Table 5: uniform w<b>a<b> with rotation (``plan.TABLE5_BITS``) beside the mixed W5A5 allocation's PPL."""
    ppl = {
        f"w{b}a{b}": evaluate_config(rotated_uniform_config(b, b), profile, zeroshot=False)["ppl"]
        for b in plan.TABLE5_BITS
    }
    ppl["mxmoe-w5a5"] = mixed_ppl
    write_json_atomic(
        results_dir() / profile.model / "eval" / "table5.json",
        {
            "profile": profile.name,
            "device": device,
            "method": "GPTQ + random Hadamard, per-channel sym weights, per-token activations",
            "ppl": ppl,
        },
    )
    return ppl


def table4(profile: Profile, bits=plan.TABLE4_BITS) -> dict:
    """Table 4: WikiText-2 PPL under uniform RTN, weight bits x activation bits; writes table4_<profile>.json.

    Returns the document: {"profile", "device", "fp_ppl", "method", "ppl": {"w<w>a<a>": ppl}}.
    """
    fp = evaluate_config(baseline("fp16"), profile, zeroshot=False, progress=False)
    cells = {
        f"w{w}a{a}": evaluate_config(rtn_grid_config(w, a), profile, zeroshot=False, progress=False)["ppl"]
        for w in bits
        for a in bits
    }
    doc = {
        "profile": profile.as_dict(),
        "device": fp["device"],
        "fp_ppl": fp["ppl"],
        "method": "rtn, per-channel sym weights, per-token sym activations",
        "ppl": cells,
    }
    write_json_atomic(results_dir() / profile.model / "eval" / f"table4_{profile.name}.json", doc)
    return doc
