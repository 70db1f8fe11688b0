"""Evaluation: GPTQ-style token perplexity (zero-shot accuracy comes with the accuracy path).

Perplexity is token level, as in GPTQ: the split joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens, ``exp(mean NLL)`` over every predicted token.
lm-eval's word perplexity is a different number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mxmoe.data import load_text, tokenize_text
from mxmoe.errors import SeqLenTooLong


def model_context(model) -> int:
    """The longest sequence the model was built for (config.max_position_embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def eval_windows(tokenizer, seqlen: int, windows: int | None = None, dataset: str = "wikitext2", split: str = "test") -> torch.Tensor:
    """The first ``windows`` non-overlapping windows [n, seqlen] of a split (all when None)."""
    ids = tokenize_text(tokenizer, load_text(dataset, split))
    total = ids.numel() // seqlen
    if total == 0:
        raise ValueError(f"{dataset} ({split}) has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if windows is None else min(windows, total)
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: "int | None" = None, desc: str = "perplexity") -> float:
    """Token perplexity exp(mean NLL) of ``model`` over token windows [n, seqlen], deterministic.

    ``batch_size`` windows per forward (default: 8 on a GPU, 1 on a CPU).
    """
    seqlen = windows.shape[1]
    context = model_context(model)
    if context and seqlen > context:
        raise SeqLenTooLong(f"seqlen {seqlen} is longer than the model's context of {context} tokens; "
                            f"use --seqlen {context} or less")
    device = next(model.parameters()).device
    batch_size = batch_size or (8 if device.type == "cuda" else 1)
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        batch = windows[i : i + batch_size].to(device)  # [b, seqlen]
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, seqlen-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


_PRISTINE: dict = {}


def fresh_model(name: str):
    """(model, tokenizer): an unquantized copy of ``name``, loaded once per process and deep-copied after."""
    import copy

    from mxmoe.models import load_model

    if name not in _PRISTINE:
        _PRISTINE.clear()  # keep one model in memory
        _PRISTINE[name] = load_model(name)
    model, tok = _PRISTINE[name]
    return copy.deepcopy(model), tok


def evaluate_config(config, profile, *, scheme_map: "dict | None" = None, zeroshot: bool = True, tasks=None,
                    progress: bool = True) -> dict:
    """Quantize a fresh ``profile.model`` per ``config`` (``mxmoe.baselines.QuantConfig``) and measure it.

    ``scheme_map`` replaces the config's uniform scheme (an allocation). WikiText-2 perplexity on the
    profile's test windows; zero-shot accuracy on ``tasks`` (default: all) with the profile's limit
    when ``zeroshot`` and the model has a tokenizer. GPTQ calibrates on the profile's WikiText-2 train
    windows. The row is cached under results/<model>/eval/runs/, keyed by the quantization recipe (not
    its label), the scheme map and the profile sizes it used (not the profile's name), and
    returned as {"label", "w_bits", "a_bits", "ppl", "tasks", "profile", "device", "seconds", "params"}.
    """
    import hashlib
    import json
    import time

    from mxmoe.baselines import quantize
    from mxmoe.data import TASKS
    from mxmoe.models.smollm2 import device_name
    from mxmoe.paths import results_dir, write_json_atomic
    from mxmoe.profiles import calibration, evaluation
    from mxmoe.quant.apply import scheme_map_to_rows

    recipe = {k: v for k, v in config.as_dict().items() if k != "label"}  # the label names, the recipe decides
    rows = None if scheme_map is None else scheme_map_to_rows(scheme_map)

    def cache(tasks: list) -> tuple[dict, Path]:
        sizes = {k: getattr(profile, k) for k in ("model", "calib_windows", "calib_seqlen", "eval_windows", "eval_seqlen")}
        if tasks:
            sizes["zeroshot_limit"] = profile.zeroshot_limit
        params = {"config": recipe, "profile": sizes, "tasks": tasks, "scheme_map": rows}
        key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return params, results_dir() / profile.model / "eval" / "runs" / f"{config.method}-{profile.name}-{key}.json"

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
        from mxmoe.zeroshot import evaluate_tasks

        accuracy = {t: r["value"] for t, r in evaluate_tasks(model, tok, tasks, profile.zeroshot_limit).items()}
    row = {"label": config.label, "w_bits": report["w_bits"], "a_bits": report["a_bits"], "ppl": ppl,
           "tasks": accuracy, "profile": profile.name, "device": device_name(),
           "seconds": round(time.time() - start, 1), "quantization": report, "params": params}
    write_json_atomic(path, row)
    return row
