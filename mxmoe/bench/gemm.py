"""GroupGEMM benchmark on real MoE shapes (random weights): ``python -m mxmoe.bench.gemm --out DIR``.

For every model shape (gate_up fused: N = 2I, K = H; down: N = H, K = I) and token count, routed
rows are split over experts by geometric routing probabilities with max/min ratio ``LOAD_RATIO``
(assumed, not measured: replace with stage 02's routing profiles when they exist). In one process
on one GPU it times, with ``mxmoe.bench.timing.events_ms`` (do_bench's CUDA events after an L2 flush, the host
given a head start so that only GPU time is timed) medians taken in ``--rounds`` alternating rounds of a
case's variants (median of the rounds: a stall of the machine during one variant's window moves one round):

* peers (``mxmoe.bench.peers``): torch bf16 grouped GEMM (``grouped_mm``), a per-expert bf16 ``torch.mm``
  loop, and torch fp8 ``_scaled_grouped_mm`` on rowwise e4m3, timed on pre-quantized activations (``ms``)
  and quantizing them inside the call (``ms_with_act_quant``); vLLM's fused MoE is a whole-layer kernel
  and is timed by ``mxmoe bench compare`` (its ``moe`` rows);
* ours: uniform schemes (w4a8 on fp8 tensor cores among them) and two mixes, each checked against
  ``reference_group_gemm`` first; the GEMM launch alone (activations quantized beforehand, as the token
  gather hands them over) and standalone with its activation-quantization launch.

Every row: time, speedup over torch bf16 and over torch fp8 (``peers.add_ratios``), the bytes it must move
as a fraction of the measured copy bandwidth (``moved_bw_frac``) and its relative error against the bf16 loop.

It measures the roofline (copy bandwidth, bf16/int8/fp8 matmul peaks) in the same run, counts
kernel launches per grouped GEMM with the profiler, prints a short table and writes
``DIR/bench_<gpu>[_<tag>].json``; with ``--table-dir cost_tables`` also the run's cost table
``cost_tables/<gpu>.json`` that the performance model reads.

Shapes: the six paper models and the embedded smollm2-moe (routed experts and, as a one-expert GEMM,
its shared expert). ``--timer cudagraph`` times CUDA-graph replays instead of single launches: use it
for GEMMs of a few microseconds, as a captured decode step runs them (warm L2, no gaps between launches).
Every timed row also records ``host_<key>``: the host's wall time for one call, its Python and launches.
Before any timing, ``--compile-workers`` processes compile every case's kernels (``precompile``): all six
paper shapes at 16/512/8192 tokens (``--rounds 3 --rep-ms 20``, Table 6 on four models) took 298 s on a fresh
H100, 109 s of it compiling, where one process compiling as it went had done 28 of the 36 cases in 545 s
(results/kernels/NOTES.md). A run stopped by ``--deadline-seconds`` is continued by the same command: the output file of an earlier run of the same
kernel, GPU and timer keeps its cases and only the missing ones are timed (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from mxmoe.bench import peers
from mxmoe.bench.cases import (
    LOAD_RATIO,
    MIXES,
    MODELS,
    PAPER,
    TABLE6_MIXES,
    TOKENS,
    UNIFORM,
    expert_loads,
    expert_offsets,
    gemms,
)
from mxmoe.bench.cost_table import write_table
from mxmoe.bench.roofline import measure_roofline, provenance
from mxmoe.bench.runs import wrong_output
from mxmoe.bench.timing import HEAD_START_US, events_ms, host_ms
from mxmoe.bench.tune import LARGE, SMALL, best_configs, rows_class, sweep
from mxmoe.bench.validate import validate
from mxmoe.env import device_slug
from mxmoe.files import write_text_atomic
from mxmoe.kernels import ExpertGroup, group_gemm, pack, quantize_activations, reference_group_gemm
from mxmoe.kernels.configs import default_config
from mxmoe.kernels.group_gemm import launch_plan
from mxmoe.perfmodel import read_table
from mxmoe.schemes import Scheme

DEV = "cuda"
# ablations: (scheme, tile-config fields changed from the default)
ABLATIONS = {"w4a16_g-1_noswap": ("w4a16_g-1_asym", {"swap_ab": False})}
W4A8_FP8 = ("w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8")  # integer codes on fp8 tensor cores (scheme set "fp8")
TABLE6_MODES = ("per_scheme", "unified")  # each mix also runs as one launch per scheme and as the unified kernel


TIMER = {"warmup": 25, "rep": 100, "kind": "events", "rounds": 3}  # ms; --warmup-ms / --rep-ms / --timer / --rounds


PROG = "mxmoe bench gemm"  # also python -m mxmoe.bench.gemm


def _ms(fn) -> float:
    """Median GPU ms per call: CUDA events around each call after an L2 flush, the host given a head start
    ("events", ``timing.events_ms``), or replays of a CUDA graph of many calls ("cudagraph": no L2 flush)."""
    if TIMER["kind"] == "cudagraph":
        return float(do_bench_cudagraph(fn, rep=TIMER["rep"], return_mode="median"))
    return events_ms(fn, TIMER["warmup"], TIMER["rep"])


def time_rounds(jobs: "list[tuple[dict, str, object]]") -> None:
    """Time every (row, key, fn) of a case in ``TIMER["rounds"]`` rounds, the order reversed every other round,
    and set ``row[key]`` to the median of its rounds (``row[key + "_rounds"]``: each round's ``_ms``) and
    ``row["host_" + key]`` to the host's part of one call. A stall of the machine during one timing window then
    moves one round, not the result. A timing that fails sets ``row["error"]`` and drops the row's times."""
    times: "list[list[float]]" = [[] for _ in jobs]
    for r in range(TIMER["rounds"]):
        for j in range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs))):
            row, _, fn = jobs[j]
            if "error" in row:  # a row is timed only after its checks passed: this is a failed timing
                continue
            try:
                times[j].append(_ms(fn))
            except (RuntimeError, TypeError, ValueError) as err:
                row["error"] = str(err).splitlines()[0][:300]
    for (row, key, fn), ts in zip(jobs, times):
        if "error" not in row:
            row[key] = float(statistics.median(ts))
            row[key + "_rounds"] = ts
            row["host_" + key] = host_ms(fn)


