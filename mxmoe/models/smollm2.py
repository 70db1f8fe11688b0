"""The embedded default model ``smollm2-moe``: build recipe and atomic cache.

``build()`` runs :mod:`mxmoe.models.moefy` on SmolLM2-135M and saves the result as a standard
transformers checkpoint under the cache (written to a temporary folder, then renamed: a killed
build never leaves a readable half-written cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from mxmoe.data import calibration_windows
from mxmoe.env import cache_dir, device_name
from mxmoe.metrics import eval_windows, perplexity
from mxmoe.models import moefy

NAME = "smollm2-moe"
RECIPE = moefy.MoefyConfig()
MAX_DEV_RATIO = 1.2  # dev-set (WikiText-2 valid) perplexity budget when choosing the sparse layers
DEV_SEQLEN, DEV_WINDOWS = 512, 8


def cache_key(cfg: moefy.MoefyConfig = RECIPE) -> str:
    """A short hash of the recipe and the library versions that shape the weights."""
    blob = json.dumps([asdict(cfg), MAX_DEV_RATIO, DEV_SEQLEN, DEV_WINDOWS, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_dir(cfg: moefy.MoefyConfig = RECIPE) -> Path:
    """Where the built checkpoint lives (complete only when build.json is present)."""
    return cache_dir() / "models" / f"{NAME}-{cache_key(cfg)}"


def is_built(cfg: moefy.MoefyConfig = RECIPE) -> bool:
    """True when a complete build of this recipe is cached."""
    return (model_dir(cfg) / "build.json").exists()


def build(cfg: moefy.MoefyConfig = RECIPE, force: bool = False) -> Path:
    """Build smollm2-moe into the cache (unless already complete); returns the checkpoint folder.

    The build's facts (chosen layers, errors, dev perplexities, times) go into its ``build.json``;
    ``mxmoe.stages.model.build_model`` adds the measured card.
    """
    final = model_dir(cfg)
    if is_built(cfg) and not force:
        return final
    start, cpu_start = time.time(), time.process_time()
    dense, tok = moefy.load_dense()
    half = cfg.calib_windows // 2
    windows = torch.cat([calibration_windows(tok, "gutenberg", half, cfg.calib_seqlen, cfg.seed),
                         calibration_windows(tok, "wikitext2", cfg.calib_windows - half, cfg.calib_seqlen, cfg.seed)])
    model_cfg = moefy.moe_config(dense.config, cfg, list(range(dense.config.num_hidden_layers)))
    inputs = moefy.collect_ffn_inputs(dense, windows)
    splits, errors, blocks = {}, {}, {}
    for i in tqdm(range(len(inputs)), desc="split FFNs + fit routers", unit="layer"):
        splits[i], errors[i] = moefy.split_layer(dense.model.layers[i].mlp, inputs[i], cfg, cfg.seed * 1000 + i)
        blocks[i] = moefy.sparse_block(model_cfg, dense.model.layers[i].mlp, splits[i])
        inputs[i] = None  # free memory as we go
    dev = eval_windows(tok, DEV_SEQLEN, DEV_WINDOWS, split="valid")
    dev_dense = perplexity(dense, dev, desc="dev ppl, dense")
    chosen, dev_moe = moefy.choose_moe_layers(dense, blocks, errors, dev, dev_dense, MAX_DEV_RATIO)
    moe = moefy.assemble(dense, {i: splits[i] for i in chosen}, cfg)
    build_seconds, build_cpu_seconds = time.time() - start, time.process_time() - cpu_start

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"recipe": asdict(cfg), "moe_layers": chosen, "layer_errors": errors, "dev_ppl_dense": dev_dense,
            "dev_ppl_moe": dev_moe, "build_seconds": build_seconds, "build_cpu_seconds": build_cpu_seconds,
            "device": device_name()}
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
