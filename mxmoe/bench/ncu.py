"""One launch of each grouped GEMM of a benchmark case for Nsight Compute, and a summary of its report.

``ncu --nvtx --profile-from-start off --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy
--section WarpStateStats --csv --page details --log-file ncu.csv python -m mxmoe bench ncu qwen1.5-moe:8192
--schemes bf16 w4a8_g128_sym_fp8 --peers`` compiles and warms each variant, then profiles exactly one launch of
it (the CUDA profiler on around that launch alone, inside an NVTX range named after the variant): our kernel in
each scheme and, with ``--peers``, torch's bf16 and fp8 grouped GEMMs, on the case's GEMMs with the benchmark's
skewed expert loads and random weights. ``mxmoe bench ncu --summarize ncu.csv`` prints one line per profiled
kernel: its variant, duration, DRAM and SM throughput, issue slots, busiest pipe, registers and occupancy.
Nsight Compute locks the SM clock near its base, so its durations are longer than the benchmark's.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

PROG = "mxmoe bench ncu"
METRICS = {  # Nsight Compute metric name -> column of the summary
    "Duration": "us",
    "DRAM Throughput": "dram%",
    "Compute (SM) Throughput": "sm%",
    "Issue Slots Busy": "issue%",
    "Registers Per Thread": "regs",
    "Achieved Occupancy": "occupancy%",
    "Eligible Warps Per Scheduler": "eligible warps",
    "Warp Cycles Per Issued Instruction": "cycles/instr",
}
BUSIEST = re.compile(r"(\w+) is the highest-utilized pipeline \(([\d.]+)%\)")
NVTX_RANGE = re.compile(r'"<default domain>:([^:"]+):')  # the push/pop range column: '<tid>  "<domain>:<name>:..."'


def parse_case(text: str) -> "tuple[str, list[str], int]":
    """``MODEL:TOKENS`` (both GEMMs) or ``MODEL:GEMM:TOKENS`` -> (model, GEMM names, tokens); ValueError if not."""
    from mxmoe.bench.cases import MODELS, gemms

    parts = text.split(":")
    if parts[0] not in MODELS or len(parts) not in (2, 3) or not parts[-1].isdigit() or int(parts[-1]) < 1:
        raise ValueError(f"case must be MODEL[:GEMM]:TOKENS with MODEL one of {', '.join(MODELS)}, got {text!r}")
    names = [g for g, _, _ in gemms(parts[0])]
    if len(parts) == 3 and parts[1] not in names:
        raise ValueError(f"GEMM must be one of {', '.join(names)}, got {parts[1]!r}")
    return parts[0], parts[1:2] if len(parts) == 3 else names, int(parts[-1])


def variants(model: str, gemm: str, tokens: int, schemes: "list[str]", with_peers: bool) -> dict:
    """{label: callable making one launch} for one GEMM of a case (weights N(0, 0.02²), seeded)."""
    import torch

    from mxmoe.bench.cases import MODELS, expert_loads, expert_offsets, gemms
    from mxmoe.bench.peers import gemm_peers
    from mxmoe.kernels import ExpertGroup, group_gemm, pack, quantize_activations

    e, _, _, top_k = MODELS[model]
    n, k = next((n, k) for g, n, k in gemms(model) if g == gemm)
    torch.manual_seed(0)
    rows = expert_loads(tokens, e, top_k)
    offs = expert_offsets(rows)  # [E + 1]
    x = torch.randn(int(offs[-1]), k, device="cuda", dtype=torch.bfloat16)  # [T, K]
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02  # [E, N, K]
    out = {}
    for s in schemes:
        group = ExpertGroup([pack(w[i], s) for i in range(e)])
        x_q = quantize_activations(x, offs, group)  # outside the profiled launch, as the token gather hands it over
        out[f"{gemm}/ours/{s}"] = lambda g=group, q=x_q: group_gemm(x, offs, g, x_q=q, validate=False)
    if with_peers:
        out.update({f"{gemm}/{name}": fn for name, (fn, _) in gemm_peers(x, w, offs[1:].contiguous()).items()})
    return out


def profile(model: str, gemm_names: "list[str]", tokens: int, schemes: "list[str]", with_peers: bool) -> None:
    """Warm each variant, then run it once with the CUDA profiler on, inside an NVTX range of its label."""
    import torch

    for gemm in gemm_names:
        for label, fn in variants(model, gemm, tokens, schemes, with_peers).items():
            fn(), fn()  # compile and warm
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push(label)
            fn()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(label, flush=True)


def summarize(path: Path) -> "list[dict]":
    """One row per kernel of an ``ncu --csv --page details`` report (the ``--log-file`` of the module doc)."""
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("==")]
    kernels: dict = {}
    for r in csv.DictReader(lines):
        ranges = NVTX_RANGE.findall(next((v for key, v in r.items() if key and "Push/Pop_Range" in key), "") or "")
        row = kernels.setdefault(r["ID"], {"variant": ranges[-1] if ranges else "-", "kernel": r["Kernel Name"][:40]})
        if r["Metric Name"] in METRICS:
            value = float(r["Metric Value"].replace(",", ""))
            row[METRICS[r["Metric Name"]]] = value / 1e3 if r["Metric Name"] == "Duration" else value  # ns -> us
        busiest = BUSIEST.search(r.get("Rule Description") or "")
        if busiest:
            row["busiest pipe"] = f"{busiest[1]} {busiest[2]}%"
    return list(kernels.values())


def main(argv: "list[str] | None" = None) -> int:
    """Command line (module doc). Exit 0; 2 on a malformed case or scheme, without a CUDA GPU, or an unreadable report."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("case", nargs="?", help="MODEL[:GEMM]:TOKENS, e.g. qwen1.5-moe:down:8192")
    ap.add_argument("--schemes", nargs="+", default=["bf16"], help="our kernel's schemes to launch (default bf16)")
    ap.add_argument("--peers", action="store_true", help="also launch torch's bf16 and fp8 grouped GEMMs")
    ap.add_argument("--summarize", type=Path, metavar="NCU_CSV", help="print the kernels of an ncu report instead")
    args = ap.parse_args(argv)
    if args.summarize:
        if not args.summarize.is_file():
            ap.error(f"{args.summarize} is not a file: give the --log-file of an `ncu --csv --page details` run")
        import pandas as pd

        try:
            rows = summarize(args.summarize)
        except (KeyError, ValueError, UnicodeDecodeError) as err:
            ap.error(f"{args.summarize} is not an `ncu --csv --page details` report ({type(err).__name__}: {err})")
        if not rows:
            ap.error(f"{args.summarize} holds no profiled kernel: was the command run under ncu (module doc)?")
        print(pd.DataFrame(rows).to_string(index=False))
        return 0
    if not args.case:
        ap.error("give a case to launch (MODEL[:GEMM]:TOKENS) or --summarize NCU_CSV")
    from mxmoe.schemes import Scheme

    try:
        model, gemm_names, tokens = parse_case(args.case)
        for s in args.schemes:
            Scheme.parse(s)
    except ValueError as err:
        ap.error(str(err))
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    profile(model, gemm_names, tokens, args.schemes, args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
