"""The Gluon warp-specialised 4-bit grouped GEMM (``mxmoe.kernels.gluon_kernel``) against the Triton kernel, on a Hopper GPU.

``mxmoe bench gluon [--quick] [--budget S] [--out DIR] [--tag TAG]`` (about 4 minutes on an H100, ``--quick``
about 1), in one process on one GPU:

1. Edge cases (tiny launches): programs with no tile, experts with 0 and 1 rows, ragged N, K not a multiple
   of 128, per-channel asymmetric and symmetric schemes, g256: the register-operand Gluon kernel at each tile /
   wgmma depth, the shared-operand one (``operand="shared"``) at 16 and 64 token rows with its converters
   splitting rows or K blocks, and the Triton
   kernel against ``reference_group_gemm`` (relative error; ``EDGE_TOL``).
2. Paper shapes, w4a16_g128_asym: Qwen1.5-MoE (E=60, top-4) and DeepSeek-V2-Lite (E=64, top-6), gate_up
   (N=2816, K=2048) and down (N=2048, K=1408), at 16 / 512 / 8192 tokens, the skewed loads of
   ``mxmoe.bench.cases.expert_loads`` with one expert forced to 0 rows and one to 1 (``routed_rows``):
   relative errors against the reference, the Gluon-vs-Triton difference, then medians over rounds that
   alternate the kernels' order of the Triton kernel (``group_gemm``), the Gluon variants of ``gluon_variants``
   and torch's bf16 grouped GEMM on the dequantized weights. ``us``: CUDA-graph replays
   (``triton.testing.do_bench_cudagraph``, no L2 flush): the kernels' own time, as a captured forward runs them.
   ``us_eager``: one eager call per L2 flush (``triton.testing.do_bench``), as a user calls it; where the
   Python wrapper takes longer than the flush, its host time shows up here (the Triton kernel's wrapper at 16
   tokens: ``group_gemm`` plans the launch in Python on every call). ``w%`` is the weight bytes of the experts with rows per second as a % of the copy bandwidth
   (read + write of a 1 GiB ``copy_``, measured in the same run), ``mv%`` the same for all bytes moved
   (weights + x rows + y rows).

Every kernel call runs under a watchdog thread that ends the process (exit code 3) when one call or the whole
run takes too long, e.g. a deadlocked mbarrier (the CUDA context dies with the process). The JSON document
``DIR/gluon_<device>[_<tag>].json`` (provenance, copy bandwidth, the variants' keyword arguments, the edge
cases, one row per shape and token count: ``case_row``) is rewritten after every case, so a run cut short
keeps what it measured; ``complete`` turns true at the end. Exit codes: 0 all edge cases agree, 2 one does
not (or no CUDA GPU), 3 the watchdog fired.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from mxmoe.bench.cases import expert_loads, expert_offsets
from mxmoe.bench.compare import copy_gbps
from mxmoe.bench.peers import rel_err
from mxmoe.bench.roofline import provenance
from mxmoe.env import device_slug
from mxmoe.files import write_json_atomic
from mxmoe.kernels import ExpertGroup, group_gemm, pack, reference_group_gemm
from mxmoe.kernels import gluon_kernel as gk
from mxmoe.paths import kernel_results_dir

PROG = "mxmoe bench gluon"  # also python -m mxmoe.bench.gluon
SHAPES = [  # name, experts, N, K, top_k
    ("qwen1.5 gate_up", 60, 2816, 2048, 4),
    ("qwen1.5 down", 60, 2048, 1408, 4),
    ("dsv2-lite gate_up", 64, 2816, 2048, 6),
    ("dsv2-lite down", 64, 2048, 1408, 6),
]
TOKENS = (16, 512, 8192)
SCHEME = "w4a16_g128_asym"
EDGE_TOL = 1e-2  # relative error of a correct kernel: ~3e-3 (bf16 output)
EDGE_CASES = [  # name, scheme, N, K, rows per expert
    ("mostly idle programs, 0/1-row experts", SCHEME, 256, 256, [0, 1, 0, 3]),
    ("ragged N=200, K=320 (KP=384)", SCHEME, 200, 320, [5, 0, 70]),
    ("one expert, 300 rows (5 token blocks)", SCHEME, 384, 512, [300]),
    ("per channel asym", "w4a16_g-1_asym", 256, 512, [40, 0, 1, 17, 90, 3, 0, 64]),
    ("per channel sym", "w4a16_g-1_sym", 256, 512, [40, 0, 1, 17, 90, 3, 0, 64]),
    ("g256 asym (pairs every 2nd block)", "w4a16_g256_asym", 256, 512, [33, 2, 0, 64]),
]


class Watchdog:
    """Ends the process (exit code 3) when an armed call outlives its deadline or the run outlives ``total`` s."""

    def __init__(self, total: float):
        self.t0, self.total, self.deadline, self.what = time.time(), total, None, ""
        threading.Thread(target=self._run, daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        """Start the deadline of call ``what``."""
        self.deadline, self.what = time.time() + seconds, what

    def disarm(self) -> None:
        """The armed call returned."""
        self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.time()
            if (self.deadline is not None and now > self.deadline) or now - self.t0 > self.total:
                print(
                    f"\nWATCHDOG: '{self.what}' still running after its deadline (run time {now - self.t0:.0f} s): "
                    "a hang (mbarrier deadlock?); exiting",
                    flush=True,
                )
                os._exit(3)


def guarded(dog: Watchdog, what: str, fn, seconds: float = 90.0):
    """fn() and a synchronize under the watchdog: (result, None), or (None, error text) if it raised."""
    dog.arm(seconds, what)
    try:
        out = fn()
        torch.cuda.synchronize()
        return out, None
    except Exception as exc:  # noqa: BLE001 - one failure must not lose the rest of the run
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a dead context: every later call fails and says so
            pass
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        dog.disarm()


def routed_rows(tokens: int, experts: int, top_k: int, seed: int) -> "list[int]":
    """The benchmark's skewed loads, one expert forced to 0 rows and one to 1, in a shuffled expert order."""
    rows = expert_loads(tokens, experts, top_k)  # heaviest first
    spare = rows[-1] + rows[-2] - 1
    rows[-1], rows[-2] = 0, 1
    rows[0] = min(tokens, rows[0] + spare)  # the total stays tokens * top_k (below the cap)
    g = torch.Generator().manual_seed(seed)
    return [rows[i] for i in torch.randperm(experts, generator=g).tolist()]


