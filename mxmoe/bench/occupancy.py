"""Programs per SM and the register cap of the Triton kernel, at decode and prefill sizes, timed as graphs.

``mxmoe bench occupancy [--budget S] [--out DIR] [--tag TAG]`` (157 s on an H100), one process,
one GPU. The kernel is persistent: ``group_gemm`` launches 2 programs per SM (``num_programs``), and the
compiler gives its decode tiles 160-170 registers a thread, so a third program of 4 warps fits an SM only
just and a fourth not at all. This benchmark times what more programs per SM buy, on the 3- and 4-bit
weight-only schemes that MxMoE's allocations are made of (w3a16 g128, w4a16 g128), the gate_up and down
GEMMs of Qwen1.5-MoE, DeepSeek-V2-Lite and Qwen3-30B-A3B, at 16 tokens (decode: 1-2 rows per expert) and
512 (prefill: tens of rows), the skewed loads of ``mxmoe.bench.gluon.routed_rows``:

* ``VARIANTS[tokens]``: name -> (programs per SM, register cap or None, (bm, stages) or None for the default
  tile). A register cap is Triton's ``maxnreg`` launch option (``register_cap``), which ptxas meets with
  spills where the tile needs more (compiled offline for sm_90a at 128: none for w3a16's 16-token tile, 8 bytes
  for w4a16's, 44-76 bytes at bm 32);
* torch's bf16 grouped GEMM on the dequantized weights, the peer.

Each variant is checked against ``reference_group_gemm``; times are medians over rounds that alternate the
order of CUDA-graph replays (``do_bench_cudagraph``: the kernels' time as a captured forward runs them).
``w%`` is the weight bytes of the experts with rows per second as a % of the copy bandwidth (read + write of
a 1 GiB ``copy_``, same run). Writes ``DIR/occupancy_<device>[_<tag>].json`` after every case and a table.
It measures; it does not change what ``group_gemm`` launches.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from mxmoe.bench.cases import MODELS, expert_offsets, gemms
from mxmoe.bench.compare import copy_gbps
from mxmoe.bench.gluon import bw_pct, routed_rows
from mxmoe.bench.peers import rel_err
from mxmoe.bench.roofline import provenance
from mxmoe.env import device_slug
from mxmoe.files import write_json_atomic
from mxmoe.kernels import ExpertGroup, group_gemm, pack, reference_group_gemm
from mxmoe.kernels import triton_kernel as tk
from mxmoe.kernels.configs import TileConfig
from mxmoe.paths import kernel_results_dir

MODELS_TIMED = ("qwen1.5-moe", "deepseek-v2-lite", "qwen3-30b")
SHAPES = [  # name, experts, N, K, top_k
    (f"{m} {gemm}", MODELS[m][0], n, k, MODELS[m][3]) for m in MODELS_TIMED for gemm, n, k in gemms(m)
]
SCHEMES = ("w3a16_g128_asym", "w4a16_g128_asym")
VARIANTS = {  # tokens -> name -> (programs per SM, register cap, (bm, stages) or None = the default tile)
    16: {  # default tile: bm 16, 4 stages, 160-170 registers
        "default": (2, None, None),
        "p3": (3, None, None),
        "p3_r128": (3, 128, None),
        "p4_r128": (4, 128, None),
        "p4_r128_s5": (4, 128, (16, 5)),
    },
    512: {  # default tile: bm 32 (Qwen3-30B-A3B, 32 rows per expert) or 64 (the others, 34-48), 200-215 registers
        "default": (2, None, None),
        "p3": (3, None, None),
        "bm32_p3": (3, None, (32, 4)),
        "bm32_p4_r128": (4, 128, (32, 4)),
    },
}
TOL = 1e-2  # relative error of a correct kernel against the reference: ~3e-3 (bf16 output)


@contextlib.contextmanager
def register_cap(registers: "int | None"):
    """Launch ``group_gemm``'s kernel with Triton's ``maxnreg`` option inside the block (None: no cap)."""
    kernel = tk.group_gemm_kernel
    run = kernel.run
    if registers is not None:
        kernel.run = lambda *a, **kw: run(*a, maxnreg=registers, **kw)
    try:
        yield
    finally:
        kernel.run = run


def time_case(shape: tuple, scheme: str, tokens: int, bw: float, rounds: int = 3) -> dict:
    """One (shape, scheme, tokens) row: µs per variant and torch bf16, relative errors, % of copy bandwidth."""
    name, e, n, k, top_k = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(e, n, k, device="cuda", generator=g)  # [E, N, K]
    packed = [pack(w[i], scheme) for i in range(e)]
    w16 = torch.stack([p.dequantize() for p in packed]).to(torch.bfloat16)  # [E, N, K] what the codes mean
    del w
    group = ExpertGroup(packed)
    rows = routed_rows(tokens, e, top_k, seed=1)
    x = torch.randn(sum(rows), k, device="cuda", dtype=torch.bfloat16)  # [T, K]
    off = expert_offsets(rows)  # [E + 1]
    ref = reference_group_gemm(x, off, packed)
    sm = torch.cuda.get_device_properties(0).multi_processor_count

    def variant(per_sm, cap, tile):
        cfg = None if tile is None else {scheme: TileConfig(tile[0], 128, 128, tile[1], swap_ab=True)}

        def fn():
            with register_cap(cap):
                return group_gemm(x, off, group, configs=cfg, num_programs=per_sm * sm, validate=False)

        return fn

    fns = {v: variant(*spec) for v, spec in VARIANTS[tokens].items()}
    errs = {v: rel_err(fn(), ref) for v, fn in fns.items()}
    ends = off[1:].contiguous()
    fns["torch_bf16"] = lambda: torch._grouped_mm(x, w16.transpose(1, 2), offs=ends)
    times: dict = {v: [] for v in fns}
    for r in range(rounds):  # alternate the order round by round
        for v in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            times[v].append(1e3 * do_bench_cudagraph(fns[v], rep=30, return_mode="median"))
    us = {v: statistics.median(t) for v, t in times.items()}
    wbytes = sum(p.nbytes for p, r in zip(packed, rows) if r)
    return {
        "shape": name,
        "scheme": scheme,
        "tokens": tokens,
        "rows_per_expert": rows,
        "us": us,
        "rel_err": errs,
        "weight_bytes": wbytes,
        "weight_bw_pct": {v: bw_pct(wbytes, t, bw) for v, t in us.items()},
    }


def print_table(rows: "list[dict]") -> None:
    """µs per variant, the best variant's speedup over the default and both against torch bf16."""
    for tokens, variants in VARIANTS.items():
        names = [*variants, "torch_bf16"]
        print(
            "\n"
            + f"{tokens} tokens (µs, graph)".ljust(36)
            + " ".join(f"{v:>12s}" for v in names)
            + "   best/def  torch/best"
        )
        for r in (r for r in rows if r["tokens"] == tokens):
            us = r["us"]
            best = min(variants, key=us.get)
            ok = all(v < TOL for v in r["rel_err"].values())
            print(
                f"{r['scheme'][:10]:10s} {r['shape']:24s} "
                + " ".join(f"{us[v]:12.1f}" for v in names)
                + f"   {us['default'] / us[best]:7.3f}  {us['torch_bf16'] / us[best]:6.2f}x {best}"
                + f" w% {r['weight_bw_pct']['default']:.0f}->{r['weight_bw_pct'][best]:.0f}"
                + ("" if ok else "  REL.ERR OVER TOLERANCE")
            )


