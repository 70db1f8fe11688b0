"""Evaluations that depend on no earlier stage, computed ahead of the notebooks in parallel processes.

On a GPU the accuracy path of a small model is launch-bound (thousands of tiny kernels per forward),
so a few processes share one card well. ``python -m mxmoe.prewarm --profile full --part table1``
computes, through the same ``mxmoe.evaluate.evaluate_config`` cache the notebooks read, one group of
rows; the notebooks then find them cached. The numbers are the ones the notebooks would compute
themselves (same code, same cache keys); only the wall-clock time of the notebook that shows them
shrinks, so time a run that uses this by its total, not per notebook.

Parts (the notebooks' default parameters):

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

BITS = (4, 5, 6, 7, 8)
PARTS = ("table1", "mxmoe", "sweep", "table4", "table5")
MXMOE_SETTINGS = ("mxmoe-3.25", "mxmoe-2.25", "mxmoe-w5a5")  # notebook 05's Table 1 allocations
R_SWEEP = (0.0, 0.25, 0.5, 1.0, 0.75)  # Figure 6; 0.75 last: it is mxmoe-w5a5's allocation, often measured by then


def part_configs(part: str, model: str = "smollm2-moe", profile: str = "") -> list:
    """[(QuantConfig, scheme map or None, zeroshot)] of one part (``mxmoe``/``sweep`` read the allocations)."""
    from mxmoe.allocate import load_allocation
    from mxmoe.baselines import allocation_config, baseline, rotated_uniform_config, rtn_grid_config

    if part == "table1":
        return [(baseline(n), None, True) for n in ("fp16", "gptq*-3.25", "gptq*-2.25", "quarot-w4a4")]
    if part == "mxmoe":
        return [(allocation_config(s), load_allocation(model, s), True) for s in MXMOE_SETTINGS]
    if part == "sweep":
        from mxmoe.allocate import alloc_path
        from mxmoe.endtoend import r_sweep_allocations

        settings = [f"w5a5-b5-r{r:g}" for r in R_SWEEP]
        if not all(alloc_path(model, s).exists() for s in settings):
            r_sweep_allocations(model, R_SWEEP, budget_bits=5.0, schemes="w5a5", batch_tokens=512, profile=profile)
        return [(allocation_config(s), load_allocation(model, s), False) for s in ["mxmoe-w5a5-expert", *settings]]
    if part == "table5":
        return [(rotated_uniform_config(b, b), None, False) for b in BITS]
    if part == "table4":
        return [(baseline("fp16"), None, False)] + [(rtn_grid_config(w, a), None, False) for w in BITS for a in BITS]
    raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def wait_for_model(name: str, timeout_s: float, poll_s: float = 10.0) -> None:
    """Block until the embedded model's build is complete (another process builds it), or raise after ``timeout_s``."""
    if name != "smollm2-moe":
        return
    from mxmoe.models import smollm2

    start = time.time()
    while not smollm2.is_built():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"smollm2-moe was not built within {timeout_s:.0f} s; run notebook 00 or `mxmoe model build`")
        time.sleep(poll_s)


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxmoe.prewarm", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="smoke | quick | full (default: full with a CUDA GPU, else quick)")
    p.add_argument("--part", required=True, choices=PARTS)
    p.add_argument("--wait-model-s", type=float, default=1800, help="wait this long for another process's model build")
    args = p.parse_args(argv)

    from mxmoe.evaluate import evaluate_config
    from mxmoe.paths import use_profile_results
    from mxmoe.profiles import get_profile

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
