"""Focused timing of chosen schemes and tile configs on the kernel's target cases, one process, one GPU.

``python -m mxmoe.bench.compare --label NAME --out DIR [--cases MODEL:TOKENS ...] [--sweep TOKENS:bm,bn,stages,swap,warps[,programs] ...]
[--programs P ...] [--schemes SCHEME ...] [--no-layers]``

For each case (both GEMMs of the model, routed as in ``bench``) it times the torch peers (bf16 grouped, fp8
scaled grouped with and without its activation quantization: ``mxmoe.bench.peers``) and every scheme with
its default tile and with each ``--sweep`` config (``mxmoe.bench.timing.events_ms`` median: GPU time after
an L2 flush), and the default tile on each ``--programs`` grid size (persistent programs; the kernel's own
choice is 2 per SM). Every tile and grid is checked against ``reference_group_gemm`` (``rel_err``: a wrong tile's time is no result); the default
one, for weight-activation schemes, is also timed quantizing its activations itself. Every row reports its speedup over torch bf16 and torch fp8, the weight bytes and
all bytes moved per second as fractions of the copy bandwidth measured in the same run, and its relative
error against float32 math on the bf16 weights. Unless ``--no-layers``, each case also times whole routed
experts layers (``gemm`` = ``moe``): the torch peers chained, vLLM's fused MoE in bf16 and int4 w4a16 g128
when ``vllm`` imports (a one-line note otherwise), and our ``moe_experts_forward`` per scheme.
Runs unchanged against an older checkout of the package (``PYTHONPATH=old python path/to/compare.py``, with
``peers.py`` and ``timing.py`` beside it), so a before/after pair shares one card. Writes
``DIR/compare_<label>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mxmoe.bench.cases import MODELS, expert_loads, expert_offsets, gemms
from mxmoe.bench.roofline import provenance
from mxmoe.files import write_text_atomic
from mxmoe.kernels import ExpertGroup, group_gemm, moe_experts_forward, pack, quantize_activations, reference_group_gemm
from mxmoe.kernels.configs import TileConfig, swappable
from mxmoe.schemes import Scheme

try:
    from mxmoe.bench import peers
    from mxmoe.bench.timing import events_ms
except ImportError:  # an older checkout of the package on PYTHONPATH: the modules beside this file
    import peers  # type: ignore[no-redef]
    from timing import events_ms  # type: ignore[no-redef]

W4A8_FP8 = ["w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8"]
SCHEMES = {
    512: ["bf16", "w4a16_g-1_asym", "w4a16_g128_asym", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8", *W4A8_FP8],
    8192: ["bf16", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8", "w4a4_g-1_sym", *W4A8_FP8],
}
LAYER_SCHEMES = ["bf16", peers.VLLM_INT4_SCHEME, "w4a16_g128_asym", "w8a8_g-1_sym_fp8", *W4A8_FP8]


PROG = "mxmoe bench compare"  # also python -m mxmoe.bench.compare
DEV = "cuda"


def _ms(fn) -> float:
    return events_ms(fn, warmup_ms=25, rep_ms=100)


def copy_gbps() -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) on 1 GiB."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / _ms(lambda: b.copy_(a)) / 1e6


def run_case(
    model: str,
    gemm: str,
    n: int,
    k: int,
    tokens: int,
    sweep: "list[tuple]",
    bw: float,
    programs: "tuple[int, ...]" = (),
    schemes: "list[str] | None" = None,
) -> "list[dict]":
    """Rows for one GEMM of one model at one token count (``schemes``: default SCHEMES[tokens])."""
    e, top_k = MODELS[model][0], MODELS[model][3]
    rows = expert_loads(tokens, e, top_k)
    offs = expert_offsets(rows, DEV)
    w = torch.randn(e, n, k, device=DEV, dtype=torch.bfloat16) * 0.02  # [E, N, K]
    x = torch.randn(int(offs[-1]), k, device=DEV, dtype=torch.bfloat16)  # [T, K]
    ends = offs[1:].contiguous()
    exact = peers.exact_gemm(x, rows, w)  # [T, N] float32
    base = {"model": model, "gemm": gemm, "tokens": tokens, "N": n, "K": k}
    out = []
    for name, (fn, fn_q) in peers.gemm_peers(x, w, ends).items():
        row = dict(base, scheme=name, config="-")
        try:
            row["rel_err_vs_bf16"] = peers.rel_err(fn(), exact)
            row["us"] = _ms(fn) * 1e3
            if fn_q is not None:
                row["us_with_act_quant"] = _ms(fn_q) * 1e3
            row["moved_bw_frac"] = peers.moved_fraction(peers.peer_bytes(name, rows, n, k), row["us"] / 1e3, bw)
        except (RuntimeError, TypeError, ValueError) as err:
            row["error"] = str(err).splitlines()[0][:200]
        out.append(row)
    for name in schemes or SCHEMES[tokens]:
        s = Scheme.parse(name)
        pws = [pack(w[i], s) for i in range(e)]
        group = ExpertGroup(pws)
        wbytes = sum(pw.nbytes for pw, r in zip(pws, rows) if r)
        moved = peers.ours_bytes(pws, rows, n, k)
        x_q = quantize_activations(x, offs, group)
        ref = reference_group_gemm(x, offs, pws)
        rel_bf16 = peers.rel_err(group_gemm(x, offs, group).float(), exact)
        for cfg in [None] + sweep + [("programs", p) for p in programs]:
            npg = None
            if cfg is not None and cfg[0] == "programs":
                npg = cfg[1]
                label, cfg = f"default,P={npg}", None
            elif cfg is not None and cfg[3] and not swappable(s):
                continue  # swap-AB: weight-only packed schemes and fp8 ones with narrower codes
            else:
                label = "default" if cfg is None else ",".join(map(str, cfg))
                npg = cfg[5] if cfg is not None and len(cfg) > 5 else None
            configs = (
                None
                if cfg is None
                else {s: TileConfig(cfg[0], cfg[1], 64 if s.is_full_precision else 128, cfg[2], bool(cfg[3]))}
            )
            nw = None if cfg is None else cfg[4]
            row = dict(base, scheme=name, config=label)
            try:

                def launch():
                    return group_gemm(
                        x, offs, group, x_q=x_q, configs=configs, num_warps=nw, num_programs=npg, validate=False
                    )

                ms = _ms(launch)
                row.update(us=ms * 1e3, weight_bw_frac=wbytes / (ms / 1e3) / (bw * 1e9))
                row["moved_bw_frac"] = peers.moved_fraction(moved, ms, bw)
                row["rel_err"] = peers.rel_err(launch().float(), ref)  # every tile checked: a wrong one is no result
                if label == "default":
                    row["rel_err_vs_bf16"] = rel_bf16
                    if not s.weight_only:  # standalone: the activation-quantization launch, then the GEMM
                        row["us_with_act_quant"] = _ms(lambda: group_gemm(x, offs, group, validate=False)) * 1e3
            except Exception as err:  # noqa: BLE001 - a config that does not fit is recorded, not fatal
                row["error"] = str(err).splitlines()[0][:200]
            out.append(row)
        pws = group = None  # free before the next scheme
    peers.add_ratios(out, "scheme", "us")
    return out


def run_layer_case(model: str, tokens: int, bw: float, schemes: "list[str]" = LAYER_SCHEMES) -> "tuple[list, str]":
    """Rows for one whole routed-experts layer (gate_up, SiLU·up, down, combine) at one token count, and the
    note on the vLLM peers ('' when they ran). Every row times the layer with its activation quantization."""
    e, h, inter, top_k = MODELS[model]
    rows = expert_loads(tokens, e, top_k)
    base = {"model": model, "gemm": "moe", "tokens": tokens, "N": h, "K": inter, "config": "default"}
    try:
        idx = peers.routed_ids(rows, tokens, top_k, device=DEV)  # [T, k]
    except ValueError as err:  # the routing's per-expert cap took slots away: no layer of T tokens
        return [], f"layer case skipped: {err}"
    wts = torch.softmax(torch.randn(tokens, top_k, device=DEV), dim=1)  # [T, k]
    w1 = torch.randn(e, 2 * inter, h, device=DEV, dtype=torch.bfloat16) * 0.02  # [E, 2I, H]
    w2 = torch.randn(e, h, inter, device=DEV, dtype=torch.bfloat16) * 0.02  # [E, H, I]
    x = torch.randn(tokens, h, device=DEV, dtype=torch.bfloat16)  # [T, H]
    exact = peers.reference_layer(x, idx, wts, w1, w2)
    # bytes every layer must move, the same for all rows but the weights: routed rows in and out of both GEMMs
    act_bytes = 2 * tokens * top_k * (h + 2 * inter + inter + h)
    active = [i for i in range(e) if rows[i]]
    names = dict.fromkeys([*schemes, peers.VLLM_INT4_SCHEME])  # ours beside vLLM's int4: the same weights
    packed = {name: ([pack(w1[i], name) for i in range(e)], [pack(w2[i], name) for i in range(e)]) for name in names}
    calls = dict(peers.torch_layer_peers(x, idx, wts, w1, w2))
    vllm, note = peers.vllm_layer_peers(x, idx, wts, w1, w2, packed[peers.VLLM_INT4_SCHEME])
    calls.update(vllm)
    bf16_bytes = len(active) * 2 * 3 * h * inter
    weight_bytes = {peers.BF16_PEER: bf16_bytes, peers.VLLM_BF16: bf16_bytes}
    weight_bytes[peers.FP8_PEER] = len(active) * (3 * h * inter + 4 * (2 * inter + h))  # codes + channel scales
    for name, (gu, dn) in packed.items():
        groups = (ExpertGroup(gu), ExpertGroup(dn))
        calls[name] = lambda g=groups: moe_experts_forward(x, idx, wts, *g)
        weight_bytes[name] = sum(gu[i].nbytes + dn[i].nbytes for i in active)
    weight_bytes[peers.VLLM_INT4] = weight_bytes[peers.VLLM_INT4_SCHEME]  # the same codes, scales 16-bit too
    out = []
    for name, fn in calls.items():
        row = dict(base, scheme=name)
        try:
            row["rel_err_vs_bf16"] = peers.rel_err(fn(), exact)
            row["us"] = _ms(fn) * 1e3
            row["moved_bw_frac"] = peers.moved_fraction(weight_bytes[name] + act_bytes, row["us"] / 1e3, bw)
        except Exception as err:  # noqa: BLE001 - a peer that fails here is recorded, not fatal
            row["error"] = str(err).splitlines()[0][:200]
        out.append(row)
    peers.add_ratios(out, "scheme", "us")
    return out, note or ""


def _print_row(label: str, r: dict) -> None:
    print(
        f"{label} {r['model'][:10]} {r['gemm']:7s} T={r['tokens']:>5} {r['scheme']:30s} {r['config']:14s} "
        f"{r.get('us', float('nan')):8.1f}us {r.get('speedup_vs_torch_bf16', float('nan')):5.2f}x bf16 "
        f"{r.get('speedup_vs_torch_fp8', float('nan')):5.2f}x fp8 "
        f"bw={r.get('moved_bw_frac', float('nan')):.2f} err={r.get('rel_err_vs_bf16', float('nan')):.1e} "
        f"vs-ref={r.get('rel_err', float('nan')):.1e} "
        f"{r.get('error', '')}",
        flush=True,
    )


def main(argv: "list[str] | None" = None) -> None:
    """See the module docstring."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--cases", nargs="*", default=["qwen1.5-moe:512", "deepseek-v2-lite:512", "qwen1.5-moe:8192"])
    ap.add_argument("--sweep", nargs="*", default=[], help="TOKENS:bm,bn,stages,swap,warps[,programs]")
    ap.add_argument("--programs", nargs="*", type=int, default=[], help="grid sizes to time the default tiles on")
    ap.add_argument("--schemes", nargs="*", default=None, help="schemes to time (default: SCHEMES of the token count)")
    ap.add_argument("--no-layers", action="store_true", help="skip the whole-layer rows (torch, vLLM and ours)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sweep: dict = {}  # tokens -> [(bm, bn, stages, swap, warps[, programs])]
    for c in args.sweep:
        tokens, cfg = c.split(":")
        sweep.setdefault(int(tokens), []).append(tuple(int(v) for v in cfg.split(",")))
    doc = {
        "label": args.label,
        "device": torch.cuda.get_device_name(),
        "provenance": provenance(),
        "copy_GBps": copy_gbps(),
        "notes": [],
        "rows": [],
    }
    path = Path(args.out) / f"compare_{args.label}.json"
    for case in args.cases:
        model, tokens = case.split(":")
        for gemm, n, k in gemms(model):
            for r in run_case(
                model,
                gemm,
                n,
                k,
                int(tokens),
                sweep.get(int(tokens), []),
                doc["copy_GBps"],
                tuple(args.programs),
                args.schemes,
            ):
                doc["rows"].append(r)
                _print_row(args.label, r)
            write_text_atomic(path, json.dumps(doc, indent=1))
        if not args.no_layers:
            layer_rows, note = run_layer_case(model, int(tokens), doc["copy_GBps"])
            if note and note not in doc["notes"]:
                doc["notes"].append(note)
                print(note, flush=True)
            for r in layer_rows:
                doc["rows"].append(r)
                _print_row(args.label, r)
            write_text_atomic(path, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
