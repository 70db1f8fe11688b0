"""Per-GPU kernel table ``cost_tables/<gpu>.json``: tile configs and per-tile costs from benchmark runs.

``python -m mxmoe.bench.cost_table results/kernels/bench_A.json [...] --out cost_tables/nvidia_h200.json``

For every uniform-scheme run of our kernel in the given benchmark files, one cost point: the
tiles of that launch (from the routed rows per expert and the tile config it used), tiles per
SM, the measured time and its timer (`events` or `cudagraph`, from the benchmark's `--timer`); a later run
of the same case replaces an earlier one. The allocation's
performance model fits ``time = a + b * tiles_per_sm`` per scheme and K from these points.
The table's ``kernel`` is the kernel fingerprint (``mxmoe.kernels.version``) its points were
measured on ("mixed" when they come from different kernels; absent for runs older than the
fingerprint); ``mxmoe.perfmodel`` flags a table whose kernel is not the one installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mxmoe.bench.cases import MODELS, UNIFORM, expert_loads
from mxmoe.files import write_json_atomic
from mxmoe.perfmodel import gpu_key

PROG = "mxmoe bench cost-table"  # also python -m mxmoe.bench.cost_table


def launch_tiles(rows: "list[int]", n: int, tile: dict) -> int:
    """Output tiles of one grouped GEMM: sum over experts of ceil(rows/BM) * ceil(N/BN)."""
    return sum(-(-r // tile["bm"]) * -(-n // tile["bn"]) for r in rows)


def cost_points(bench: dict) -> "list[dict]":
    """One cost point per uniform-scheme run of our kernel in a benchmark document."""
    sms = bench["provenance"]["multiprocessors"]
    out = []
    for r in bench["results"]:
        name = r["variant"].removeprefix("ours_")
        if name not in UNIFORM or "ms" not in r:
            continue
        scheme = UNIFORM[name]
        tile = r["tiles"][scheme]
        rows = expert_loads(r["tokens"], r["experts"], MODELS[r["model"]][3])
        tiles = launch_tiles(rows, r["N"], tile)
        out.append(
            {
                "scheme": scheme,
                "K": r["K"],
                "N": r["N"],
                "model": r["model"],
                "gemm": r["gemm"],
                "tokens": r["tokens"],
                "tile": tile,
                "tiles": tiles,
                "tiles_per_sm": tiles / sms,
                "ms": r["ms"],
                "us_per_tile_per_sm": r["ms"] * 1e3 / (tiles / sms),
                "timer": bench.get("timer_kind", "events"),
                "kernel_commit": bench["provenance"]["git_commit"],
                "kernel": bench["provenance"].get("kernel"),
                "date_utc": bench["provenance"]["date_utc"],
            }
        )
    return out


def build_table(paths: "list[Path]") -> dict:
    """The cost_tables/<gpu>.json document from benchmark files of one GPU."""
    docs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["provenance"]["date_utc"])
    devices = {d["provenance"]["device"] for d in docs}
    if len(devices) != 1:
        raise ValueError(f"benchmark files come from several devices: {sorted(devices)}")
    points: dict = {}
    for d in docs:  # later runs replace earlier ones
        for p in cost_points(d):
            points[(p["scheme"], p["model"], p["gemm"], p["tokens"])] = p
    latest = docs[-1]
    kernels = {p["kernel"] for p in points.values()}
    table = {
        "device": latest["provenance"]["device"],
        "kernel": kernels.pop() if len(kernels) == 1 else "mixed",
        "provenance": [d["provenance"] for d in docs],
        "roofline": latest["roofline"],
        "sources": [str(p) for p in paths],
        "cost_points": sorted(points.values(), key=lambda p: (p["scheme"], p["K"], p["N"], p["tokens"])),
    }
    sweeps = [d for d in docs if d.get("tuning")]
    if sweeps:
        table["tile_sweep"] = {
            "kernel_commit": sweeps[-1]["provenance"]["git_commit"],
            "best": sweeps[-1]["tuned_best"],
            "runs": sweeps[-1]["tuning"],
        }
    return table


def write_table(paths: "list[Path]", table_dir: "str | Path") -> Path:
    """Build the table of ``paths`` and write it to ``table_dir/<gpu>.json`` (atomically); returns the path."""
    table = build_table(paths)
    out = Path(table_dir) / f"{gpu_key(table['device'])}.json"
    write_json_atomic(out, table)
    return out


def main(argv: "list[str] | None" = None) -> None:
    """Write cost_tables/<gpu>.json from benchmark files."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("bench", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    table = build_table(args.bench)
    write_json_atomic(args.out, table)
    print(f"wrote {Path(args.out).name}: {len(table['cost_points'])} cost points on {table['device']}")


if __name__ == "__main__":
    main()
