"""A model larger than the GPU: MxMoE's layer-by-layer calibration streamed from CPU memory.

``mxmoe bench streamed --model mixtral-8x7b --layers 3`` builds the full-size random-weight model in CPU
memory (``build_random(device="cpu", draw_on="cuda")``: each weight drawn on the GPU and moved to the host,
so the build takes seconds, not minutes; routers unbiased: calibration cost does not depend on the skew),
then runs MxMoE's two layer-by-layer stages with ``stream_to`` the GPU (``mxmoe.quant.layerwise``): the
batched GPTQ sensitivity of the first ``--layers`` MoE layers (the weight-only scheme set) and sequential
GPTQ (w4a16 g128 on every expert) of the same layers, on random-token calibration windows. Each decoder
layer goes to the GPU for its turn and back, so the GPU holds one layer and the calibration activations.

Recorded (``<out>/<model>_streamed_<gpu>.json``): the model's bytes against the GPU's memory (whether it
is larger), host memory, the peak GPU memory each stage allocated, seconds per layer (transfers
included) and each stage's time projected to every MoE layer, with the run's provenance. Mixtral-8x7B
(93 GB in bf16) is larger than an H100 (80 GB) and fits a 128 GiB host; on an H200 it fits the GPU, and
the file says so. ``--smoke`` runs the same flow on a tiny config on the CPU (it tests the code, it
measures nothing).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from mxmoe.bench.paper_models import WEIGHT_ONLY_SET, config_of, moe_layer_ids, output_dir, provenance
from mxmoe.env import device_slug
from mxmoe.files import write_json_atomic
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.random_init import build_random
from mxmoe.quant.apply import uniform_scheme_map
from mxmoe.quant.sequential import quantize_model_gptq
from mxmoe.schemes import scheme_set
from mxmoe.sensitivity import compute_sensitivity

GPTQ_SCHEME = "w4a16_g128_asym"


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _peak_gpu(device: torch.device) -> "int | None":
    """Peak bytes allocated on ``device`` since the last reset (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run(name: str, layers: int, out: Path, device: str = "cuda", windows: tuple = (8, 512), seed: int = 0) -> dict:
    """Build ``name`` in CPU memory, stream its first ``layers`` MoE layers' sensitivity and GPTQ to ``device``
    (1 <= ``layers`` <= its MoE layers); write and return the result document."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    model, _ = build_random(name, device="cpu", draw_on=dev, seed=seed, skew=0)
    build_s = time.perf_counter() - t0
    blocks = moe_blocks(model)
    first = {b.layer for b in blocks[:layers]}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, windows, generator=g)  # [n, seqlen] calibration tokens
    doc = {
        "model": name,
        "layers_measured": sorted(first),
        "moe_layers": len(blocks),
        "calibration": {"windows": list(windows), "source": "random tokens"},
        "model_bytes": model_bytes(model),
        "gpu_bytes": torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None,
        "build_s": build_s,
        "provenance": provenance(),
    }
    doc["larger_than_gpu"] = doc["gpu_bytes"] is not None and doc["model_bytes"] > doc["gpu_bytes"]

    schemes = list(scheme_set(WEIGHT_ONLY_SET))
    _reset_peak(dev)
    t0 = time.perf_counter()
    sens = compute_sensitivity(model, ids, schemes, "gptq", stream_to=dev, layers=first)
    seconds = time.perf_counter() - t0
    doc["sensitivity"] = {
        "method": "gptq",
        "schemes": [str(s) for s in schemes],
        "seconds": seconds,
        "seconds_per_layer": [sens["layers"][str(layer)]["seconds"] for layer in sorted(first)],
        "peak_gpu_bytes": _peak_gpu(dev),
        "projected_all_layers_s": seconds / layers * len(blocks),
    }
    path = out / f"{name}_streamed_{device_slug(doc['provenance']['device'])}.json"
    write_json_atomic(path, doc)  # the sensitivity stage is kept if the GPTQ stage does not finish
    plan = {k: GPTQ_SCHEME for k in uniform_scheme_map(model, GPTQ_SCHEME) if k[0] in first}
    _reset_peak(dev)
    t0 = time.perf_counter()
    report = quantize_model_gptq(model, ids, plan, stream_to=dev, progress=True)
    doc["gptq"] = {
        "scheme": GPTQ_SCHEME,
        "seconds": time.perf_counter() - t0,
        "gptq_blocks": report.gptq_blocks,
        "rtn_fallbacks": len(report.rtn_fallbacks),
        "peak_gpu_bytes": _peak_gpu(dev),
    }
    doc["gptq"]["projected_all_layers_s"] = doc["gptq"]["seconds"] / layers * len(blocks)
    doc["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_json_atomic(path, doc)
    return doc


def table(doc: dict) -> str:
    """A short summary of one run."""
    gib = 2**30
    gpu = doc["gpu_bytes"] / gib if doc["gpu_bytes"] else float("nan")
    lines = [
        f"{doc['model']}: {doc['model_bytes'] / gib:.1f} GiB in CPU memory, GPU {gpu:.1f} GiB "
        f"(larger than the GPU: {doc['larger_than_gpu']}), built in {doc['build_s']:.0f} s",
    ]
    for stage in ("sensitivity", "gptq"):
        r = doc[stage]
        peak = r["peak_gpu_bytes"] / gib if r["peak_gpu_bytes"] is not None else float("nan")
        lines.append(
            f"{stage:12s} {len(doc['layers_measured'])} layers {r['seconds']:.1f} s, peak GPU {peak:.1f} GiB, "
            f"all {doc['moe_layers']} layers ~{r['projected_all_layers_s'] / 60:.1f} min"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line (module doc); bad input prints one line and returns 2, before any model is built."""
    ap = argparse.ArgumentParser(prog="mxmoe bench streamed", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="a paper model; tiny-* with --smoke")
    ap.add_argument("--layers", type=int, default=3, help="MoE layers to calibrate (the rest is projected)")
    ap.add_argument(
        "--out", default=None, help="results folder (default: results/paper-models; a temporary one with --smoke)"
    )
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on a tiny config (measures nothing)")
    args = ap.parse_args(argv)
    try:
        moe_layers = len(moe_layer_ids(config_of(args.model)))
    except ValueError as e:
        return _bad(str(e))
    if not 1 <= args.layers <= moe_layers:
        return _bad(f"--layers must be between 1 and {moe_layers} (the model's MoE layers), got {args.layers}")
    if not args.smoke and not torch.cuda.is_available():
        return _bad("streaming to a GPU needs one; --smoke runs the flow on the CPU")
    out = output_dir(args.out, args.smoke)
    doc = run(args.model, args.layers, out, "cpu" if args.smoke else "cuda", (2, 32) if args.smoke else (8, 512))
    print(table(doc))
    print(f"wrote {out}")
    return 0


def _bad(message: str) -> int:
    print(f"mxmoe bench streamed: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
