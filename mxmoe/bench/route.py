"""The experts path's routing at decode and prefill sizes: one Triton program against the torch ops it replaces.

``mxmoe bench route [--out DIR]`` (under a minute on a GPU): for expert counts and (token, slot) pair
counts of the paper models' decode and prefill batches, times ``mxmoe.kernels.moe.route_with_inverse`` taking
the one-program counting sort (``_route_kernel``) and taking the torch path (stable ``argsort``, ``scatter_add_``
counts, ``cumsum``, the inverse permutation: about ten launches), as CUDA-graph replays (the time a captured
decode step spends on it), checks that both give the same order, inverse and offsets, and prints where the
one-program sort stops paying, against ``ROUTE_ONE_PROGRAM_CELLS`` (pairs x padded experts). Writes ``DIR/route_<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from mxmoe.bench.roofline import provenance
from mxmoe.env import device_slug
from mxmoe.files import write_json_atomic
from mxmoe.kernels import moe
from mxmoe.paths import kernel_results_dir

# (experts, top_k, tokens): Qwen1.5-MoE, DeepSeek-V2-Lite, Qwen3-30B-A3B at decode and prefill sizes
CASES = [(e, k, t) for e, k in ((60, 4), (64, 6), (128, 8)) for t in (1, 16, 64, 128, 256, 512)]


def timed_route(limit: int):
    """``route_with_inverse`` with ``ROUTE_ONE_PROGRAM_CELLS`` set to ``limit`` for the call (0: the torch path)."""

    def fn(ids: torch.Tensor, experts: int):
        old, moe.ROUTE_ONE_PROGRAM_CELLS = moe.ROUTE_ONE_PROGRAM_CELLS, limit
        try:
            return moe.route_with_inverse(ids, experts)
        finally:
            moe.ROUTE_ONE_PROGRAM_CELLS = old

    return fn


def run(rounds: int = 3) -> dict:
    """Time both paths on every case (medians over rounds that alternate their order)."""
    one, torch_path = timed_route(1 << 30), timed_route(0)
    rows = []
    for experts, k, tokens in CASES:
        g = torch.Generator(device="cuda").manual_seed(tokens)
        ids = torch.randint(0, experts, (tokens * k,), device="cuda", generator=g) ** 2 % experts  # skewed
        ids = ids.reshape(tokens, k)  # [T, k] (repeats within a token do not matter to the sort)
        same = all(torch.equal(a, b) for a, b in zip(one(ids, experts), torch_path(ids, experts)))
        times: dict = {"one_program": [], "torch": []}
        for r in range(rounds):
            for name, fn in (("one_program", one), ("torch", torch_path))[:: 1 if r % 2 == 0 else -1]:
                times[name].append(
                    1e3 * do_bench_cudagraph(lambda fn=fn: fn(ids, experts), rep=20, return_mode="median")
                )
        us = {n: statistics.median(v) for n, v in times.items()}
        rows.append({"experts": experts, "top_k": k, "tokens": tokens, "pairs": tokens * k, "us": us, "same": same})
        print(
            f"E={experts:4d} pairs={tokens * k:5d}: one program {us['one_program']:6.1f} us, torch {us['torch']:6.1f} us"
            f" ({us['torch'] / us['one_program']:.2f}x){'' if same else '  DIFFERENT RESULT'}",
            flush=True,
        )
    return {"provenance": provenance(), "one_program_cells": moe.ROUTE_ONE_PROGRAM_CELLS, "rows": rows}


def main(argv=None) -> int:
    """Command line (module doc). Exit 0; 2 without a CUDA GPU or when the two paths disagree."""
    ap = argparse.ArgumentParser(prog="mxmoe bench route", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder (default results/kernels)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mxmoe bench route: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    doc = run()
    out = Path(args.out) if args.out else kernel_results_dir()
    path = out / f"route_{device_slug(doc['provenance']['device'])}.json"
    write_json_atomic(path, doc)
    for e in sorted({r["experts"] for r in doc["rows"]}):
        rows = [r for r in doc["rows"] if r["experts"] == e]
        paying = [r["pairs"] for r in rows if r["us"]["torch"] > r["us"]["one_program"]]
        taken = [r["pairs"] for r in rows if r["pairs"] * moe._expert_pad(e) <= doc["one_program_cells"]]
        print(f"E={e}: one program faster up to {max(paying, default=0)} pairs, taken up to {max(taken, default=0)}")
    print(f"wrote {path}")
    return 0 if all(r["same"] for r in doc["rows"]) else 2


if __name__ == "__main__":
    sys.exit(main())
