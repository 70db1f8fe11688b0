"""Focused timing of chosen schemes and tile configs on the kernel's target cases, one process, one GPU.

``python -m mxmoe.bench.compare --label NAME --out DIR [--cases MODEL:TOKENS ...] [--sweep TOKENS:bm,bn,stages,swap,warps[,programs] ...]
[--programs P ...] [--schemes SCHEME ...]``

For each case (both GEMMs of the model, routed as in ``bench``) it times torch's bf16 grouped GEMM and
every scheme with its default tile and with each ``--sweep`` config (``triton.testing.do_bench``
median), and the default tile on each ``--programs`` grid size (persistent programs; the kernel's own choice
is 2 per SM), checks the default against ``reference_group_gemm``, and reports the speedup over torch and
the weight bytes moved per second as a fraction of the copy bandwidth measured in the same run.
Runs unchanged against an older checkout of the package (``PYTHONPATH=old python path/to/compare.py``),
so a before/after pair shares one card. Writes ``DIR/compare_<label>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from mxmoe.bench.cases import MODELS, expert_loads
from mxmoe.kernels import ExpertGroup, group_gemm, pack, quantize_activations, reference_group_gemm
from mxmoe.kernels.configs import TileConfig
from mxmoe.schemes import Scheme

SCHEMES = {
    512: ["bf16", "w4a16_g-1_asym", "w4a16_g128_asym", "w8a8_g-1_sym"],
    8192: ["bf16", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8", "w4a4_g-1_sym"],
}


PROG = "mxmoe bench compare"  # also python -m mxmoe.bench.compare


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_gbps() -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) on 1 GiB."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
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
    offs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02  # [E, N, K]
    x = torch.randn(int(offs[-1]), k, device="cuda", dtype=torch.bfloat16)  # [T, K]
    gmm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    t_torch = _ms(lambda: gmm(x, w.transpose(1, 2), offs=offs[1:].contiguous()))
    base = {"model": model, "gemm": gemm, "tokens": tokens, "N": n, "K": k}
    out = [dict(base, scheme="torch_grouped_bf16", config="-", us=t_torch * 1e3, speedup=1.0)]
    for name in schemes or SCHEMES[tokens]:
        s = Scheme.parse(name)
        pws = [pack(w[i], s) for i in range(e)]
        group = ExpertGroup(pws)
        wbytes = sum(pw.nbytes for pw, r in zip(pws, rows) if r)
        x_q = quantize_activations(x, offs, group)
        rel = float(
            (group_gemm(x, offs, group).float() - (ref := reference_group_gemm(x, offs, pws))).norm() / ref.norm()
        )
        for cfg in [None] + sweep + [("programs", p) for p in programs]:
            npg = None
            if cfg is not None and cfg[0] == "programs":
                npg = cfg[1]
                label, cfg = f"default,P={npg}", None
            elif cfg is not None and cfg[3] and (not s.weight_only or s.is_full_precision):
                continue  # swap-AB is a path of weight-only packed schemes
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
                ms = _ms(
                    lambda: group_gemm(
                        x, offs, group, x_q=x_q, configs=configs, num_warps=nw, num_programs=npg, validate=False
                    )
                )
                row.update(us=ms * 1e3, speedup=t_torch / ms, weight_bw_frac=wbytes / (ms / 1e3) / (bw * 1e9))
                if label == "default":
                    row["rel_err"] = rel
            except Exception as err:  # noqa: BLE001 - a config that does not fit is recorded, not fatal
                row["error"] = str(err).splitlines()[0][:200]
            out.append(row)
        pws = group = None  # free before the next scheme
    return out


def main(argv: "list[str] | None" = None) -> None:
    """See the module docstring."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--cases", nargs="*", default=["qwen1.5-moe:512", "deepseek-v2-lite:512", "qwen1.5-moe:8192"])
    ap.add_argument("--sweep", nargs="*", default=[], help="TOKENS:bm,bn,stages,swap,warps[,programs]")
    ap.add_argument("--programs", nargs="*", type=int, default=[], help="grid sizes to time the default tiles on")
    ap.add_argument("--schemes", nargs="*", default=None, help="schemes to time (default: SCHEMES of the token count)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sweep: dict = {}  # tokens -> [(bm, bn, stages, swap, warps[, programs])]
    for c in args.sweep:
        tokens, cfg = c.split(":")
        sweep.setdefault(int(tokens), []).append(tuple(int(v) for v in cfg.split(",")))
    doc = {"label": args.label, "device": torch.cuda.get_device_name(), "copy_GBps": copy_gbps(), "rows": []}
    for case in args.cases:
        model, tokens = case.split(":")
        _, h, inter, _ = MODELS[model]
        for gemm, n, k in (("gate_up", 2 * inter, h), ("down", h, inter)):
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
                print(
                    f"{args.label} {model[:10]} {gemm:7s} T={tokens:>5} {r['scheme']:18s} {r['config']:14s} "
                    f"{r.get('us', float('nan')):8.1f}us {r.get('speedup', float('nan')):5.2f}x "
                    f"bw={r.get('weight_bw_frac', float('nan')):.2f} err={r.get('rel_err', float('nan')):.1e} {r.get('error', '')}",
                    flush=True,
                )
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"compare_{args.label}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
