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
    from mxmoe.models import smollm2

    path = smollm2.build(force=args.force)
    print(f"smollm2-moe is built at {path}")
    _model_info(argparse.Namespace(name="smollm2-moe"))


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
    from mxmoe.evaluate import eval_windows, perplexity
    from mxmoe.models import load_model

    model, tok = load_model(args.name)
    if tok is None:
        raise MxMoEError(f"{args.name} has no tokenizer (random tiny model): perplexity on text needs a real model")
    windows = eval_windows(tok, args.seqlen, args.windows, dataset=args.dataset)
    ppl = perplexity(model, windows)
    print(f"{args.name}: {args.dataset} test token perplexity {ppl:.3f} (seqlen {args.seqlen}, {windows.shape[0]} windows)")


def _routing_profile(args) -> None:
    from mxmoe.evaluate import eval_windows
    from mxmoe.models import load_model
    from mxmoe.routing import profile_routing, skew

    model, tok = load_model(args.name)
    counts = profile_routing(model, eval_windows(tok, args.seqlen, args.windows, dataset=args.dataset))
    for layer, (row, s) in enumerate(zip(counts, skew(counts))):
        print(f"MoE layer {layer:2d}: max/min {s:6.1f}  tokens per expert {row.tolist()}")


def parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per pipeline stage."""
    p = argparse.ArgumentParser(prog="mxmoe", description="MxMoE on Hopper: mixed-precision MoE quantization. Stages:")
    stages = p.add_subparsers(dest="stage", required=True, metavar="{model,eval,routing}")

    model = stages.add_parser("model", help="build or describe a model").add_subparsers(dest="action", required=True)
    b = model.add_parser("build", help="build the embedded smollm2-moe into the cache (about 10 min on 2 CPU cores)")
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    b.set_defaults(func=_model_build)
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

    rt = stages.add_parser("routing", help="expert routing profiles").add_subparsers(dest="action", required=True)
    prof = rt.add_parser("profile", help="tokens per expert per MoE layer")
    prof.add_argument("name", nargs="?", default="smollm2-moe")
    prof.add_argument("--seqlen", type=int, default=512)
    prof.add_argument("--windows", type=int, default=8)
    prof.add_argument("--dataset", default="wikitext2", choices=["wikitext2"])
    prof.set_defaults(func=_routing_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mxmoe`` command; returns the exit code (2 for bad input)."""
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
