"""Figure 5 measured: a model's MoE-block GEMMs under each setting, through the real kernel.

``python -m mxmoe.bench.alloc --model smollm2-moe --out DIR`` times, for every MoE layer of
the model's routing profile (results/<model>/routing/wikitext2_*.json, tokens per expert scaled to the
batch), the gate_up and down grouped GEMMs of the routed experts (one launch each, any mix of
schemes) and of the shared experts (their own launch: a different width), with the schemes of:

* uniform settings (bf16, w4a16 g128, w8a8 int8, w4a4 g-1), and
* every allocation in results/<model>/alloc/*.json (the scheme of each expert's gate and down).

Weights and activations are random (timing only; the accuracy of the same allocations is measured
by the accuracy path). Rows of weight-activation experts are quantized beforehand, as the token
gather hands them over. Timer: CUDA-graph replays (``do_bench_cudagraph`` median), because the
embedded model's GEMMs take microseconds and per-call events would time the host. Writes
``DIR/figure5_<model>_<gpu>.json``: per setting and batch the summed ms and MoE-block tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from triton.testing import do_bench_cudagraph

from mxmoe.bench.roofline import provenance
from mxmoe.env import device_slug
from mxmoe.files import write_text_atomic
from mxmoe.kernels import ExpertGroup, group_gemm, pack, quantize_activations
from mxmoe.paths import results_dir
from mxmoe.routing import batch_workload
from mxmoe.schemes import Scheme
from mxmoe.stages.allocation import model_shape, routing_profile

UNIFORM = {"fp16": "bf16", "w4a16": "w4a16_g128_asym", "w8a8": "w8a8_g-1_sym", "w4a4": "w4a4_g-1_sym"}


PROG = "mxmoe bench alloc"  # also python -m mxmoe.bench.alloc


def settings(model: str) -> dict:
    """{setting: {(layer, expert, block): scheme str} or a uniform scheme str} for the model's allocations."""
    out: dict = dict(UNIFORM)
    for path in sorted((results_dir() / model / "alloc").glob("*.json")):
        doc = json.loads(path.read_text())
        if "rows" in doc:
            out[doc["setting"]] = {(r["layer"], r["expert"], r["block"]): r["scheme"] for r in doc["rows"]}
    return out


def _group(scheme_of, experts: list, n: int, k: int) -> ExpertGroup:
    """Random weights [n, k] packed per expert with its scheme, as one launch's ExpertGroup."""
    return ExpertGroup(
        [pack(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, scheme_of(e)) for e in experts]
    )


def _launch_ms(group: ExpertGroup, rows: list) -> float:
    """Median ms of one grouped GEMM over ``rows`` per expert (graph replays)."""
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(rows)]), device="cuda", dtype=torch.int32)  # [E+1]
    x = torch.randn(int(sum(rows)), group.k, device="cuda", dtype=torch.bfloat16)  # [T, K]
    x_q = quantize_activations(x, offsets, group) if group.act_schemes else None
    return float(
        do_bench_cudagraph(lambda: group_gemm(x, offsets, group, x_q=x_q, validate=False), rep=50, return_mode="median")
    )


def time_setting(setting, routing: dict, shape: dict, batch: int) -> float:
    """Summed ms of every MoE layer's gate_up and down launches (routed, then shared experts) for one batch."""
    rows = batch_workload(np.asarray(routing["counts"]), batch, routing["top_k"])  # [L, E]
    h, w = shape["hidden"], shape["expert_width"]
    total = 0.0
    for li, layer in enumerate(routing["layers"]):

        def scheme_of(block):
            return lambda e: Scheme.parse(setting if isinstance(setting, str) else setting[(layer, e, block)])

        routed = list(range(rows.shape[1]))
        total += _launch_ms(_group(scheme_of("gate"), routed, 2 * w, h), rows[li].tolist())
        total += _launch_ms(_group(scheme_of("down"), routed, h, w), rows[li].tolist())
        for i, sw in enumerate(shape["shared_widths"]):
            shared = [f"shared{i}"]
            total += _launch_ms(_group(scheme_of("gate"), shared, 2 * sw, h), [batch])
            total += _launch_ms(_group(scheme_of("down"), shared, h, sw), [batch])
    return total


def main(argv: "list[str] | None" = None) -> None:
    """Time every setting of a model at each batch size; see the module docstring."""

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--batches", nargs="*", type=int, default=[512, 8192])
    ap.add_argument("--out", default="results/kernels")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    routing, shape = routing_profile(args.model), model_shape(args.model)
    doc = {
        "provenance": provenance(),
        "model": args.model,
        "routing": routing["params"],
        "shape": shape,
        "timer": "triton.testing.do_bench_cudagraph median, rep 50 ms, random weights",
        "rows": [],
    }
    for name, setting in settings(args.model).items():
        for batch in args.batches:
            ms = time_setting(setting, routing, shape, batch)
            doc["rows"].append({"setting": name, "batch": batch, "ms": ms, "tokens_per_s": batch / (ms / 1e3)})
            print(f"{name:22s} {batch:5d} tokens: {ms * 1e3:8.1f} us  {batch / (ms / 1e3):12.0f} tokens/s", flush=True)
    doc["wall_s"] = round(time.time() - t0, 1)
    out = Path(args.out) / f"figure5_{args.model}_{device_slug(doc['provenance']['device'])}.json"
    write_text_atomic(out, json.dumps(doc, indent=1))
    print(f"wrote {Path(out).name} in {doc['wall_s']} s")


if __name__ == "__main__":
    main()
