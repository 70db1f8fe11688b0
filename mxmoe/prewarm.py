"""Every computation of notebooks 00-05, run ahead of the notebooks in parallel processes.

On a GPU the accuracy path of a small model is launch-bound (thousands of tiny kernels per forward),
so a few processes share one card well. ``python -m mxmoe.prewarm --profile full --part table1``
computes one part through the same stage functions and caches the notebooks read (same code, same cache
keys); the notebooks then find every result cached. ``--all --workers N`` builds the model and runs every
part in N processes, each as soon as the parts it reads are done; an evaluation part is split over
``SHARDS[part]`` processes (``--part table1 --shard 1/4``: rows 1, 5, ...), so its slow rows run side by side.
Time a run that uses this by its total, not per notebook.

Parts (the settings of ``mxmoe.plan``):

* ``sensitivity-rtn``, ``sensitivity-gptq``, ``sensitivity-gptq-had``: notebook 01's Δ of every block under every
  scheme, one calibration method each;
* ``routing``: notebook 02's routing profiles on every corpus;
* ``table4``: notebook 01's RTN grid, w4..8 × a4..8, and its full-precision reference (perplexity only);
* ``alloc``: notebook 04's allocations (``plan.ALLOCATIONS``), solved and written;
* ``table1``: the Table 1 baselines of notebook 05 (fp16, GPTQ* 3.25 / 2.25, QuaRot-style W4A4) with zero-shot;
* ``mxmoe``: Table 1's MxMoE rows (3.25, 2.25, W5A5 allocations) with zero-shot;
* ``fp8``: notebook 05's fp8 extension (uniform w8a8 and W4A8 fp8, the fp8 allocation) with zero-shot;
* ``sweep``: Table 3's expert-granularity W5A5 allocation and Figure 6's r sweep (perplexity only; the
  sweep's allocations are read, or solved and written as notebook 05 does when missing);
* ``table5``: notebook 05's rotated uniform w4a4 ... w8a8 models (perplexity only);
* ``zeroshot-dense``: notebook 00's zero-shot accuracy of the dense model the MoE was carved from (smollm2 only);
* ``proxy-rtn``, ``proxy-gptq``: notebook 05's proxy checks, one MoE layer quantized at a time;
* ``calibrated-rtn``, ``calibrated``: notebook 05's calibrated-Δ allocations and their comparison rows, those
  calibrated to the RTN check (which does not wait for the slower GPTQ check), then all of them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from mxmoe import plan
from mxmoe.baselines import allocation_config, baseline, rotated_uniform_config, rtn_grid_config
from mxmoe.env import cache_dir
from mxmoe.errors import MxMoEError
from mxmoe.models import smollm2
from mxmoe.paths import results_dir, use_profile_results
from mxmoe.profiles import get_profile
from mxmoe.stages.allocation import (
    alloc_path,
    allocation_inputs,
    load_allocation,
    newest_result,
    r_sweep_allocations,
    solve_settings,
    sweep_setting,
)
from mxmoe.stages.calibrated import calibrated_rows
from mxmoe.stages.endtoend import fp8_configs
from mxmoe.stages.evaluate import evaluate_config, table1_mxmoe_configs
from mxmoe.stages.model import build_model, zeroshot_dense_vs_moe
from mxmoe.stages.proxy import proxy_check, proxy_inputs
from mxmoe.stages.routing import profile_corpora
from mxmoe.stages.sensitivity import profile_sensitivity

EVAL_PARTS = ("table1", "mxmoe", "fp8", "sweep", "table4", "table5")  # rows of evaluate_config (part_configs)
# every part, those on the longest chains first (the order --all starts the ready ones in)
PARTS = (
    "sensitivity-gptq-had",
    "sensitivity-rtn",
    "routing",
    "alloc",
    "proxy-gptq",
    "proxy-rtn",
    "table1",
    "zeroshot-dense",
    "mxmoe",
    "fp8",
    "calibrated-rtn",
    "calibrated",
    "sweep",
    "table4",
    "table5",
    "sensitivity-gptq",
)
SHARDS = {
    "table1": 4,
    "mxmoe": 3,
    "fp8": 3,
    "sweep": 2,
    "table4": 4,
    "table5": 3,
}  # processes per evaluation part with --all
DEPENDS = {  # the parts whose results a part reads
    "alloc": (f"sensitivity-{plan.ALLOCATION_METHOD}", "routing"),
    "mxmoe": ("alloc",),
    "fp8": ("alloc",),
    "sweep": ("alloc",),
    "proxy-rtn": ("sensitivity-rtn",),
    "proxy-gptq": (f"sensitivity-{plan.ALLOCATION_METHOD}",),
    "calibrated-rtn": ("proxy-rtn", "alloc"),
    "calibrated": ("proxy-gptq", "calibrated-rtn"),  # the RTN rows are cached by then
    "zeroshot-dense": ("table1",),
}


def part_configs(part: str, model: str = "smollm2-moe", profile: str = "") -> list:
    """[(QuantConfig, scheme map or None, zeroshot)] of one part (``mxmoe``/``sweep`` read the allocations)."""
    if part == "table1":
        return [(baseline(n), None, True) for n in plan.TABLE1_BASELINES]
    if part == "mxmoe":
        return [(c, smap, True) for c, smap in table1_mxmoe_configs(model)]
    if part == "fp8":
        return [(c, smap, True) for c, smap in fp8_configs(model)]
    if part == "sweep":
        rs = sorted(
            plan.R_SWEEP, key=lambda r: r == plan.allocation("mxmoe-w5a5").r
        )  # that one is often measured by then
        settings = [sweep_setting(r) for r in rs]
        if not all(alloc_path(model, s).exists() for s in settings):
            r_sweep_allocations(model, rs, profile=profile)
        return [(allocation_config(s), load_allocation(model, s), False) for s in [plan.TABLE3["expert"], *settings]]
    if part == "table5":
        return [(rotated_uniform_config(b, b), None, False) for b in plan.TABLE5_BITS]
    if part == "table4":
        return [(baseline("fp16"), None, False)] + [
            (rtn_grid_config(w, a), None, False) for w in plan.TABLE4_BITS for a in plan.TABLE4_BITS
        ]
    raise ValueError(f"unknown part {part!r}; choose one of {', '.join(EVAL_PARTS)}")


def run_stage_part(part: str, P) -> None:
    """One part that is not a list of evaluations, called exactly as its notebook calls it (so its cache hits)."""
    if part.startswith("sensitivity-"):
        profile_sensitivity(part.removeprefix("sensitivity-"), P, plan.SENSITIVITY_SCHEMES, 0, progress=False)
    elif part == "routing":
        profile_corpora(
            P.model,
            plan.ROUTING_CORPORA,
            P.routing_windows,
            plan.ROUTING_SEQLEN,
            0,
            plan.BATCHES,
            allow_random=P.name == "smoke",
        )
    elif part == "zeroshot-dense":
        if P.model in smollm2.NAMES:  # a model carved from a dense one
            zeroshot_dense_vs_moe(P.model, P)
    elif part == "alloc":
        if allocations_current(P):
            print("alloc: every allocation is newer than the files it is solved from; kept", flush=True)
            return
        solve_settings(allocation_inputs(P)[0], P.name)
    elif part in ("proxy-rtn", "proxy-gptq", "calibrated-rtn", "calibrated"):
        checks = []
        if part != "proxy-gptq":
            checks.append(proxy_check(P, *proxy_inputs(P)))
        if part in ("proxy-gptq", "calibrated"):
            checks.append(proxy_check(P, *proxy_inputs(P, plan.ALLOCATION_METHOD), quantizer="gptq", seed=0))
        if part.startswith("calibrated"):
            calibrated_rows(P, checks, 0)
    else:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def allocations_current(P) -> bool:
    """True when every allocation of ``plan.ALLOCATIONS`` is newer than the results it is solved from (the newest
    sensitivity and routing results, the model card), so a resumed run does not solve them again (minutes of CBC
    for a 30-layer model). Never in the smoke profile, whose inputs are computed on the fly. Notebook 04 solves
    them again in any case, and evaluations are keyed by the scheme map: a stale allocation here (a new cost
    table) costs evaluations the notebooks redo, never a wrong number."""
    if P.name == "smoke":
        return False
    try:
        inputs = [
            newest_result(P.model, "sensitivity", f"{plan.ALLOCATION_METHOD}_"),
            newest_result(P.model, "routing", f"{plan.ALLOCATION_CORPUS}_"),
            results_dir() / P.model / "model.json",
        ]
    except MxMoEError:
        return False
    outputs = [alloc_path(P.model, a.name) for a in plan.ALLOCATIONS]
    if not all(p.exists() for p in inputs + outputs):
        return False
    return min(p.stat().st_mtime for p in outputs) > max(p.stat().st_mtime for p in inputs)


def tasks(parts=PARTS) -> list[str]:
    """The processes ``--all`` starts: a part, or ``part:j/n`` for the j-th of an evaluation part's ``SHARDS`` shards."""
    return [t for p in parts for t in ([p] if p not in SHARDS else [f"{p}:{j}/{SHARDS[p]}" for j in range(SHARDS[p])])]


