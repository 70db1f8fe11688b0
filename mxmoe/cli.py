"""``mxmoe <stage> ...``: the command line over the package's public functions.

Bad input (unknown model, malformed scheme, missing data, too long a sequence, ...) prints one
readable line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from mxmoe.errors import MxMoEError
from mxmoe.schemes import SCHEME_SETS


def _model_build(args) -> None:
    from mxmoe.stages.model import build_model

    path = build_model(force=args.force, name=args.recipe)
    print(f"{args.recipe} is built at {path}")
    _model_info(argparse.Namespace(name=args.recipe))


def _model_heal(args) -> None:
    from dataclasses import replace
    from pathlib import Path

    from mxmoe.models import smollm2
    from mxmoe.stages.model import heal_model

    if min(args.steps, args.router_steps, args.rank) < 0 or args.balance < 0:
        raise MxMoEError("--steps, --router-steps, --rank and --balance must be >= 0")
    if args.budget_s is not None and args.budget_s <= 0:
        raise MxMoEError(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    cfg = replace(
        smollm2.HEAL_RECIPE,
        e2e_steps=args.steps,
        router_steps=args.router_steps,
        rank=args.rank,
        balance_coef=args.balance,
        seed=args.seed,
    )
    doc = heal_model(Path(args.out) if args.out else None, cfg, budget_s=args.budget_s)
    print(f"healed files: {', '.join(doc['files'])} in {args.out or smollm2.HEALED_DIR}")


def _model_info(args) -> None:
    from mxmoe.checkpoint import open_model
    from mxmoe.models import moe_blocks
    from mxmoe.paths import results_dir

    model, _ = open_model(args.name, build=False)
    blocks = moe_blocks(model)
    b = blocks[0]
    params = sum(p.numel() for p in model.parameters())
    expert_params = 3 * b.hidden_size * b.expert_width
    shared_width = sum(s.gate_proj.weight.shape[0] for s in b.shared) if b.shared else 0
    rows = [
        ("model", args.name),
        ("class", type(model).__name__),
        ("params (total)", f"{params / 1e6:.1f} M"),
        ("layers (MoE / all)", f"{len(blocks)} / {model.config.num_hidden_layers}"),
        ("experts (routed + shared)", f"{b.num_experts} + {len(b.shared)}"),
        ("top-k", b.top_k),
        ("hidden size", b.hidden_size),
        ("expert width", b.expert_width),
        ("shared expert width", shared_width),
        ("params per routed expert", f"{expert_params / 1e3:.1f} K"),
    ]
    card = results_dir() / args.name / "model.json"
    if card.exists():
        c = json.loads(card.read_text())
        rows += [
            ("WikiText-2 PPL dense", f"{c['ppl_dense']:.2f}"),
            (
                "WikiText-2 PPL MoE",
                f"{c['ppl_moe']:.2f}  ({c['ppl_ratio']:.3f}x dense; seqlen {c['seqlen']}, {c['windows']} windows)",
            ),
            (
                "expert frequency skew (max/min)",
                f"median {sorted(c['freq_skew_per_layer'])[len(c['freq_skew_per_layer']) // 2]:.1f}",
            ),
            ("measured on", f"{c['device']}, {c['date']}"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _eval_ppl(args) -> None:
    from mxmoe.checkpoint import open_model
    from mxmoe.metrics import eval_windows, perplexity

    model, tok = open_model(args.name)
    if tok is None:
        raise MxMoEError(f"{args.name} has no tokenizer (random tiny model): perplexity on text needs a real model")
    windows = eval_windows(tok, args.seqlen, args.windows, dataset=args.dataset)
    ppl = perplexity(model, windows)
    print(
        f"{args.name}: {args.dataset} test token perplexity {ppl:.3f} (seqlen {args.seqlen}, {windows.shape[0]} windows)"
    )


def _eval_zeroshot(args) -> None:
    import time

    from mxmoe.checkpoint import open_model
    from mxmoe.data import TASKS
    from mxmoe.env import device_name
    from mxmoe.files import write_json_atomic
    from mxmoe.zeroshot import check_args, evaluate_tasks, record

    tasks = check_args(args.tasks or TASKS, args.limit)
    model, tok = open_model(args.name, build=False)
    start = time.perf_counter()
    results = evaluate_tasks(model, tok, tasks, limit=args.limit, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    for task, r in results.items():
        print(f"{task:<17} {r['metric']:<8} {r['value']:.4f}  (n={r['n']})")
    print(f"{args.name}: zero-shot, limit {args.limit}, {device_name()}, {seconds:.0f} s")
    if args.out:
        write_json_atomic(args.out, record(args.name, results, args.limit, seconds, device_name()))
        print(f"written to {args.out}")


def _routing_profile(args) -> None:
    from mxmoe.checkpoint import open_model
    from mxmoe.metrics import eval_windows
    from mxmoe.routing import profile_routing, skew

    model, tok = open_model(args.name)
    counts = profile_routing(model, eval_windows(tok, args.seqlen, args.windows, dataset=args.dataset))
    for layer, (row, s) in enumerate(zip(counts, skew(counts))):
        print(f"MoE layer {layer:2d}: max/min {s:6.1f}  tokens per expert {row.tolist()}")


def _routing_corpora(args) -> None:
    from mxmoe.stages.routing import profile_corpora

    reports = profile_corpora(args.name, args.corpora.split(","), args.windows, args.seqlen, args.seed)
    for corpus, r in reports.items():
        s = r["skew"]
        for i, layer in enumerate(r["layers"]):
            ratio = s["max_over_min"][i]
            print(
                f"{corpus:10s} layer {layer:2d}: gini {s['gini'][i]:.3f}  top-10% share {s['top10_share'][i]:.3f}  "
                f"max/min {'inf' if ratio is None else f'{ratio:.1f}'}  unused {s['unused_experts'][i]}"
            )


def _sensitivity(args) -> None:
    import numpy as np

    from mxmoe.stages.sensitivity import run_sensitivity

    result, path = run_sensitivity(
        args.name, args.method, args.schemes, args.calib, args.windows, args.seqlen, args.seed
    )
    for layer, lay in result["layers"].items():
        d = np.array([[[np.nan if v is None else v for v in row] for row in e] for e in lay["delta"]])  # [E, 3, S]
        mean = np.nanmean(d, axis=(0, 1))
        print(
            f"layer {layer}: mean Δ per scheme "
            + "  ".join(f"{s}={m:.3g}" for s, m in zip(result["schemes"], mean))
            + f"  (no tokens: {len(lay['no_tokens'])}, RTN fallbacks: {len(lay['rtn_fallbacks'])})"
        )
    print(f"written to {path}")


# subcommands that hand the rest of the command line to a module's own main(argv)
TOOLS = {
    "reproduce": ("mxmoe.reproduce", "run the numbered notebooks (papermill), skipping unchanged stages"),
    "book": ("mxmoe.book", "build the Jupyter Book from the executed notebooks"),
    "claims": ("mxmoe.claims", "write claims.json and manifest.json (paper vs ours, a verdict per claim)"),
    "prewarm": ("mxmoe.prewarm", "compute notebooks 00-05's results ahead of them, in parallel processes"),
}
BENCHMARKS = {
    "gemm": ("mxmoe.bench.gemm", "time the grouped GEMMs on the paper's shapes (GPU); writes bench_<gpu>.json"),
    "compare": ("mxmoe.bench.compare", "A/B the kernel's tile configurations on chosen cases (GPU)"),
    "cost-table": ("mxmoe.bench.cost_table", "build cost_tables/<gpu>.json from benchmark files"),
    "counted": (
        "mxmoe.bench.counted",
        "this GPU's three counted gemm runs and its cost table, in one resumable command (GPU)",
    ),
    "alloc": ("mxmoe.bench.alloc", "time a model's allocations through the kernel (GPU); Figure 5 measured"),
    "ilp": ("mxmoe.bench.ilp", "solve times of the allocation ILP on a random layer"),
    "gluon": (
        "mxmoe.bench.gluon",
        "the Gluon warp-specialised 4-bit kernel against the Triton kernel: edge cases and paper shapes "
        "(Hopper GPU); writes gluon_<gpu>.json",
    ),
    "ncu": (
        "mxmoe.bench.ncu",
        "one launch per variant of a case for Nsight Compute (GPU), and a summary of ncu's report",
    ),
    "occupancy": (
        "mxmoe.bench.occupancy",
        "programs per SM and the register cap of the Triton kernel at decode and prefill sizes (GPU); "
        "writes occupancy_<gpu>.json",
    ),
    "route": (
        "mxmoe.bench.route",
        "the experts path's routing: one Triton program against the torch ops, decode to prefill sizes (GPU)",
    ),
    "sass": (
        "mxmoe.bench.sass",
        "compile the kernel for sm_90a without a GPU: registers, spills, wgmma waits, K-loop instructions",
    ),
    "paper-models": (
        "mxmoe.bench.paper_models",
        "the paper's models at full size, random weights: whole-model "
        "speed and memory (GPU); --allocate-only solves their allocations on a CPU",
    ),
    "streamed": (
        "mxmoe.bench.streamed",
        "a model larger than the GPU (Mixtral-8x7B on an H100) in CPU memory: its layer-by-layer calibration "
        "streamed to the GPU, peak GPU memory and time per layer (GPU; --smoke on the CPU)",
    ),
    "multi-gpu": (
        "mxmoe.bench.multi_gpu",
        "a model that does not fit one GPU (Qwen3-235B-A22B) over several: pipeline stages, prefill, "
        "memory per GPU, the smallest GPU count (GPUs; --dry-run on CPU placements)",
    ),
}


def _run_module(module: str, argv: list) -> int:
    """Call ``module.main(argv)``; its return value (None: 0) is the exit code."""
    import importlib

    return importlib.import_module(module).main(argv) or 0


def parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per pipeline stage, the checkpoint commands, the apps and the benchmarks."""
    p = argparse.ArgumentParser(
        prog="mxmoe",
        description="MxMoE on Hopper: mixed-precision MoE quantization.",
        epilog="benchmarks: " + "; ".join(f"mxmoe bench {n}: {t}" for n, (_, t) in BENCHMARKS.items()),
    )
    stages = p.add_subparsers(
        dest="stage",
        required=True,
        metavar="{model,eval,routing,sensitivity,quantize,generate,bench,reproduce,book,claims,prewarm}",
    )
    for name, (_, text) in TOOLS.items():  # listed for --help; main() hands their arguments over
        stages.add_parser(name, help=text)

    model = stages.add_parser("model", help="build or describe a model").add_subparsers(dest="action", required=True)
    b = model.add_parser("build", help="build the embedded smollm2-moe into the cache (about 10 min on 2 CPU cores)")
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    b.add_argument(
        "--recipe",
        default="smollm2-moe",
        choices=["smollm2-moe", "smollm2-moe-tf", "smollm2-moe-v2"],
        help="smollm2-moe-tf: training-free, few sparse layers; smollm2-moe-v2: every FFN sparse, "
        "healed files merged when present; smollm2-moe: v2 when healed, else tf (default)",
    )
    b.set_defaults(func=_model_build)
    from mxmoe.models.heal import HealConfig  # defaults shown in --help

    h = model.add_parser(
        "heal",
        help="carve smollm2-moe-v2 and heal it by distillation (GPU, minutes); writes the "
        "healed files that `model build` merges",
    )
    h.add_argument("--steps", type=int, default=HealConfig.e2e_steps, help="end-to-end KL steps")
    h.add_argument("--router-steps", type=int, default=HealConfig.router_steps, help="router-only steps per layer")
    h.add_argument("--rank", type=int, default=HealConfig.rank, help="rank of the FFN weight corrections")
    h.add_argument("--balance", type=float, default=HealConfig.balance_coef, help="load-balance loss weight (0: off)")
    h.add_argument("--seed", type=int, default=HealConfig.seed)
    h.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="end the end-to-end phase this many seconds after the start, for machines with a time limit "
        "(heal.json records the steps done)",
    )
    h.add_argument("--out", default=None, help="folder for the files (default: the committed mxmoe/models/healed/...)")
    h.set_defaults(func=_model_heal)
    i = model.add_parser("info", help="architecture (Table 2 style) and measured perplexity")
    i.add_argument("name", nargs="?", default="smollm2-moe")
    i.set_defaults(func=_model_info)

    ev = stages.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    ppl = ev.add_parser("ppl", help="token perplexity on a test split (GPTQ style)")
    ppl.add_argument("name", nargs="?", default="smollm2-moe")
    ppl.add_argument("--seqlen", type=int, default=1024)
    ppl.add_argument("--windows", type=int, default=16, help="number of windows (default 16; 0 = the whole split)")
    ppl.add_argument("--dataset", default="wikitext2", choices=["wikitext2"])
    ppl.set_defaults(func=_eval_ppl)
    zs = ev.add_parser(
        "zeroshot", help="zero-shot accuracy with lm-eval (acc_norm for ARC, HellaSwag, PIQA; acc otherwise)"
    )
    zs.add_argument("name", nargs="?", default="smollm2-moe")
    zs.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="arc_easy arc_challenge piqa winogrande lambada_openai lambada_standard hellaswag boolq (default: all)",
    )
    zs.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    zs.add_argument("--batch-size", type=int, default=16)
    zs.add_argument(
        "--out", default=None, help="also write the results, device, limit, date and time to this JSON file"
    )
    zs.set_defaults(func=_eval_zeroshot)

    rt = stages.add_parser("routing", help="expert routing profiles").add_subparsers(dest="action", required=True)
    prof = rt.add_parser("profile", help="tokens per expert per MoE layer")
    prof.add_argument("name", nargs="?", default="smollm2-moe")
    prof.add_argument("--seqlen", type=int, default=512)
    prof.add_argument("--windows", type=int, default=8)
    prof.add_argument("--dataset", default="wikitext2", choices=["wikitext2"])
    prof.set_defaults(func=_routing_profile)
    corp = rt.add_parser(
        "corpora", help="profiles, skew and batch workloads on several corpora -> results/<model>/routing/"
    )
    corp.add_argument("name", nargs="?", default="smollm2-moe")
    corp.add_argument("--corpora", default="wikitext2,c4,sotu", help="comma-separated: wikitext2, c4, sotu, gutenberg")
    corp.add_argument("--seqlen", type=int, default=512)
    corp.add_argument("--windows", type=int, default=8)
    corp.add_argument("--seed", type=int, default=0)
    corp.set_defaults(func=_routing_corpora)

    sens = stages.add_parser("sensitivity", help="per-block Δ (paper Eq. 6) -> results/<model>/sensitivity/")
    sens.add_argument("name", nargs="?", default="smollm2-moe")
    sens.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq-had"])
    sens.add_argument(
        "--schemes", default="hopper", help=f"scheme set ({', '.join(SCHEME_SETS)}) or comma-separated schemes"
    )
    sens.add_argument("--calib", default="wikitext2", choices=["wikitext2", "c4"])
    sens.add_argument("--windows", type=int, default=8)
    sens.add_argument("--seqlen", type=int, default=512)
    sens.add_argument("--seed", type=int, default=0)
    sens.set_defaults(func=_sensitivity)
    _add_checkpoint_commands(stages)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mxmoe`` command; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return _run_module(TOOLS[argv[0]][0], argv[1:])
    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        return _run_module(BENCHMARKS[argv[1]][0], argv[2:])
    args = parser().parse_args(argv)
    try:
        validate(args)
        if getattr(args, "windows", None) == 0:
            args.windows = None
        args.func(args)
    except MxMoEError as e:
        print(f"mxmoe: error: {e}", file=sys.stderr)
        return 2
    return 0


