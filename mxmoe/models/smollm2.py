"""The embedded models built from SmolLM2-135M: recipes, registry and atomic cache.

Two recipes:

* ``smollm2-moe-tf`` (:data:`RECIPE`, a ``moefy.MoefyConfig``): training-free, co-activation k-means,
  only the layers that keep the validation perplexity within budget are sparse;
* ``smollm2-moe-v2`` (:data:`V2_RECIPE`, a ``cmoe.CarveConfig``): every FFN carved (the carving method and
  structure chosen by measurement, ``mxmoe.stages.model.carving_study``), then healed
  by distillation on a GPU (``mxmoe model heal``). The healed routers, scales and low-rank corrections
  live in the repository (:data:`HEALED_DIR`) and are merged at build time, so any machine builds the
  same model without training; without those files the build says so and gives the training-free carving.

``smollm2-moe`` is v2 when the healed files exist, else the training-free model. ``build()`` saves a
standard transformers checkpoint under the cache (written to a temporary folder, then renamed: a
killed build never leaves a readable half-written cache).
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
from mxmoe.errors import MxMoEError
from mxmoe.metrics import eval_windows, perplexity
from mxmoe.models import cmoe, heal, moefy

NAME = "smollm2-moe"  # the default: v2 once its healed files exist, else the training-free model
TF_NAME, V2_NAME = "smollm2-moe-tf", "smollm2-moe-v2"
NAMES = (NAME, TF_NAME, V2_NAME)
RECIPE = moefy.MoefyConfig()  # smollm2-moe-tf
# chosen by `carving_study` (training-free, WikiText-2 validation): of shared 512 + 32×32 top-8, 384 + 48×24 top-12
# and CMoE vs co-activation k-means, this structure carved by k-means had the lowest FFN error and perplexity
V2_RECIPE = cmoe.CarveConfig(num_experts=32, top_k=8, shared_width=512, method="kmeans", router="norm")
HEAL_RECIPE = heal.HealConfig()
HEALED_DIR = Path(__file__).resolve().parent / "healed" / V2_NAME  # committed output of `mxmoe model heal`
MAX_DEV_RATIO = 1.2  # dev-set (WikiText-2 valid) perplexity budget when choosing the sparse layers
DEV_SEQLEN, DEV_WINDOWS = 512, 8

Recipe = moefy.MoefyConfig  # cmoe.CarveConfig (v2) is a subclass


def recipe(name: str = NAME) -> Recipe:
    """The recipe a registry name builds: smollm2-moe-tf, smollm2-moe-v2, or smollm2-moe (v2 when healed)."""
    if name == TF_NAME:
        return RECIPE
    if name == V2_NAME:
        return V2_RECIPE
    if name == NAME:
        return V2_RECIPE if heal.heal_files_present(HEALED_DIR) else RECIPE
    raise MxMoEError(f"unknown smollm2 recipe {name!r}: use one of {', '.join(NAMES)}")


def _recipe_blob(cfg: Recipe) -> list:
    """What defines a build's weights: the recipe and, for v2, the healed files' sha256 (None: none present)."""
    if isinstance(cfg, cmoe.CarveConfig):
        present = heal.heal_files_present(HEALED_DIR)
        files = json.loads((HEALED_DIR / heal.HEAL_JSON).read_text())["files"] if present else None
        return ["v2", asdict(cfg), files]
    return [asdict(cfg), MAX_DEV_RATIO, DEV_SEQLEN, DEV_WINDOWS]


def _digest(blob: list) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cache_key(cfg: Recipe = RECIPE) -> str:
    """A short hash of the recipe, the healed files (v2) and the library versions that shape the weights."""
    return _digest(_recipe_blob(cfg) + [transformers.__version__])


def build_id(cfg: Recipe = RECIPE) -> str:
    """The build's name on every machine: its recipe's name and a hash of the recipe, the healed files (v2) and the
    source weights. Cached results of the model are keyed by it: builds on other machines or library versions
    differ only in the last bits of floating-point reductions, so they share them."""
    stem = V2_NAME if isinstance(cfg, cmoe.CarveConfig) else TF_NAME
    return f"{stem}-{_digest(_recipe_blob(cfg) + [moefy.GGUF_FILE])}"


def model_dir(cfg: Recipe = RECIPE) -> Path:
    """Where the built checkpoint lives (complete only when build.json is present)."""
    stem = V2_NAME if isinstance(cfg, cmoe.CarveConfig) else NAME  # the training-free build keeps its old folder
    return cache_dir() / "models" / f"{stem}-{cache_key(cfg)}"


def is_built(cfg: Recipe = RECIPE) -> bool:
    """True when a complete build of this recipe is cached."""
    return (model_dir(cfg) / "build.json").exists()


def calibration(tok, windows: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration token windows [windows, seqlen]: half Project Gutenberg, half the WikiText-2 train split."""
    half = windows // 2
    return torch.cat(
        [
            calibration_windows(tok, "gutenberg", half, seqlen, seed),
            calibration_windows(tok, "wikitext2", windows - half, seqlen, seed),
        ]
    )


