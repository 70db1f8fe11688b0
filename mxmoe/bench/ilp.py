"""Solve times of the allocation ILP on a random layer (``mxmoe bench ilp``; chapter 04's solver timing)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pulp

from mxmoe.allocate import pareto_front, solve_layer


def random_problem(experts: int = 64, schemes: int = 6, seed: int = 0) -> tuple:
    """A random instance shaped like one layer (loss falls and time varies with bits): (loss, time, bits, size)."""
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.choice([2.25, 3.25, 4.0, 4.25, 5.0, 8.0, 16.0], schemes, replace=False))[::-1]  # [S]
    tokens = rng.gamma(2.0, 50.0, experts) + 1  # [E] routed rows
    sens = rng.lognormal(0.0, 1.0, (experts, 3, 1))  # [E, 3, 1]
    loss = sens * 2.0 ** (-bits)[None, None] * rng.uniform(0.8, 1.2, (experts, 3, schemes))  # [E, 3, S]
    speed = rng.uniform(0.5, 1.5, schemes) * (0.3 + bits / 16)  # [S] time per row
    time_ = tokens[:, None, None] * speed[None, None] * rng.uniform(0.9, 1.1, (experts, 3, schemes)) * 1e-4
    size = np.full(experts, 1.0)
    return loss, time_, bits, size


def bench(experts: int = 64, schemes: int = 6, seed: int = 0, budget: float = 5.0, front: bool = True) -> dict:
    """Time one-r solves (r = 0.75, 1, 0.5, 0) and the whole front on a random layer; prints and returns them."""
    loss, time_, bits, size = random_problem(experts, schemes, seed)
    out = {"experts": experts, "schemes": schemes, "budget_bits": budget, "solver": f"PuLP {pulp.__version__} CBC"}
    for r in (0.75, 1.0, 0.5, 0.0):
        start = time.perf_counter()
        solve_layer(loss, time_, bits, size, budget, r)
        out[f"one_r_{r:g}_s"] = round(time.perf_counter() - start, 3)
    if front:
        f = pareto_front(loss, time_, bits, size, budget)
        out.update(front_s=round(f.seconds, 3), front_points=len(f.points), front_solves=f.solves)
    for key, value in out.items():
        print(f"{key:>16}: {value}")
    return out


def main(argv: "list[str] | None" = None) -> None:
    """``mxmoe bench ilp``: solve-time benchmark on a random 64-expert, 6-scheme layer."""
    ap = argparse.ArgumentParser(prog="mxmoe bench ilp", description=main.__doc__)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--schemes", type=int, default=6)
    ap.add_argument("--no-front", action="store_true", help="skip timing the whole front")
    args = ap.parse_args(argv)
    bench(args.experts, args.schemes, front=not args.no_front)


if __name__ == "__main__":
    main()