# ---- quantized checkpoints (quantize, generate, bench) and flag validation before any model loads ----


def _quantize(args) -> None:
    from mxmoe.checkpoint import open_model
    from mxmoe.pipeline import quantize

    model, tok = open_model(args.name)
    res = quantize(
        model,
        tok,
        wbits=args.wbits,
        abits=args.abits,
        r=args.r,
        method=args.method,
        granularity=args.granularity,
        budget=args.budget,
        calib=args.calib,
        calib_windows=args.calib_windows,
        seqlen=args.seqlen,
        seed=args.seed,
        gpu=args.gpu,
        batch_tokens=args.batch_tokens,
        schemes=args.schemes,
        base_id=args.name,
        out=args.out,
        overwrite=args.overwrite,
        save_dtype=args.save_dtype,
    )
    m = res.manifest
    counts: dict = {}
    for s in res.scheme_map.values():
        counts[str(s)] = counts.get(str(s), 0) + 1
    print(
        f"{args.name}: {m['bits']['weight']:.3f} weight bits, {m['bits']['activation']:.2f} activation bits per expert "
        f"weight; cost table {m['cost_table']['gpu']} ({m['cost_table']['device']})"
    )
    if m["cost_table"]["note"]:
        print(f"note: {m['cost_table']['note']}")
    print("blocks per scheme: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    print(
        "stage times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in res.stage_seconds.items())
        + f"; total {sum(res.stage_seconds.values()):.1f} s"
    )
    print(f"written to {res.out}")