def gluon_variants(rows_per_expert: float, quick: bool) -> dict:
    """name -> ``gluon_group_gemm`` keyword arguments: the default, wgmma depth 1, the weight operand in shared memory
    (``sh``: two converter warpgroups splitting the rows, ``shu``: taking alternate K blocks), and up to
    64 rows per expert (16 and 512 tokens) depth 2; unless quick, at prefill (17-64 rows) the other BM and no proxy
    fence, past 64 rows (8192 tokens) one CTA per SM."""
    out = {"gluon": {}, "gluon_d1": {"depth": 1}, "gluon_sh": {"operand": "shared"}}
    out["gluon_shu"] = {"operand": "shared", "split": "uses"}
    if rows_per_expert <= 64:
        out["gluon_d2"] = {"depth": 2}
    if quick:
        return out
    if 16 < rows_per_expert <= 64:
        other = 32 if gk.default_bm(rows_per_expert) == 64 else 64
        out[f"gluon_bm{other}"] = {"bm": other}
        out[f"gluon_sh_bm{other}"] = {"operand": "shared", "bm": other}
        out["gluon_nf"] = {"fence": False}
    elif rows_per_expert > 64:
        out["gluon_p1"] = {"programs_per_sm": 1}
    return out


def bw_pct(nbytes: int, us: float, copy_gbps: float) -> float:
    """nbytes per ``us`` microseconds as a % of the copy bandwidth (GB/s)."""
    return 100 * nbytes / (us * 1e-6) / (copy_gbps * 1e9)


def case_row(
    shape: tuple, tokens: int, rows: "list[int]", us: dict, errs: dict, g_vs_t, wbytes: int, moved: int, bw: float
) -> dict:
    """One (shape, tokens) row of the document: shape = (name, experts, N, K, top_k); rows per expert; us: kernel ->
    median µs; errs: kernel -> relative error against the reference or error text; g_vs_t: relative difference
    of the default Gluon kernel from Triton's (None when either failed); weight bytes of the experts with rows
    and all bytes moved; bw: copy bandwidth in GB/s. Adds each kernel's % of it and the fastest Gluon kernel."""
    name, experts, n, k, top_k = shape
    gl_us = {c: v for c, v in us.items() if c.startswith("gluon")}
    best = min(gl_us, key=gl_us.get) if gl_us else None
    return {
        "shape": name,
        "experts": experts,
        "N": n,
        "K": k,
        "top_k": top_k,
        "tokens": tokens,
        "rows": sum(rows),
        "rows_per_expert": list(rows),
        "us": us,
        "rel_err": errs,
        "gluon_vs_triton": g_vs_t,
        "weight_bytes": wbytes,
        "moved_bytes": moved,
        "weight_bw_pct": {c: bw_pct(wbytes, v, bw) for c, v in us.items()},
        "moved_bw_pct": {c: bw_pct(moved, v, bw) for c, v in us.items()},
        "best_gluon": best,
        "triton_over_best_gluon": us["triton"] / gl_us[best] if best and "triton" in us else None,
    }