def count_launches(fn) -> int:
    """Kernels (and memsets/copies) the device runs for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


EDGE_TOL = 1e-2  # relative error against reference_group_gemm above which a run times nothing


def failed_edges(edge: dict) -> dict:
    """The cases of an ``edge_check`` result whose relative error exceeds ``EDGE_TOL`` (NaN counts as failed)."""
    return {case: err for case, err in edge.items() if not err <= EDGE_TOL}


def earlier_run(path: Path, doc: dict) -> "dict | None":
    """The benchmark document at ``path`` if this run can continue it (same GPU, kernel fingerprint, timer and
    timing settings: its cases are kept and only the missing ones timed), else None."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    same_gpu_kernel = all(old["provenance"].get(k) == doc["provenance"].get(k) for k in ("device", "kernel"))
    same_timing = all(old["argv"].get(k) == doc["argv"].get(k) for k in ("timer", "warmup_ms", "rep_ms", "rounds"))
    return old if same_gpu_kernel and same_timing and "results" in old else None


def edge_check() -> dict:
    """Mixed launches on an awkward shape (K=576, N=80, experts with 0 and 1 rows), and single schemes, on GPU."""
    schemes = ["w4a16_g128_asym", "w8a8_g-1_sym", "bf16", "w4a4_g128_sym", "w8a8_g-1_sym_fp8", "w3a16_g128_asym"]
    fp8_mix = ["w4a8_g128_sym_fp8", "w8a8_g-1_sym_fp8", "w4a8_g-1_sym_fp8", "bf16", "w4a4_g128_sym", "w4a16_g128_asym"]
    rows = [0, 1, 40, 5, 33, 2]
    offs = expert_offsets(rows, DEV)
    x = torch.randn(sum(rows), 576, device=DEV, dtype=torch.bfloat16)
    out = {}
    for key, mix in (("rel_err", schemes), ("rel_err_w4a8_fp8_mix", fp8_mix)):
        pws = [pack(torch.randn(80, 576, device=DEV), s) for s in mix]
        out[key] = peers.rel_err(group_gemm(x, offs, pws), reference_group_gemm(x, offs, pws))
    for s in ["w2a16_g128_asym", "w8a16_g-1_sym", "w4a8_g-1_sym", "w4a4_g-1_sym", "w4a16_g-1_asym", *W4A8_FP8]:
        pw = [pack(torch.randn(80, 576, device=DEV), s) for _ in rows]
        out[s] = peers.rel_err(group_gemm(x, offs, pw), reference_group_gemm(x, offs, pw))
    return out