def _generate(args) -> None:
    import torch
    from transformers import TextStreamer

    from mxmoe.checkpoint import open_model
    from mxmoe.models.placement import input_device

    model, tok = open_model(args.name, device=args.device)
    if tok is None:
        raise MxMoEError(f"{args.name} has no tokenizer (random tiny model): generation needs a real model")
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(input_device(model))
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=TextStreamer(tok),
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )


def _bench(args) -> None:
    import torch

    from mxmoe.checkpoint import check_base, load_quantized, open_model, read_manifest, stored_bytes
    from mxmoe.env import device_name
    from mxmoe.throughput import prefill, weight_memory

    doc = read_manifest(args.name)
    base_name = args.base or doc["base"]["id"]
    base, _ = open_model(base_name, build=False, device="cpu")
    check_base(doc, base, base_name)
    quant = load_quantized(args.name, args.device, torch.bfloat16)  # the same dtype as the base it is compared with
    device = next(quant.parameters()).device
    base = base.to(device, torch.bfloat16)
    where = device_name() + ("" if device.type == "cuda" else ": a CPU measurement, the experts on the reference path")
    rows = []
    for label, model in (("bf16 base", base), ("mxmoe", quant)):
        mem = weight_memory(model)
        for tokens in args.tokens:
            r = prefill(model, tokens, args.seqlen, args.repeats)
            rows.append({"model": label, **mem, **r})
            print(
                f"{label:<10} {r['tokens']:>6} tokens  {r['tokens_per_s']:>10.1f} tokens/s  weights "
                f"{mem['total_bytes'] / 2**20:8.1f} MiB (experts {mem['expert_bytes'] / 2**20:.1f} MiB, "
                f"{mem['expert_bytes'] / mem['expert_bf16_bytes']:.3f}x bf16)"
            )
    disk = stored_bytes(args.name)
    print(
        f"on disk: {disk['total_bytes'] / 2**20:.1f} MiB, of which the stored expert blocks {disk['expert_bytes'] / 2**20:.1f} "
        f"MiB ({disk['expert_bytes'] / (2 * disk['expert_weights']):.3f}x the same weights in bf16)"
    )
    print(f"measured on {where}")
    if args.out:
        from mxmoe.files import write_json_atomic

        write_json_atomic(
            args.out, {"checkpoint": str(args.name), "base": base_name, "device": where, "rows": rows, "disk": disk}
        )
        print(f"written to {args.out}")