def print_table(rows: "list[dict]") -> None:
    """The summary: µs per kernel, Triton over the best Gluon kernel, % of copy bandwidth."""
    names = list(dict.fromkeys(c for r in rows for c in r["us"]))  # kernels in order of first appearance
    print(
        f"\n{'shape':18s} {'tok':>5s} "
        + " ".join(f"{c:>10s}" for c in names)
        + f" {'best/trit':>9s} {'w% trit':>7s} {'w% best':>7s} {'mv% best':>8s} {'eager trit/gluon':>17s}  (µs, graph)"
    )
    for r in rows:
        cells = " ".join(f"{r['us'][c]:10.1f}" if c in r["us"] else f"{'-':>10s}" for c in names)
        best, ratio = r["best_gluon"], r["triton_over_best_gluon"]
        w = r["weight_bw_pct"]
        print(
            f"{r['shape']:18s} {r['tokens']:5d} {cells} "
            + (f"{ratio:9.2f}" if ratio else f"{'-':>9s}")
            + (f" {w['triton']:7.1f}" if "triton" in w else f" {'-':>7s}")
            + (f" {w[best]:7.1f} {r['moved_bw_pct'][best]:8.1f}" if best else f" {'-':>7s} {'-':>8s}")
            + f" {_eager(r, 'triton'):>8s}/{_eager(r, 'gluon'):<8s} {best or ''}"
        )


def _eager(row: dict, kernel: str) -> str:
    us = row.get("us_eager", {}).get(kernel)
    return f"{us:.1f}" if us is not None else "-"


def _experts(e: int, n: int, k: int, scheme: str, seed: int) -> list:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [pack(torch.randn(n, k, device="cuda", generator=g), scheme) for _ in range(e)]


def edge_cases(dog: Watchdog, quick: bool) -> "list[dict]":
    """Tiny launches at the protocol's corners: per case the relative error (or error text) of each Gluon variant
    (``bm<BM>/d<depth>`` register operand, ``sh/bm<BM>`` and ``shu/bm<BM>`` shared) and of the Triton kernel
    against the reference; printed as they finish."""
    depths = [(16, 0), (64, 1), (64, 2)] if quick else [(16, 0), (32, 0), (64, 0), (64, 1), (16, 2), (64, 2)]
    variants = {f"bm{bm}/d{d}": {"bm": bm, "depth": d} for bm, d in depths}  # label: gluon_group_gemm keywords
    for label, split in (("sh", "rows"), ("shu", "uses")):  # shared operand, converters splitting rows / K blocks
        variants.update({f"{label}/bm{bm}": {"bm": bm, "operand": "shared", "split": split} for bm in (16, 64)})
    out = []
    for i, (name, scheme, n, k, rows) in enumerate(EDGE_CASES):
        case = {"name": name, "scheme": scheme, "N": n, "K": k, "rows": rows, "gluon": {}}
        packed, err = guarded(dog, f"pack {name}", lambda: _experts(len(rows), n, k, scheme, seed=100 + i))
        if err:
            case["skipped"] = f"pack: {err}"
            out.append(case)
            print(f"  {name:42s} SKIP (pack: {err})", flush=True)
            continue
        group = ExpertGroup(packed)
        x = torch.randn(sum(rows), k, device="cuda", dtype=torch.bfloat16)
        off = expert_offsets(rows)
        ref = reference_group_gemm(x, off, packed)
        for label, kw in variants.items():
            y, err = guarded(dog, f"edge {name} {label}", lambda kw=kw: gk.gluon_group_gemm(x, off, group, **kw))
            case["gluon"][label] = err or rel_err(y, ref)
        yt, err = guarded(dog, f"edge {name} triton", lambda: group_gemm(x, off, group, validate=False))
        case["triton"] = err or rel_err(yt, ref)
        out.append(case)
        print(
            f"  {name:42s} "
            + " ".join(f"{v}:{e:.1e}" if not isinstance(e, str) else f"{v}:FAIL({e})" for v, e in case["gluon"].items())
            + (
                f" | triton {case['triton']:.1e}"
                if not isinstance(case["triton"], str)
                else f" | triton {case['triton']}"
            ),
            flush=True,
        )
    return out


