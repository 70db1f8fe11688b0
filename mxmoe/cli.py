"""``mxmoe <stage> ...``: the command line over the package's public functions.

Bad input (unknown model, malformed scheme, missing data, too long a sequence, ...) prints one
readable line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from mxmoe.errors import MxMoEError


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
    cfg = replace(smollm2.HEAL_RECIPE, e2e_steps=args.steps, router_steps=args.router_steps, rank=args.rank,
                  balance_coef=args.balance, seed=args.seed)
    doc = heal_model(Path(args.out) if args.out else None, cfg)
    print(f"healed files: {', '.join(doc['files'])} in {args.out or smollm2.HEALED_DIR}")


def _model_info(args) -> None:
    from mxmoe.models import load_model, moe_blocks
    from mxmoe.paths import results_dir

    model, _ = load_model(args.name, build=False)
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
            ("WikiText-2 PPL MoE", f"{c['ppl_moe']:.2f}  ({c['ppl_ratio']:.3f}x dense; seqlen {c['seqlen']}, {c['windows']} windows)"),
            ("expert frequency skew (max/min)", f"median {sorted(c['freq_skew_per_layer'])[len(c['freq_skew_per_layer']) // 2]:.1f}"),
            ("measured on", f"{c['device']}, {c['date']}"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _eval_ppl(args) -> None:
    from mxmoe.metrics import eval_windows, perplexity
    from mxmoe.models import load_model

    model, tok = load_model(args.name)
    if tok is None:
        raise MxMoEError(f"{args.name} has no tokenizer (random tiny model): perplexity on text needs a real model")
    windows = eval_windows(tok, args.seqlen, args.windows, dataset=args.dataset)
    ppl = perplexity(model, windows)
    print(f"{args.name}: {args.dataset} test token perplexity {ppl:.3f} (seqlen {args.seqlen}, {windows.shape[0]} windows)")


def _eval_zeroshot(args) -> None:
    import time

    from mxmoe.data import TASKS
    from mxmoe.env import device_name
    from mxmoe.files import write_json_atomic
    from mxmoe.models import load_model
    from mxmoe.zeroshot import check_args, evaluate_tasks, record

    tasks = check_args(args.tasks or TASKS, args.limit)
    model, tok = load_model(args.name, build=False)
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
    from mxmoe.metrics import eval_windows
    from mxmoe.models import load_model
    from mxmoe.routing import profile_routing, skew

    model, tok = load_model(args.name)
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
            print(f"{corpus:10s} layer {layer:2d}: gini {s['gini'][i]:.3f}  top-10% share {s['top10_share'][i]:.3f}  "
                  f"max/min {'inf' if ratio is None else f'{ratio:.1f}'}  unused {s['unused_experts'][i]}")


def _sensitivity(args) -> None:
    import numpy as np

    from mxmoe.stages.sensitivity import run_sensitivity

    result, path = run_sensitivity(args.name, args.method, args.schemes, args.calib, args.windows, args.seqlen, args.seed)
    for layer, lay in result["layers"].items():
        d = np.array([[[np.nan if v is None else v for v in row] for row in e] for e in lay["delta"]])  # [E, 3, S]
        mean = np.nanmean(d, axis=(0, 1))
        print(f"layer {layer}: mean Δ per scheme " + "  ".join(f"{s}={m:.3g}" for s, m in zip(result["schemes"], mean))
              + f"  (no tokens: {len(lay['no_tokens'])}, RTN fallbacks: {len(lay['rtn_fallbacks'])})")
    print(f"written to {path}")


# subcommands that hand the rest of the command line to a module's own main(argv)
TOOLS = {
    "reproduce": ("mxmoe.reproduce", "run the numbered notebooks (papermill), skipping unchanged stages"),
    "book": ("mxmoe.book", "build the Jupyter Book from the executed notebooks"),
    "claims": ("mxmoe.claims", "write claims.json and manifest.json (paper vs ours, a verdict per claim)"),
    "prewarm": ("mxmoe.prewarm", "compute a group of cached evaluations ahead of the notebooks"),
}
BENCHMARKS = {
    "gemm": ("mxmoe.bench.gemm", "time the grouped GEMMs on the paper's shapes (GPU); writes bench_<gpu>.json"),
    "compare": ("mxmoe.bench.compare", "A/B the kernel's tile configurations on chosen cases (GPU)"),
    "cost-table": ("mxmoe.bench.cost_table", "build cost_tables/<gpu>.json from benchmark files"),
    "alloc": ("mxmoe.bench.alloc", "time a model's allocations through the kernel (GPU); Figure 5 measured"),
    "ilp": ("mxmoe.bench.ilp", "solve times of the allocation ILP on a random layer"),
}


def _run_module(module: str, argv: list) -> int:
    """Call ``module.main(argv)``; its return value (None: 0) is the exit code."""
    import importlib

    return importlib.import_module(module).main(argv) or 0


def parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per pipeline stage, the apps and the benchmarks."""
    p = argparse.ArgumentParser(prog="mxmoe", description="MxMoE on Hopper: mixed-precision MoE quantization.")
    stages = p.add_subparsers(dest="stage", required=True,
                              metavar="{model,eval,routing,sensitivity,reproduce,book,claims,prewarm,bench}")
    for name, (_, text) in TOOLS.items():  # listed for --help; main() hands their arguments over
        stages.add_parser(name, help=text)
    bench = stages.add_parser("bench", help="kernel and solver benchmarks").add_subparsers(dest="action", required=True)
    for name, (_, text) in BENCHMARKS.items():
        bench.add_parser(name, help=text)

    model = stages.add_parser("model", help="build or describe a model").add_subparsers(dest="action", required=True)
    b = model.add_parser("build", help="build the embedded smollm2-moe into the cache (about 10 min on 2 CPU cores)")
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    b.add_argument("--recipe", default="smollm2-moe", choices=["smollm2-moe", "smollm2-moe-tf", "smollm2-moe-v2"],
                   help="smollm2-moe-tf: training-free, few sparse layers; smollm2-moe-v2: every FFN sparse, "
                        "healed files merged when present; smollm2-moe: v2 when healed, else tf (default)")
    b.set_defaults(func=_model_build)
    from mxmoe.models.heal import HealConfig  # defaults shown in --help

    h = model.add_parser("heal", help="carve smollm2-moe-v2 and heal it by distillation (GPU, minutes); writes the "
                                      "healed files that `model build` merges")
    h.add_argument("--steps", type=int, default=HealConfig.e2e_steps, help="end-to-end KL steps")
    h.add_argument("--router-steps", type=int, default=HealConfig.router_steps, help="router-only steps per layer")
    h.add_argument("--rank", type=int, default=HealConfig.rank, help="rank of the FFN weight corrections")
    h.add_argument("--balance", type=float, default=HealConfig.balance_coef, help="load-balance loss weight (0: off)")
    h.add_argument("--seed", type=int, default=HealConfig.seed)
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
    zs = ev.add_parser("zeroshot", help="zero-shot accuracy with lm-eval (acc_norm for ARC, HellaSwag, PIQA; acc otherwise)")
    zs.add_argument("name", nargs="?", default="smollm2-moe")
    zs.add_argument("--tasks", nargs="+", metavar="TASK", help="arc_easy arc_challenge piqa winogrande lambada_openai "
                    "lambada_standard hellaswag boolq (default: all)")
    zs.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    zs.add_argument("--batch-size", type=int, default=16)
    zs.add_argument("--out", default=None, help="also write the results, device, limit, date and time to this JSON file")
    zs.set_defaults(func=_eval_zeroshot)

    rt = stages.add_parser("routing", help="expert routing profiles").add_subparsers(dest="action", required=True)
    prof = rt.add_parser("profile", help="tokens per expert per MoE layer")
    prof.add_argument("name", nargs="?", default="smollm2-moe")
    prof.add_argument("--seqlen", type=int, default=512)
    prof.add_argument("--windows", type=int, default=8)
    prof.add_argument("--dataset", default="wikitext2", choices=["wikitext2"])
    prof.set_defaults(func=_routing_profile)
    corp = rt.add_parser("corpora", help="profiles, skew and batch workloads on several corpora -> results/<model>/routing/")
    corp.add_argument("name", nargs="?", default="smollm2-moe")
    corp.add_argument("--corpora", default="wikitext2,c4,sotu", help="comma-separated: wikitext2, c4, sotu, gutenberg")
    corp.add_argument("--seqlen", type=int, default=512)
    corp.add_argument("--windows", type=int, default=8)
    corp.add_argument("--seed", type=int, default=0)
    corp.set_defaults(func=_routing_corpora)

    sens = stages.add_parser("sensitivity", help="per-block Δ (paper Eq. 6) -> results/<model>/sensitivity/")
    sens.add_argument("name", nargs="?", default="smollm2-moe")
    sens.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq-had"])
    sens.add_argument("--schemes", default="hopper", help="scheme set (hopper, weight_only, w5a5) or comma-separated schemes")
    sens.add_argument("--calib", default="wikitext2", choices=["wikitext2", "c4"])
    sens.add_argument("--windows", type=int, default=8)
    sens.add_argument("--seqlen", type=int, default=512)
    sens.add_argument("--seed", type=int, default=0)
    sens.set_defaults(func=_sensitivity)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mxmoe`` command; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return _run_module(TOOLS[argv[0]][0], argv[1:])
    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        return _run_module(BENCHMARKS[argv[1]][0], argv[2:])
    args = parser().parse_args(argv)
    if getattr(args, "windows", None) == 0:
        args.windows = None
    try:
        args.func(args)
    except MxMoEError as e:
        print(f"mxmoe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