def parse_shard(text: str) -> "tuple[int, int]":
    """``"j/n"`` -> (j, n) with 0 <= j < n; raises ValueError otherwise."""
    j, _, n = text.partition("/")
    if not (j.isdigit() and n.isdigit() and 0 <= int(j) < int(n)):
        raise ValueError(f"--shard must be j/n with 0 <= j < n (e.g. 1/4), got {text!r}")
    return int(j), int(n)


def run_part(part: str, P, shard: "tuple[int, int]" = (0, 1)) -> None:
    """Compute one part of profile ``P`` into the results tree in use; of an evaluation part, the rows
    ``shard[0]::shard[1]``."""
    if part not in EVAL_PARTS:
        run_stage_part(part, P)
        return
    for config, smap, zeroshot in part_configs(part, P.model, P.name)[shard[0] :: shard[1]]:
        start = time.time()
        row = evaluate_config(config, P, scheme_map=smap, zeroshot=zeroshot, progress=False)
        print(f"{part} {config.label}: PPL {row['ppl']:.3f} ({time.time() - start:.0f} s)", flush=True)


def run_all(P, workers: int, log_dir: Path, parts=PARTS) -> list[str]:
    """Run ``parts`` (as ``tasks``) in up to ``workers`` processes of this module, each once the parts it reads
    (``DEPENDS``) are done; one log per task in ``log_dir``. A part that fails skips those that read it; an
    interrupt (Ctrl-C, a time limit's SIGINT) stops the workers, whose caches are written atomically. Returns
    the tasks that failed or were skipped."""
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting, running, done, failed = tasks(parts), {}, set(), []  # running: task -> (process, log, start)
    start = time.time()
    bar = tqdm(total=len(waiting), desc="prewarm", unit="task")

    def part_of(task: str) -> str:
        return task.partition(":")[0]

    def finish(task: str, ok: bool, how: str) -> None:
        (done.add(task) if ok else failed.append(task))
        bar.write(f"{task}: {how} ({time.time() - start:.0f} s in all)")
        bar.update()

    def reads(task: str) -> set:  # the tasks whose results this task reads
        return set(tasks(set(DEPENDS.get(part_of(task), ())) & set(parts)))

    try:
        while waiting or running:
            for task in [t for t in waiting if reads(t) & set(failed)]:
                waiting.remove(task)
                finish(task, False, "skipped (a part it reads failed)")
            ready = [t for t in waiting if reads(t) <= done]
            for task in ready[: max(0, workers - len(running))]:
                waiting.remove(task)
                log = open(log_dir / f"{task.replace(':', '.').replace('/', '-of-')}.log", "w")
                part, _, shard = task.partition(":")
                cmd = [sys.executable, "-m", "mxmoe.prewarm", "--profile", P.name, "--part", part]
                cmd += ["--shard", shard] if shard else []
                running[task] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            for task, (proc, log, t0) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[task]
                    ok = proc.returncode == 0
                    finish(
                        task,
                        ok,
                        f"{'done' if ok else f'FAILED (exit {proc.returncode}, {log.name})'} in {time.time() - t0:.0f} s",
                    )
            time.sleep(1)
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()
    return failed