def edges_ok(cases: "list[dict]") -> bool:
    """Every Gluon variant of every edge case that packed ran and agreed with the reference within EDGE_TOL."""
    return all(not isinstance(e, str) and e < EDGE_TOL for c in cases for e in c["gluon"].values())


def time_case(dog: Watchdog, shape: tuple, tokens: int, packed: list, group, w16, seed: int, quick: bool, bw: float):
    """The row (``case_row``) of one shape at one token count, and the Gluon variants it timed."""
    name, e, n, k, top_k = shape
    rows = routed_rows(tokens, e, top_k, seed=seed)
    t = sum(rows)
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    off = expert_offsets(rows)
    ref = reference_group_gemm(x, off, packed)
    variants = gluon_variants(t / e, quick)
    fns = {"triton": lambda: group_gemm(x, off, group, validate=False)}
    for vname, kw in variants.items():
        fns[vname] = lambda kw=kw: gk.gluon_group_gemm(x, off, group, validate=False, **kw)
    mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if mm is not None:
        ends = off[1:].contiguous()
        fns["torch_bf16"] = lambda: mm(x, w16.transpose(1, 2), offs=ends)
    errs = {}
    for kname, fn in fns.items():  # first call: compile + correctness
        y, err = guarded(dog, f"{name} {tokens} {kname}", fn, seconds=120)
        errs[kname] = err or rel_err(y, ref)
    g_vs_t = None
    if not isinstance(errs["triton"], str) and not isinstance(errs["gluon"], str):
        yt, _ = guarded(dog, "triton again", fns["triton"])
        yg, _ = guarded(dog, "gluon again", fns["gluon"])
        g_vs_t = rel_err(yg, yt) if yt is not None and yg is not None else None
    rounds, rep = (2, 40) if quick else (3, 60)
    timers = {
        "graph": lambda fn: do_bench_cudagraph(fn, rep=rep, return_mode="median"),
        "eager": lambda fn: do_bench(fn, warmup=5, rep=rep, return_mode="median"),
    }
    times = {(kind, kname): [] for kind in timers for kname in fns}
    for r in range(rounds):  # alternate the kernels' order round by round
        for kname in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            if isinstance(errs[kname], str):
                continue
            for kind, timer in timers.items():
                ms, err = guarded(dog, f"{name} {tokens} {kind} {kname}", lambda fn=fns[kname]: timer(fn))
                if err is None:
                    times[kind, kname].append(ms)
    us, us_eager = (
        {kname: 1e3 * statistics.median(times[kind, kname]) for kname in fns if times[kind, kname]} for kind in timers
    )
    wbytes = sum(pw.nbytes for pw, r in zip(packed, rows) if r)
    moved = wbytes + 2 * t * k + 2 * t * n
    row = case_row(shape, tokens, rows, us, errs, g_vs_t, wbytes, moved, bw)
    row["us_eager"] = us_eager
    errs_txt = "  ".join(f"{c}={v:.1e}" if not isinstance(v, str) else f"{c}=FAIL({v})" for c, v in errs.items())
    gvt = f"{g_vs_t:.1e}" if g_vs_t is not None else "-"
    print(f"{name:18s} {tokens:5d} tok, {t:5d} rows: rel.err vs ref: {errs_txt}; gluon vs triton {gvt}", flush=True)
    return row, variants


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (module docstring)."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes at 16 and 512 tokens, fewer variants")
    ap.add_argument("--budget", type=float, default=225.0, help="seconds after which the remaining cases are skipped")
    ap.add_argument("--out", default=None, help="output folder (default: results/kernels)")
    ap.add_argument("--tag", default="", help="suffix of the output file name: gluon_<gpu>[_<tag>].json")
    ap.add_argument(
        "--launch",
        metavar="SHAPE:TOKENS",
        default=None,
        help="only launch the Triton and the default Gluon kernels three times each on one case, timing and "
        "writing nothing (for a profiler: ncu -k regex:group_gemm_kernel), e.g. 'qwen1.5 gate_up:512'",
    )
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget:g}")
    if args.launch is not None:
        name, _, tokens = args.launch.rpartition(":")
        if name not in [sh[0] for sh in SHAPES] or not tokens.isdigit() or int(tokens) < 1:
            ap.error(f"--launch must be SHAPE:TOKENS with SHAPE one of {[sh[0] for sh in SHAPES]}, got {args.launch!r}")
        args.launch = (next(sh for sh in SHAPES if sh[0] == name), int(tokens))
    return args


