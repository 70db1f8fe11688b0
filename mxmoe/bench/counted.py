"""The counted kernel runs of one GPU and its cost table, in one resumable command: ``mxmoe bench counted``.

The three ``mxmoe bench gemm`` runs that the notebooks, the claims and a GPU's cost table read (the
protocol of results/kernels/NOTES.md), each written as ``<out>/bench_<gpu>_<tag>_<run>.json``:

* ``graph16``: the decode size (16 tokens) of Qwen1.5-MoE, DeepSeek-V2-Lite and Qwen3-30B as CUDA-graph
  replays, as a captured decode step runs its GEMMs of tens of microseconds;
* ``all``: the six paper shapes at 16/512/8192 tokens, one call per L2 flush (Table 6 on four models);
* ``cudagraph``: smollm2-moe's GEMMs of a few microseconds (and Qwen1.5-MoE's, to pair with their event-timed
  rows) as graph replays.

Then ``<table-dir>/<gpu>.json`` from ``all`` and ``cudagraph`` (``mxmoe.bench.cost_table``) and the
performance model's error on ``all``'s mixed launches with each case's shape held out. The whole command
stops starting cases after ``--deadline-seconds`` (for machines that limit a command's time); the same command
continues where it stopped, and writes the table once all three runs are complete. ``--table-only`` takes only
the two runs the table is built from (8 minutes on a fresh H100): a GPU of your own gets its table without
the decode-size graphs that only the notebooks' targets read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from mxmoe.bench.cases import PAPER

PROG = "mxmoe bench counted"
RUNS = {  # run name: its `mxmoe bench gemm` arguments, in the order they are taken
    "graph16": [
        *("--models", "qwen1.5-moe", "deepseek-v2-lite", "qwen3-30b", "--tokens", "16"),
        *("--warmup-ms", "5", "--rep-ms", "20", "--rounds", "3", "--timer", "cudagraph"),
        *("--table6-models", "qwen3-30b", "--ablation-models"),
    ],
    "all": [
        *("--models", *PAPER, "--tokens", "16", "512", "8192", "--warmup-ms", "10", "--rep-ms", "20", "--rounds", "3"),
        *("--table6-models", "mixtral-8x7b", "qwen2-57b", "qwen3-30b", "olmoe", "--ablation-models"),
    ],
    "cudagraph": [
        *("--models", "smollm2-moe", "smollm2-moe-shared", "qwen1.5-moe", "--tokens", "16", "512", "8192"),
        *("--warmup-ms", "25", "--rep-ms", "20", "--rounds", "1", "--timer", "cudagraph"),
    ],
}
TABLE_RUNS = ("all", "cudagraph")  # the runs a cost table is built from
STOP_MARGIN_S = 30.0  # no run is started with less time than this left


def run_path(out: Path, gpu_slug: str, tag: str, run: str) -> Path:
    """Where ``mxmoe bench gemm --tag <tag>_<run>`` writes on this GPU."""
    return Path(out) / f"bench_{gpu_slug}_{tag}_{run}.json"


def skipped(path: Path) -> "list[str] | None":
    """The cases a benchmark file skipped (its deadline's and any that failed), or None when there is no file."""
    return json.loads(path.read_text()).get("skipped", []) if path.exists() else None


def complete(skips: "list[str] | None") -> bool:
    """True for a run whose file exists and whose deadline cut no case (a case that failed is skipped too, but
    timing it again would fail again)."""
    return skips is not None and not any(s.endswith(": deadline") for s in skips)


def main(argv: "list[str] | None" = None) -> int:
    """Command line (module doc). Exit 0 when the table is written, 3 when runs remain (run it again), 2 on bad
    input or without a CUDA GPU."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True, help="names the runs: bench_<gpu>_<tag>_<run>.json (e.g. the commit)")
    ap.add_argument("--out", type=Path, default=Path("results/kernels"), help="folder of the runs")
    ap.add_argument("--table-dir", type=Path, default=Path("cost_tables"), help="folder of the cost table")
    ap.add_argument(
        "--deadline-seconds",
        type=float,
        default=500.0,
        help="start no case after this many seconds; the same command continues",
    )
    ap.add_argument("--compile-workers", type=int, default=None, help="passed to mxmoe bench gemm")
    ap.add_argument(
        "--table-only",
        action="store_true",
        help=f"only the runs the cost table is built from ({', '.join(TABLE_RUNS)}), not graph16",
    )
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        ap.error(f"--tag must be letters, digits, '.', '_' or '-' (it is part of file names), got {args.tag!r}")
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mxmoe.bench import gemm
    from mxmoe.bench.cost_table import write_table
    from mxmoe.bench.roofline import provenance
    from mxmoe.bench.validate import validate
    from mxmoe.env import device_slug
    from mxmoe.perfmodel import read_table

    t0, slug = time.time(), device_slug(provenance()["device"])
    runs = {run: RUNS[run] for run in (TABLE_RUNS if args.table_only else RUNS)}
    paths = {run: run_path(args.out, slug, args.tag, run) for run in runs}
    workers = [] if args.compile_workers is None else ["--compile-workers", str(args.compile_workers)]
    for run, run_args in runs.items():
        left = args.deadline_seconds - (time.time() - t0)
        if complete(skipped(paths[run])):
            continue
        if left < STOP_MARGIN_S:
            break
        print(f"== {run}: {paths[run].name} ({left:.0f} s left)", flush=True)
        gemm.main(
            [
                *run_args,
                *workers,
                "--out",
                str(args.out),
                "--tag",
                f"{args.tag}_{run}",
                "--deadline-seconds",
                f"{left:.0f}",
            ]
        )
    skips = {run: skipped(path) for run, path in paths.items()}
    missing = [run for run, sk in skips.items() if not complete(sk)]
    if missing:
        print(
            f"{PROG}: {', '.join(missing)} not complete after {time.time() - t0:.0f} s: run the same command again to continue"
        )
        return 3
    failed = [case for sk in skips.values() for case in sk]
    if failed:
        print(f"{PROG}: cases that failed (not timed): {'; '.join(failed)}")
    table_path = write_table([paths[run] for run in TABLE_RUNS], args.table_dir)
    check = validate(paths["all"], read_table(table_path), holdout=True)
    print(
        f"wrote {table_path}: the performance model on {check['n_mixed']} mixed launches of {paths['all'].name}, "
        f"each case's shape held out: median |error| {check['mixed_median_abs_err']:.1%}, "
        f"max {check['mixed_max_abs_err']:.1%}"
        if check["n_mixed"]
        else f"wrote {table_path} ({paths['all'].name} timed no mixed launch to check the model on)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