def _baselines(x, offs_host, ends, w, y_loop) -> dict:
    """Torch peers for one case: {name: (gemm alone, with activation quantization or None)}."""
    lo_hi = [(a, b) for a, b in zip(offs_host, offs_host[1:])]

    def loop():
        for e, (a, b) in enumerate(lo_hi):
            if b > a:
                torch.mm(x[a:b], w[e].t(), out=y_loop[a:b])
        return y_loop

    out = peers.gemm_peers(x, w, ends)
    return {peers.BF16_PEER: out.pop(peers.BF16_PEER), "torch_loop_bf16": (loop, None), **out}


def run_case(
    model: str,
    gemm: str,
    n: int,
    k: int,
    tokens: int,
    top_k: int,
    w,
    packs,
    ceil,
    count: bool,
    table6: bool = True,
    ablation: bool = True,
) -> list[dict]:
    """All variants of one (shape, tokens) case; returns result rows. ``table6``: also time each of the paper's
    mixes (``TABLE6_MIXES``) as one launch per scheme and as the unified kernel; ``ablation``: also the
    ABLATIONS variants."""
    t_case = time.time()
    e = w.shape[0]
    rows = expert_loads(tokens, e, top_k)
    offs_host = [0] + torch.tensor(rows).cumsum(0).tolist()
    offs = torch.tensor(offs_host, dtype=torch.int32, device=DEV)
    ends = offs[1:].contiguous()
    t = offs_host[-1]
    x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
    flops = 2.0 * t * n * k
    act_bytes = t * k * 2 + t * n * 2
    order = sorted(range(e), key=lambda i: -rows[i])
    assign = {name: [Scheme.parse(s)] * e for name, s in UNIFORM.items()}
    for name, (hot, cold, frac) in MIXES.items():
        hot_set = set(order[: max(1, round(frac * e))])
        assign[name] = [Scheme.parse(hot if i in hot_set else cold) for i in range(e)]
    out = []
    base = {
        "model": model,
        "gemm": gemm,
        "tokens": tokens,
        "rows": t,
        "experts": e,
        "N": n,
        "K": k,
        "max_rows": max(rows),
        "min_rows": min(rows),
        "active_experts": sum(r > 0 for r in rows),
    }
    y_loop = torch.empty(t, n, device=DEV, dtype=torch.bfloat16)
    bl = _baselines(x, offs_host, ends, w, y_loop)
    ref_bf16 = bl["torch_loop_bf16"][0]().clone()
    jobs = []  # (row, key, fn): every timing of the case, taken together in alternating rounds (time_rounds)
    for name, (fn, fn_q) in bl.items():
        row = dict(base, variant=name, bits=16.0 if "bf16" in name else 8.0)
        try:
            row["rel_err_vs_bf16_loop"] = peers.rel_err(fn(), ref_bf16)
            row["launches"] = count_launches(fn) if count else None
            row["moved_bytes"] = peers.peer_bytes(name, rows, n, k)
            jobs.append((row, "ms", fn))
            if fn_q is not None:
                jobs.append((row, "ms_with_act_quant", fn_q))
        except (RuntimeError, TypeError, ValueError) as err:
            row["error"] = str(err).splitlines()[0][:300]
        out.append(row)
    active = [i for i in range(e) if rows[i] > 0]
    for name, (s, change) in ABLATIONS.items() if ablation else ():
        assign[name] = [Scheme.parse(s)] * e
    for name in TABLE6_MIXES if table6 else ():
        for mode in TABLE6_MODES:
            assign[f"{name}@{mode}"] = assign[name]
    floor_s = {}  # variant: its roofline time (s), the slower of moving its bytes and its MMA work
    for name, schemes in assign.items():
        mode = name.split("@")[1] if "@" in name else "fused"
        configs = None
        if name in ABLATIONS:
            sc, change = Scheme.parse(ABLATIONS[name][0]), ABLATIONS[name][1]
            configs = {sc: dataclasses.replace(default_config(sc, t / e), **change)}
        pws = [packs[(i, s)] for i, s in enumerate(schemes)]
        group = ExpertGroup(pws)
        wbytes = sum(pws[i].nbytes for i in active)
        bits = sum(pw.nbytes for pw in pws) * 8 / (e * n * k)
        peak = sum(2.0 * rows[i] * n * k / _peak(schemes[i], ceil) for i in active)  # seconds * 1e-12
        row = dict(base, variant="ours_" + name, bits=round(bits, 3), weight_bytes=wbytes)
        try:
            y = group_gemm(x, offs, group, configs=configs, mode=mode)  # quantizes activations itself when it must
            row["rel_err_vs_reference"] = peers.rel_err(y, reference_group_gemm(x, offs, pws))
            row["rel_err_vs_bf16_loop"] = peers.rel_err(y, ref_bf16)
            x_q = quantize_activations(x, offs, group)  # as the token gather hands them over
            # bound now (partial): the timings run after this loop
            fn = functools.partial(group_gemm, x, offs, group, x_q=x_q, configs=configs, validate=False, mode=mode)
            jobs.append((row, "ms", fn))
            row["launches"] = count_launches(fn) if count else None
            row["mode"] = mode
            if mode == "fused":
                row["tiles"] = {str(s): c.as_dict() for s, c in launch_plan(group, t, configs)}
            if mode == "fused" and any(not s.weight_only for s in schemes):  # standalone: quantize + GEMM, two launches
                full = functools.partial(group_gemm, x, offs, group, validate=False, mode=mode)
                jobs.append((row, "ms_with_act_quant", full))
                jobs.append((row, "ms_act_quant", functools.partial(quantize_activations, x, offs, group)))
                row["launches_with_act_quant"] = count_launches(full) if count else None
            row["moved_bytes"] = peers.ours_bytes(pws, rows, n, k)
            floor_s[row["variant"]] = max((wbytes + act_bytes) / (ceil["copy_GBps"] * 1e9), peak / 1e12)
        except (RuntimeError, ValueError) as err:
            row["error"] = str(err).splitlines()[0][:300]
        out.append(row)
    time_rounds(jobs)
    t_torch = next((r.get("ms") for r in out if r["variant"] == peers.BF16_PEER), None)
    for row in out:
        if "ms" not in row:
            continue
        sec = row["ms"] / 1e3
        row["TFLOPs"] = flops / sec / 1e12
        row["moved_bw_frac"] = peers.moved_fraction(row["moved_bytes"], row["ms"], ceil["copy_GBps"])
        if row["variant"] in floor_s:
            row["weight_GBps"] = row["weight_bytes"] / sec / 1e9
            row["weight_bw_frac"] = row["weight_GBps"] / ceil["copy_GBps"]
            row["roofline_frac"] = floor_s[row["variant"]] / sec
            if t_torch and "ms_with_act_quant" in row:
                row["speedup_with_act_quant"] = t_torch / row["ms_with_act_quant"]
    peers.add_ratios(out, "variant", "ms")
    out[0]["case_wall_s"] = round(time.time() - t_case, 2)  # all variants of the case, compiles included
    return out