def launch_case(shape: tuple, tokens: int) -> None:
    """Launch the Triton kernel and the default register- and shared-operand Gluon kernels three times each,
    alternating, on one case (the timed cases' experts and routing): what a profiler attached to this process sees."""
    name, e, n, k, top_k = shape
    si = SHAPES.index(shape)
    packed = _experts(e, n, k, SCHEME, seed=si)
    group = ExpertGroup(packed)
    rows = routed_rows(tokens, e, top_k, seed=tokens + si)
    x = torch.randn(sum(rows), k, device="cuda", dtype=torch.bfloat16)
    off = expert_offsets(rows)
    for _ in range(3):
        group_gemm(x, off, group, validate=False)
        gk.gluon_group_gemm(x, off, group, validate=False)
        gk.gluon_group_gemm(x, off, group, validate=False, operand="shared")
    torch.cuda.synchronize()
    print(f"{name}, {tokens} tokens ({sum(rows)} rows): launched each kernel 3 times", flush=True)


def main(argv=None) -> int:
    """Run the benchmark (module docstring); returns the exit code."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{PROG}: error: needs a CUDA GPU (Hopper, sm_90a); none is visible", file=sys.stderr)
        return 2
    if gk.GLUON_ERROR is not None:
        print(
            f"{PROG}: error: this Triton ({triton.__version__}) has no usable Gluon: {gk.GLUON_ERROR}", file=sys.stderr
        )
        return 2
    if args.launch is not None:
        launch_case(*args.launch)
        return 0
    dog = Watchdog(total=args.budget + 60)
    doc = {
        "provenance": provenance(),
        "argv": {"quick": args.quick, "budget": args.budget, "tag": args.tag},
        "gluon_defaults": {
            "producer_warps": gk.PRODUCER_WARPS,
            "producer_regs": gk.PRODUCER_REGS,
            "maxnreg": gk.MAXNREG,
        },
        "timer": "us: triton.testing.do_bench_cudagraph median (graph replays, no L2 flush); us_eager: triton.testing.do_bench median (one call per L2 flush); medians over rounds alternating the kernels",
        "complete": False,
    }
    prov = doc["provenance"]
    out = Path(args.out) if args.out else kernel_results_dir()
    path = out / f"gluon_{device_slug(prov['device'])}{'_' + args.tag if args.tag else ''}.json"
    print(
        f"{prov['device']}, {prov['multiprocessors']} SMs; torch {prov['torch']}, triton {prov['triton']}", flush=True
    )
    doc["copy_GBps"] = bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)\n\nedge cases (rel. error vs reference):", flush=True)
    doc["edge_cases"] = edge_cases(dog, args.quick)
    doc["edge_cases_ok"] = ok = edges_ok(doc["edge_cases"])
    doc.update(variants={}, rows=[], skipped=[])
    write_json_atomic(path, doc)
    print(f"edge cases {'OK' if ok else 'FAILED'} ({time.time() - dog.t0:.0f} s)\n", flush=True)

    shapes = [SHAPES[0], SHAPES[3]] if args.quick else SHAPES
    tokens = (16, 512) if args.quick else TOKENS
    for si, shape in enumerate(shapes):
        if time.time() - dog.t0 > args.budget:
            doc["skipped"] += [f"{shape[0]} at {t} tokens" for t in tokens]
            continue
        packed, err = guarded(dog, f"pack {shape[0]}", lambda: _experts(*shape[1:4], SCHEME, seed=si), seconds=120)
        if err:
            doc["skipped"].append(f"{shape[0]}: pack failed: {err}")
            print(f"{shape[0]}: pack failed: {err}", flush=True)
            continue
        group = ExpertGroup(packed)
        w16 = torch.stack([pw.dequantize().to(torch.bfloat16) for pw in packed])  # [E, N, K] for the torch peer
        for tok in tokens:
            if time.time() - dog.t0 > args.budget:
                doc["skipped"].append(f"{shape[0]} at {tok} tokens")
                print(f"budget spent: skipping {shape[0]} at {tok} tokens", flush=True)
                continue
            row, variants = time_case(dog, shape, tok, packed, group, w16, tok + si, args.quick, bw)
            doc["rows"].append(row)
            doc["variants"].update(variants)
            write_json_atomic(path, doc)
        packed = group = w16 = None
        torch.cuda.empty_cache()

    print_table(doc["rows"])
    doc["wall_s"] = time.time() - dog.t0
    doc["complete"] = True
    write_json_atomic(path, doc)
    print(f"\ndone in {doc['wall_s']:.0f} s; edge cases {'OK' if ok else 'FAILED'}; wrote {path}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