def wait_for_model(name: str, timeout_s: float, poll_s: float = 10.0) -> None:
    """Block until the embedded model's build is complete (another process builds it), or raise after ``timeout_s``."""
    if name not in smollm2.NAMES:
        return
    start = time.time()
    while not smollm2.is_built(smollm2.recipe(name)):
        if time.time() - start > timeout_s:
            raise TimeoutError(
                f"smollm2-moe was not built within {timeout_s:.0f} s; run notebook 00 or `mxmoe model build`"
            )
        time.sleep(poll_s)


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(prog="mxmoe prewarm", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="smoke | quick | full (default: full with a CUDA GPU, else quick)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--part", choices=PARTS, help="compute one part in this process")
    which.add_argument("--all", action="store_true", help="build the model, then every part in --workers processes")
    p.add_argument("--shard", default="0/1", help="with --part of an evaluation part: its rows j::n, as j/n")
    p.add_argument("--workers", type=int, default=4, help="processes at once with --all (default 4)")
    p.add_argument(
        "--log-dir", type=Path, default=None, help="one log per part with --all (default: <cache>/prewarm/<profile>)"
    )
    p.add_argument("--wait-model-s", type=float, default=1800, help="wait this long for another process's model build")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        p.error(str(e))
    if shard != (0, 1) and args.part not in EVAL_PARTS:
        p.error(f"--shard splits an evaluation part ({', '.join(EVAL_PARTS)}), not {args.part or '--all'}")

    P = get_profile(args.profile)
    root = use_profile_results(P.name)
    if args.all:
        if P.model in smollm2.NAMES:
            build_model(name=P.model)  # once, before the workers load it; writes the card the allocations read
        failed = run_all(P, args.workers, args.log_dir or cache_dir() / "prewarm" / P.name)
        print(
            f"prewarm: {len(tasks()) - len(failed)} of {len(tasks())} tasks done -> {root}"
            + (f"; not done: {', '.join(failed)}" if failed else "")
        )
        return 1 if failed else 0
    wait_for_model(P.model, args.wait_model_s)
    start = time.time()
    run_part(args.part, P, shard)
    print(f"{args.part} {args.shard}: done in {time.time() - start:.0f} s -> {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