def carve_all(dense, tok, cfg: cmoe.CarveConfig) -> tuple[dict, dict]:
    """Carve every FFN of the dense model (on its device's copy of the calibration inputs, on the CPU);
    returns the splits and the held-out relative FFN output errors by layer."""
    inputs = moefy.collect_ffn_inputs(dense, calibration(tok, cfg.calib_windows, cfg.calib_seqlen, cfg.seed))
    splits, errors = {}, {}
    for i in tqdm(range(len(inputs)), desc=f"carve FFNs ({cfg.method})", unit="layer"):
        splits[i], errors[i] = cmoe.carve(dense.model.layers[i].mlp, inputs[i].cpu(), cfg, cfg.seed * 1000 + i)
        inputs[i] = None  # free memory as we go
    return splits, errors


def build(cfg: Recipe = RECIPE, force: bool = False) -> Path:
    """Build a smollm2 MoE recipe into the cache (unless already complete); returns the checkpoint folder.

    The build's facts (sparse layers, errors, dev perplexities, healed files, times) go into its
    ``build.json``; ``mxmoe.stages.model.build_model`` adds the measured card.
    """
    final = model_dir(cfg)
    if is_built(cfg) and not force:
        return final
    if isinstance(cfg, cmoe.CarveConfig):
        return _build_v2(cfg, final)
    start, cpu_start = time.time(), time.process_time()
    dense, tok = moefy.load_dense()
    windows = calibration(tok, cfg.calib_windows, cfg.calib_seqlen, cfg.seed)
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
    info = {
        "recipe": asdict(cfg),
        "moe_layers": chosen,
        "layer_errors": errors,
        "dev_ppl_dense": dev_dense,
        "dev_ppl_moe": dev_moe,
        "build_seconds": build_seconds,
        "build_cpu_seconds": build_cpu_seconds,
        "device": device_name(),
    }
    return _save(moe, tok, info, final)


def _save(moe, tok, info: dict, final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _build_v2(cfg: cmoe.CarveConfig, final: Path) -> Path:
    """GGUF + the healed files when present (their carving, routers, scales and merged corrections), else
    GGUF + a training-free carving of every FFN (V2_RECIPE.method), said on stdout."""
    start, cpu_start = time.time(), time.process_time()
    dense, tok = moefy.load_dense()
    layers = dense.config.num_hidden_layers
    if heal.heal_files_present(HEALED_DIR):
        doc, stored = heal.load_heal(HEALED_DIR)
        if doc.get("recipe") != asdict(cfg):
            raise MxMoEError(
                f"the healed files in {HEALED_DIR} were trained for recipe {doc.get('recipe')}, "
                f"not {asdict(cfg)}: "
                "rerun `mxmoe model heal` on a GPU"
            )
        if sorted(stored) != list(range(layers)):
            raise MxMoEError(f"the healed files in {HEALED_DIR} cover layers {sorted(stored)}, not all {layers}")
        splits, errors = heal.apply_heal(dense, stored, cfg.top_k), None
        healed = {
            "files": doc["files"],
            "folder": str(HEALED_DIR.relative_to(HEALED_DIR.parents[3])),
            "check": doc.get("check"),
        }
    else:
        print(
            f"smollm2-moe-v2: no healed files in {HEALED_DIR}: building the training-free carving of every FFN "
            "(run `mxmoe model heal` on a GPU to make them)"
        )
        splits, errors = carve_all(dense, tok, cfg)
        healed = None
    moe = moefy.assemble(dense, splits, cfg)
    info = {
        "recipe": asdict(cfg),
        "recipe_name": V2_NAME,
        "moe_layers": list(range(layers)),
        "layer_errors": errors,
        "healed": healed,
        "build_seconds": time.time() - start,
        "build_cpu_seconds": time.process_time() - cpu_start,
        "device": device_name(),
    }
    return _save(moe, tok, info, final)
