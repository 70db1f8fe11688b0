"""Timers of one GPU call, apart from the host's share of it.

``events_ms`` is ``triton.testing.do_bench`` (CUDA events around each call after an L2 flush, median) with one
difference: after each flush the GPU spins ``HEAD_START_US`` before the start event. The host then enqueues the
call while the GPU is still busy, so the time between the events is the GPU's alone. Without it, a call whose
Python takes longer than the flush leaves the GPU idle inside the timed interval: on a busy host the same
launch timed 74, 134 and 259 µs in three rounds (results/kernels/NOTES.md). ``host_ms`` times that Python
separately: the wall time of one call enqueued on an idle GPU.
"""

from __future__ import annotations

import statistics
import time

import torch
from triton import runtime

HEAD_START_US = 300.0  # GPU spin between the L2 flush and the start event: hides up to this much host time

_CYCLES_PER_US: "dict[int, float]" = {}  # device index -> measured spin cycles per µs


def _spin_cycles(us: float) -> int:
    """``torch.cuda._sleep`` cycles that spin about ``us`` µs on the current device (measured once per device)."""
    dev = torch.cuda.current_device()
    if dev not in _CYCLES_PER_US:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_US[dev] = cycles / (1e3 * start.elapsed_time(end))
    return int(us * _CYCLES_PER_US[dev])


def events_ms(fn, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median GPU ms of one call of ``fn`` after an L2 flush, between CUDA events, the host given a head start
    (module docstring). As do_bench, the number of timed calls is ``rep_ms`` over the estimated time of one."""
    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()  # do_bench's flush buffer, larger than any L2
    spin = _spin_cycles(HEAD_START_US)
    fn()
    torch.cuda.synchronize()

    def timed(n: int) -> "list[tuple[torch.cuda.Event, torch.cuda.Event]]":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in pairs:
            driver.clear_cache(cache)
            torch.cuda._sleep(spin)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return pairs

    t0 = time.perf_counter()
    timed(5)
    per_call_ms = 1e3 * (time.perf_counter() - t0) / 5  # flush, spin and call: what one timed call costs
    for _ in range(max(1, int(warmup_ms / per_call_ms))):
        fn()
    pairs = timed(max(1, int(rep_ms / per_call_ms)))
    return float(statistics.median(s.elapsed_time(e) for s, e in pairs))


def host_ms(fn, calls: int = 10) -> float:
    """Median wall ms the host spends in one call of ``fn`` (its Python and launches), each call made on an idle
    GPU so that no launch waits for a full queue."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return float(statistics.median(times))