def main(argv=None) -> int:
    """Command line (module doc). Exit 0; 2 without a CUDA GPU or when a variant misses the reference."""
    ap = argparse.ArgumentParser(prog="mxmoe bench occupancy", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="start no new case after this many seconds")
    ap.add_argument("--out", default=None, help="folder (default results/kernels)")
    ap.add_argument("--tag", default=None, help="suffix of the file name")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mxmoe bench occupancy: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else kernel_results_dir()
    doc = {"provenance": provenance(), "variants": VARIANTS, "copy_gbps": copy_gbps(), "rows": [], "complete": False}
    path = out / f"occupancy_{device_slug(doc['provenance']['device'])}{'_' + args.tag if args.tag else ''}.json"
    deadline = time.time() + args.budget
    cases = [(s, sh, t) for s in SCHEMES for sh in SHAPES for t in VARIANTS]
    for scheme, shape, tokens in cases:
        if time.time() > deadline:
            print(f"budget spent: {len(doc['rows'])} of {len(cases)} cases", flush=True)
            break
        doc["rows"].append(time_case(shape, scheme, tokens, doc["copy_gbps"]))
        write_json_atomic(path, doc)
    doc["complete"] = len(doc["rows"]) == len(cases)
    write_json_atomic(path, doc)
    print_table(doc["rows"])
    print(f"wrote {path}")
    return 0 if all(v < TOL for r in doc["rows"] for v in r["rel_err"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
