"""Evaluations that depend on no earlier stage, computed ahead of the notebooks in parallel processes.

On a GPU the accuracy path of a small model is launch-bound (thousands of tiny kernels per forward),
so a few processes share one card well. ``python -m mxmoe.prewarm --profile full --part table1``
computes, through the same ``mxmoe.stages.evaluate.evaluate_config`` cache the notebooks read, one group of
rows; the notebooks then find them cached. The numbers are the ones the notebooks would compute
themselves (same code, same cache keys); only the wall-clock time of the notebook that shows them
shrinks, so time a run that uses this by its total, not per notebook.

Parts (the settings of ``mxmoe.plan``):

* ``table1``: the Table 1 baselines of notebook 05 (fp16, GPTQ* 3.25 / 2.25, QuaRot-style W4A4) with zero-shot;
* ``mxmoe``: Table 1's MxMoE rows (3.25, 2.25, W5A5 allocations of notebook 04) with zero-shot;
* ``sweep``: Table 3's expert-granularity W5A5 allocation and Figure 6's r sweep (perplexity only; the
  sweep's allocations are read, or solved and written as notebook 05 does when missing);
* ``table5``: notebook 05's rotated uniform w4a4 ... w8a8 models (perplexity only);
* ``table4``: notebook 01's RTN grid, w4..8 × a4..8, and its full-precision reference (perplexity only).

``mxmoe`` and ``sweep`` read notebook 04's allocations, so they run after it.
"""

from __future__ import annotations

import argparse
import sys
import time

from mxmoe import plan
from mxmoe.baselines import allocation_config, baseline, rotated_uniform_config, rtn_grid_config
from mxmoe.models import smollm2
from mxmoe.paths import use_profile_results
from mxmoe.profiles import get_profile
from mxmoe.stages.allocation import alloc_path, load_allocation, r_sweep_allocations, sweep_setting
from mxmoe.stages.evaluate import evaluate_config

PARTS = ("table1", "mxmoe", "sweep", "table4", "table5")


def part_configs(part: str, model: str = "smollm2-moe", profile: str = "") -> list:
    """[(QuantConfig, scheme map or None, zeroshot)] of one part (``mxmoe``/``sweep`` read the allocations)."""
    if part == "table1":
        return [(baseline(n), None, True) for n in plan.TABLE1_BASELINES]
    if part == "mxmoe":
        return [(allocation_config(label), load_allocation(model, s), True) for label, s in plan.TABLE1_MXMOE.items()]
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
    raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def wait_for_model(name: str, timeout_s: float, poll_s: float = 10.0) -> None:
    """Block until the embedded model's build is complete (another process builds it), or raise after ``timeout_s``."""
    if name != "smollm2-moe":
        return
    start = time.time()
    while not smollm2.is_built():
        if time.time() - start > timeout_s:
            raise TimeoutError(
                f"smollm2-moe was not built within {timeout_s:.0f} s; run notebook 00 or `mxmoe model build`"
            )
        time.sleep(poll_s)


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(prog="mxmoe prewarm", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="smoke | quick | full (default: full with a CUDA GPU, else quick)")
    p.add_argument("--part", required=True, choices=PARTS)
    p.add_argument("--wait-model-s", type=float, default=1800, help="wait this long for another process's model build")
    args = p.parse_args(argv)

    P = get_profile(args.profile)
    root = use_profile_results(P.name)
    wait_for_model(P.model, args.wait_model_s)
    for config, smap, zeroshot in part_configs(args.part, P.model, P.name):
        start = time.time()
        row = evaluate_config(config, P, scheme_map=smap, zeroshot=zeroshot, progress=False)
        print(f"{args.part} {config.label}: PPL {row['ppl']:.3f} ({time.time() - start:.0f} s) -> {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