def _peak(s: Scheme, ceil: dict) -> float:
    """Matmul rate (TFLOP/s) of the unit a scheme's dot runs on."""
    if s.weight_only:
        return ceil["bf16_TFLOPs"]
    return (ceil.get("fp8_TFLOPs") if s.fmt == "fp8" else ceil.get("int8_TOPs")) or ceil["bf16_TFLOPs"]


def _packs_for(w: torch.Tensor) -> dict:
    """Every expert packed in every scheme the variants use: {(expert, Scheme): PackedWeight}."""
    names = set(UNIFORM.values()) | {s for hot, cold, _ in MIXES.values() for s in (hot, cold)}
    return {(i, Scheme.parse(s)): pack(w[i], s) for i in range(w.shape[0]) for s in names}


def targets(results: list[dict]) -> dict:
    """The kernel targets, evaluated on this run (paper model shapes only; a row whose output is wrong,
    ``runs.wrong_output``, counts for none and is listed under ``wrong_output``)."""
    results = [r for r in results if r["model"] in PAPER]
    wrong = [r for r in results if wrong_output(r)]
    results = [r for r in results if not wrong_output(r)]

    def get(model, tokens, variant, key="speedup_vs_torch_bf16", gemm=None):
        return [
            r.get(key)
            for r in results
            if r["tokens"] == tokens
            and r["variant"] == variant
            and (model is None or r["model"] == model)
            and (gemm is None or r["gemm"] == gemm)
            and r.get(key)
        ]

    bf16 = [
        r["speedup_vs_torch_bf16"] for r in results if r["variant"] == "ours_bf16" and r.get("speedup_vs_torch_bf16")
    ]
    out = {
        "wrong_output": [
            f"{r['variant']} {r['model']} {r['gemm']} T={r['tokens']}: {r['rel_err_vs_reference']:.3f}" for r in wrong
        ],
        "bf16_vs_torch_grouped_min": min(bf16, default=None),
        "bf16_vs_torch_grouped_median": sorted(bf16)[len(bf16) // 2] if bf16 else None,
    }
    for m in ("qwen1.5-moe", "deepseek-v2-lite"):
        out[f"{m}_512_w4a16_g-1_weight_bw_frac"] = get(m, 512, "ours_w4a16_g-1", "weight_bw_frac")
        out[f"{m}_512_w4a16_g128_weight_bw_frac"] = get(m, 512, "ours_w4a16_g128", "weight_bw_frac")
        out[f"{m}_512_mix4.25_speedup"] = get(m, 512, "ours_mix4.25_w4a16+w8a8")
        out[f"{m}_512_mix4.25_fp8_vs_torch_fp8"] = get(m, 512, "ours_mix4.25_w4a8+w8a8_fp8", "speedup_vs_torch_fp8")
    for v in ("ours_w8a8_int8", "ours_w8a8_fp8", "ours_mix5_w4a4+w8a8"):
        out[f"8192_{v}_speedup_min"] = min(get(None, 8192, v), default=None)
        out[f"8192_{v}_speedup_with_act_quant_min"] = min(get(None, 8192, v, "speedup_with_act_quant"), default=None)
    for v in ("ours_w8a8_fp8", "ours_w4a8_fp8_g-1", "ours_w4a8_fp8_g128"):  # target: >= 0.95x torch fp8 at 8192
        for tokens in (512, 8192):
            out[f"{tokens}_{v}_vs_torch_fp8_min"] = min(get(None, tokens, v, "speedup_vs_torch_fp8"), default=None)
            out[f"{tokens}_{v}_vs_torch_fp8_with_act_quant_min"] = min(
                get(None, tokens, v, "speedup_vs_torch_fp8_with_act_quant"), default=None
            )
    mix5 = {
        (r["model"], r["gemm"]): r.get("ms")
        for r in results
        if r["tokens"] == 8192 and r["variant"] == "ours_mix5_w4a4+w8a8"
    }
    w8 = {
        (r["model"], r["gemm"]): r.get("ms")
        for r in results
        if r["tokens"] == 8192 and r["variant"] == "ours_w8a8_int8"
    }
    out["8192_mix5_faster_than_w8a8_int8_cases"] = sum(
        1 for key in mix5 if mix5[key] and w8.get(key) and mix5[key] < w8[key]
    )
    out["8192_cases"] = len(mix5)
    out["launches_ours_mixed"] = sorted(
        {r["launches"] for r in results if r["variant"].startswith("ours_mix") and r.get("launches")}
    )
    return out


NOMINAL_ROOFLINE = {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0}  # what run_case needs of a roofline when it only compiles


def compile_gemm(
    model: str, gemm: str, n: int, k: int, tokens: "list[int]", table6: bool, ablation: bool
) -> "str | None":
    """Run one GEMM's cases once with a minimal timer, so that Triton compiles every kernel specialisation the
    timed run launches into its on-disk cache (a worker of ``precompile``). Returns an error line, or None."""
    TIMER.update(warmup=1.0, rep=1.0, kind="events", rounds=1)
    try:
        e, _, _, top_k = MODELS[model]
        w = torch.randn(e, n, k, device=DEV, dtype=torch.bfloat16) * 0.02  # [E, N, K]
        packs = _packs_for(w)
        for t in tokens:
            run_case(
                model, gemm, n, k, t, top_k, w, packs, NOMINAL_ROOFLINE, count=False, table6=table6, ablation=ablation
            )
    except Exception as err:  # noqa: BLE001 - the timed run compiles what a worker could not, and reports it
        return f"{model} {gemm}: {type(err).__name__}: {str(err)[:200]}"
    finally:  # a worker's next GEMM is admitted by its own size: hand back what this one reserved
        w = packs = None
        torch.cuda.empty_cache()
    return None


def compile_bytes(model: str, gemm: str, n: int, k: int, tokens: "list[int]", *_) -> int:
    """Rough peak GPU memory of ``compile_gemm`` on one GEMM: its bf16 weights about eight times over (packed in
    every scheme, float and fp8 copies for the torch peers) and a few [rows, N + K] bf16 activations."""
    e, _, _, top_k = MODELS[model]
    return 8 * e * n * k * 2 + 4 * max(tokens) * top_k * (n + k) * 2


def precompile(groups: "list[tuple]", workers: int, meanwhile, budget_bytes: "float | None" = None):
    """Compile the given GEMMs' kernels (``compile_gemm`` arguments each) in up to ``workers`` processes while this
    one runs ``meanwhile()``; returns its result once the workers are done.

    On a fresh machine Triton's compiling, not timing, is most of a run (tens of specialisations per model
    shape, one after another in one process); the workers fill the on-disk cache side by side, the largest GEMMs
    first and no more at once than ``budget_bytes`` of their ``compile_bytes`` (default: 80% of the GPU memory
    free now). Their launches share the GPU, so nothing is timed until they finish. What a worker could not
    compile is printed and compiled by the timed run."""
    if budget_bytes is None:
        budget_bytes = 0.8 * torch.cuda.mem_get_info()[0]
    pending = sorted(groups, key=lambda g: -compile_bytes(*g))
    running: dict = {}  # future: its compile_bytes
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:

        def admit() -> None:  # the largest pending GEMMs that fit beside the running ones, or one alone
            for g in list(pending):
                size = compile_bytes(*g)
                if len(running) < workers and (not running or sum(running.values()) + size <= budget_bytes):
                    running[pool.submit(compile_gemm, *g)] = size
                    pending.remove(g)

        admit()
        result = meanwhile()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                del running[fut]
                try:
                    err = fut.result()
                except Exception as crash:  # noqa: BLE001 - a worker that died (out of memory, say) costs only its cache
                    err = f"worker: {type(crash).__name__}: {str(crash)[:200]}"
                if err:
                    print(f"precompile: {err}", flush=True)
            admit()
    return result


def main(argv: "list[str] | None" = None) -> None:
    """Run the benchmark; see the module docstring."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    ap.add_argument("--tune-seconds", type=float, default=0.0, help="time budget of the tile-config sweep")
    ap.add_argument(
        "--deadline-seconds",
        type=float,
        default=480.0,
        help="skip the remaining cases after this many seconds (the device allows 10 minutes a command)",
    )
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="warmup per timing")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="repetition time per timing")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="time each case's variants in this many rounds, alternating their order, and keep each median",
    )
    ap.add_argument(
        "--timer",
        choices=("events", "cudagraph"),
        default="events",
        help="events: one call per L2 flush, GPU time only (mxmoe.bench.timing.events_ms); "
        "cudagraph: do_bench_cudagraph (graph replays, as a captured decode step runs)",
    )
    ap.add_argument(
        "--table6-models",
        nargs="*",
        default=None,
        help="models whose mixes also run per scheme and unified (Table 6); default: all",
    )
    ap.add_argument("--ablation-models", nargs="*", default=None, help="models that run ABLATIONS; default: all")
    ap.add_argument("--tag", default="", help="suffix of the output file name: bench_<gpu>[_<tag>].json")
    ap.add_argument(
        "--table-dir",
        default=None,
        help="also write this run's cost table to DIR/<gpu>.json (e.g. kernels; the committed "
        "tables merge several runs: python -m mxmoe.bench.cost_table)",
    )
    ap.add_argument(
        "--compile-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that compile the cases' kernels before any timing (0: compile while timing)",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="time every case again instead of continuing the output file of an earlier run of this kernel, GPU and timer",
    )
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(MODELS)}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.compile_workers < 0:
        ap.error(f"--compile-workers must be 0 or more, got {args.compile_workers}")
    TIMER.update(warmup=args.warmup_ms, rep=args.rep_ms, kind=args.timer, rounds=args.rounds)
    torch.manual_seed(0)
    t0 = time.time()
    doc = {
        "provenance": provenance(),
        "load_ratio_assumed": LOAD_RATIO,
        "timer": (
            f"mxmoe.bench.timing.events_ms median (CUDA events after an L2 flush and a {HEAD_START_US:g} us GPU "
            f"spin that hides the host's part), warmup {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms"
            if args.timer == "events"
            else f"triton.testing.do_bench_cudagraph median of 10 graph replays, rep {args.rep_ms:g} ms, no L2 flush"
        )
        + f"; median of {args.rounds} rounds of a case's variants, alternating their order",
        "timer_kind": args.timer,
        "argv": {k: v for k, v in vars(args).items() if k not in ("out", "table_dir")},
    }  # no machine paths
    tag = f"_{args.tag}" if args.tag else ""
    out_path = Path(args.out) / f"bench_{device_slug(doc['provenance']['device'])}{tag}.json"
    earlier = None if args.fresh else earlier_run(out_path, doc)
    done = {(r["model"], r["gemm"], r["tokens"]) for r in earlier["results"]} if earlier else set()
    table6 = {m: args.table6_models is None or m in args.table6_models for m in args.models}
    ablation = {m: args.ablation_models is None or m in args.ablation_models for m in args.models}
    groups = [
        (m, g, n, k, todo, table6[m], ablation[m])
        for m in args.models
        for g, n, k in gemms(m)
        if (todo := [t for t in args.tokens if (m, g, t) not in done])
    ]
    if args.compile_workers and groups:
        doc["edge_check"] = precompile(groups, args.compile_workers, edge_check)
        print(f"compiled {len(groups)} GEMMs' kernels in {args.compile_workers} processes: {time.time() - t0:.0f} s")
    else:
        doc["edge_check"] = edge_check()
    doc["roofline"] = earlier["roofline"] if earlier else measure_roofline()  # on a quiet GPU
    print(json.dumps(doc, indent=1), flush=True)
    bad = failed_edges(doc["edge_check"])
    if bad:  # timings of a wrong kernel would land in the cost table
        raise SystemExit(
            f"{PROG}: error: the kernel disagrees with reference_group_gemm (relative error > {EDGE_TOL:g}) on "
            f"{', '.join(f'{c} ({e:.2g})' for c, e in bad.items())}; nothing was timed. Run the kernel tests "
            "(TRITON_INTERPRET=1 pytest tests/test_kernels.py) and the failing schemes against the reference on this GPU."
        )
    doc["ms_note"] = (
        "ours: GEMM launch alone, rows of weight-activation experts quantized beforehand as the token "
        "gather hands them over; ms_with_act_quant: group_gemm quantizing them itself (two launches)"
    )
    results = earlier["results"] if earlier else []
    if earlier:
        doc["continues"] = earlier.get("continues", []) + [earlier["argv"]]  # the runs whose cases are kept
        print(f"continuing {out_path.name}: {len(done)} cases kept (--fresh times them again)", flush=True)
    prior_s = earlier["wall_s"] if earlier else 0.0
    doc["skipped"] = []
    for mi, model in enumerate(args.models):
        e, _, _, top_k = MODELS[model]
        for gemm, n, k in gemms(model):
            todo = [t for t in args.tokens if (model, gemm, t) not in done]
            if not todo:
                continue
            if time.time() - t0 > args.deadline_seconds:
                doc["skipped"] += [f"{model} {gemm} T={tokens}: deadline" for tokens in todo]
                print(f"deadline: skipped {model} {gemm}", flush=True)
                continue
            w = torch.randn(e, n, k, device=DEV, dtype=torch.bfloat16) * 0.02  # [E, N, K]
            packs = _packs_for(w)
            for tokens in todo:
                if time.time() - t0 > args.deadline_seconds:
                    doc["skipped"].append(f"{model} {gemm} T={tokens}: deadline")
                    print(f"deadline: skipped {model} {gemm} T={tokens}", flush=True)
                    continue
                try:
                    rows = run_case(
                        model,
                        gemm,
                        n,
                        k,
                        tokens,
                        top_k,
                        w,
                        packs,
                        doc["roofline"],
                        count=(mi == 0),
                        table6=table6[model],
                        ablation=ablation[model],
                    )
                except Exception as err:  # noqa: BLE001 - one broken case must not lose the others
                    doc["skipped"].append(f"{model} {gemm} T={tokens}: {type(err).__name__}: {str(err)[:200]}")
                    print(f"error: {model} {gemm} T={tokens}: {err}", flush=True)
                    continue
                results.extend(rows)
                _print_case(rows)
            del w, packs
            torch.cuda.empty_cache()
        doc["results"], doc["targets"] = results, targets(results)
        doc["wall_s"] = round(prior_s + time.time() - t0, 1)
        write_text_atomic(out_path, json.dumps(doc, indent=1))
    if args.tune_seconds > 0:
        doc["tuning"] = tune(time.time() + args.tune_seconds)
        doc["tuned_best"] = best_configs(doc["tuning"])
        doc["wall_s"] = round(time.time() - t0, 1)
        write_text_atomic(out_path, json.dumps(doc, indent=1))
        for scheme, classes in doc["tuned_best"].items():
            print(scheme, {c: (v["config"], v["num_warps"], round(v["ms"] * 1e3)) for c, v in classes.items()})
    print(json.dumps(doc["targets"], indent=1))
    print(f"wrote {Path(out_path).name} in {time.time() - t0:.0f} s")
    if args.table_dir:
        table_path = write_table([out_path], args.table_dir)
        v = validate(out_path, read_table(table_path), holdout=True)
        if v["n_mixed"]:
            print(
                f"wrote {table_path.name}; the performance model on this run's {v['n_mixed']} mixed launches "
                f"(out of sample; each case's own shape held out): median |error| {v['mixed_median_abs_err']:.1%}, "
                f"max {v['mixed_max_abs_err']:.1%}"
            )
        else:
            print(f"wrote {table_path.name} (this run timed no mixed launch to check the model on)")


def tune(deadline: float, model: str = "qwen1.5-moe") -> list[dict]:
    """Tile sweep on one model's gate_up GEMM for the main schemes at each token count."""
    e, h, inter, top_k = MODELS[model]
    n, k = 2 * inter, h
    w = torch.randn(e, n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    records = []
    for scheme in ("w4a16_g-1_asym", "bf16", "w8a8_g-1_sym", "w4a16_g128_asym", "w8a8_g-1_sym_fp8", "w4a4_g-1_sym"):
        s = Scheme.parse(scheme)
        group = ExpertGroup([pack(w[i], s) for i in range(e)])
        for tokens in TOKENS:
            rows = expert_loads(tokens, e, top_k)
            offs = expert_offsets(rows, DEV)
            x = torch.randn(sum(rows), k, device=DEV, dtype=torch.bfloat16)
            cls = rows_class(sum(rows) / e)
            timings = sweep(x, offs, group, s, LARGE if cls == "gt64" else SMALL, deadline)
            records.append(
                {"scheme": scheme, "rows_class": cls, "case": f"{model} gate_up T={tokens}", "timings": timings}
            )
            print(
                scheme,
                tokens,
                [(tuple(r["config"].values()), r["num_warps"], round(r.get("ms", -1) * 1e3)) for r in timings],
                flush=True,
            )
    return records


def _print_case(rows: list[dict]) -> None:
    r0 = rows[0]
    cells = []
    for r in rows:
        if "ms" in r:
            cells.append(
                f"{r['variant'].replace('ours_', '').replace('torch_', 't:')}={r['ms'] * 1e3:.0f}us"
                f"({r.get('speedup_vs_torch_bf16', math.nan):.2f}x)"
            )
        else:
            cells.append(f"{r['variant']}=ERR")
    print(f"{r0['model']:18s} {r0['gemm']:7s} T={r0['tokens']:5d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