def _positive(flag: str, value, zero_ok: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _positive(flag, v, zero_ok)
        return
    if value < 0 or (value == 0 and not zero_ok):
        raise MxMoEError(f"{flag} must be {'0 or more' if zero_ok else 'a positive number'}, got {value}")


def _check_model_arg(name: str, quantized: "bool | None" = None) -> None:
    """Reject a model argument that cannot load, before anything is built: a missing folder, a folder that is
    no model, a broken checkpoint; ``quantized`` True/False demands a checkpoint / a full-precision model."""
    from pathlib import Path

    from mxmoe.checkpoint import is_checkpoint, read_manifest
    from mxmoe.models import zoo_names

    path = Path(name).expanduser()
    if path.exists():
        if is_checkpoint(path):
            read_manifest(path)
            if quantized is False:
                raise MxMoEError(
                    f"{name} is a quantized mxmoe checkpoint; this command needs its full-precision base "
                    f"model ({read_manifest(path)['base']['id']})"
                )
        elif not (path / "config.json").is_file():
            raise MxMoEError(
                f"{name} is neither an mxmoe checkpoint (no mxmoe.json) nor a model folder (no config.json)"
            )
        elif quantized:
            read_manifest(path)  # names what is missing
        return
    if quantized:
        read_manifest(path)
    if name.startswith(("/", "./", "../", "~")):
        raise MxMoEError(f"no such folder {name}")
    if name not in zoo_names() and "/" not in name:
        raise MxMoEError(
            f"unknown model {name!r}: use a zoo name ({', '.join(zoo_names())}), a Hugging Face id or a "
            "local folder (a model or an mxmoe checkpoint)"
        )


def _check_device(device: "str | None") -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise MxMoEError("--device cuda: no CUDA GPU here; use --device cpu")


def validate(args) -> None:
    """Check every flag of a parsed command line before any model is loaded or built; MxMoEError on the first bad one."""
    stage, action = args.stage, getattr(args, "action", None)
    if stage == "model":
        return
    for flag in ("seqlen", "batch_size", "max_new_tokens", "repeats", "calib_windows", "batch_tokens"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag, None))
    if hasattr(args, "windows"):  # 0 means the whole split where a split is read in order
        _positive("--windows", args.windows, zero_ok=(stage, action) in (("eval", "ppl"), ("routing", "profile")))
    if stage == "eval" and action == "zeroshot":
        from mxmoe.data import TASKS
        from mxmoe.zeroshot import check_args

        check_args(args.tasks or TASKS, args.limit)
    _check_device(getattr(args, "device", None))
    if stage == "quantize":
        from mxmoe.checkpoint import check_out_dir
        from mxmoe.pipeline import Recipe, check_recipe

        check_recipe(
            Recipe(
                args.wbits,
                args.abits,
                args.r,
                args.method,
                args.granularity,
                args.budget,
                args.calib,
                args.calib_windows,
                args.seqlen,
                args.seed,
                args.gpu,
                args.batch_tokens,
                args.schemes,
            )
        )
        check_out_dir(args.out, args.overwrite)
        _check_model_arg(args.name, quantized=False)
    elif stage == "bench":
        _positive("--tokens", args.tokens)
        _check_model_arg(args.name, quantized=True)
        if args.base:
            _check_model_arg(args.base, quantized=False)
    elif stage == "generate":
        if not args.prompt.strip():
            raise MxMoEError("the prompt is empty")
        _check_model_arg(args.name)
    elif stage == "sensitivity" or (stage, action) == ("routing", "corpora"):
        _check_model_arg(args.name, quantized=False)
    else:
        _check_model_arg(args.name)


def _add_checkpoint_commands(stages) -> None:
    """The quantize, generate and bench subcommands."""
    from mxmoe.pipeline import ABITS, BUDGETS, GPUS, GRANULARITIES, METHODS, SAVE_DTYPES

    q = stages.add_parser(
        "quantize", help="MxMoE end to end: routing, sensitivity, allocation, GPTQ -> a checkpoint folder"
    )
    q.add_argument("name", metavar="MODEL", help="zoo name, Hugging Face id or local model folder")
    q.add_argument(
        "--wbits",
        type=float,
        required=True,
        help="mean weight bits per expert weight, e.g. 3.25 (paper accounting: g128 adds 0.25)",
    )
    q.add_argument(
        "--abits",
        type=int,
        default=16,
        choices=sorted(ABITS),
        help="activation bits: 16 weight-only; 8, 4: "
        "schemes with 8/4-bit activations (8 includes W4A8 on fp8 tensor cores); 5: the W5A5 mix of w4a4 and "
        "w8a8 (default 16)",
    )
    q.add_argument(
        "--r",
        type=float,
        default=1.0,
        help="accuracy/speed trade-off of the allocation: 1 accuracy only, 0 speed only (default 1)",
    )
    q.add_argument(
        "--method",
        default="gptq-had",
        choices=METHODS,
        help="quantizer (default gptq-had: GPTQ after a random Hadamard rotation)",
    )
    q.add_argument(
        "--granularity",
        default="block",
        choices=GRANULARITIES,
        help="one scheme per linear block (gate and up tied) or per expert",
    )
    q.add_argument(
        "--budget", default="layer", choices=BUDGETS, help="the bit budget holds per layer or for the whole model"
    )
    q.add_argument(
        "--calib",
        default="wikitext2",
        help="wikitext2 (train split), c4, a text FILE, or random (token ids, for tokenizer-less test models)",
    )
    q.add_argument(
        "--calib-windows", type=int, default=8, help="calibration windows (default 8; 128 on a GPU is usual)"
    )
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--gpu",
        default=None,
        choices=GPUS,
        help="cost table of the GPU the model will run on (default: this machine's GPU, else nvidia_h100)",
    )
    q.add_argument("--batch-tokens", type=int, default=512, help="tokens per batch the allocation optimises for")
    q.add_argument(
        "--schemes",
        default=None,
        help=f"candidate schemes instead of the --abits set: a set name ({', '.join(SCHEME_SETS)}) "
        "or comma-separated schemes",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write (atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing mxmoe checkpoint at DIR")
    q.add_argument(
        "--save-dtype",
        default=None,
        choices=SAVE_DTYPES,
        help="type of the full-precision weights in DIR (default: as loaded, float32; bfloat16 halves them)",
    )
    q.set_defaults(func=_quantize)

    g = stages.add_parser("generate", help="greedy generation, streamed token by token")
    g.add_argument("name", metavar="MODEL", help="a checkpoint DIR, zoo name, Hugging Face id or model folder")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: a CUDA GPU if there is one")
    g.set_defaults(func=_generate)

    b = stages.add_parser(
        "bench",
        help="prefill tokens/s and weight memory of a checkpoint vs its bf16 base; "
        f"or a benchmark: {', '.join(BENCHMARKS)} (mxmoe bench NAME --help)",
    )
    b.add_argument("name", metavar="DIR", help="an mxmoe checkpoint folder")
    b.add_argument("--tokens", type=int, nargs="+", default=[512, 8192], help="tokens per forward (default 512 8192)")
    b.add_argument("--seqlen", type=int, default=512, help="tokens per sequence of a batch (default 512)")
    b.add_argument("--repeats", type=int, default=3, help="timed forwards per size; the median is reported")
    b.add_argument(
        "--base",
        default=None,
        help="the full-precision model (default: the base named in mxmoe.json); "
        "its weights must be those the checkpoint was quantized from",
    )
    b.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: a CUDA GPU if there is one")
    b.add_argument("--out", default=None, help="also write the rows to this JSON file")
    b.set_defaults(func=_bench)


if __name__ == "__main__":
    sys.exit(main())
