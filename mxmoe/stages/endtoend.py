"""Stage 05's throughput side: MoE-block throughput of an allocation, Figures 5 and 6 assembled.

Throughput here is the time of every MoE layer's two grouped-GEMM launches (gate_up fused, down) for
a batch routed like the WikiText-2 routing profile, predicted by ``mxmoe.perfmodel`` from a GPU's cost
table (the same model the allocation optimised), or measured by ``mxmoe.bench.alloc`` on a GPU and
committed under results/kernels/. Perplexities come from ``mxmoe.stages.evaluate``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from mxmoe import plan
from mxmoe.baselines import allocation_config
from mxmoe.files import write_json_atomic
from mxmoe.paths import kernel_results_dir, results_dir
from mxmoe.perfmodel import launch_time, load_table
from mxmoe.profiles import Profile
from mxmoe.routing import batch_workload
from mxmoe.schemes import Scheme
from mxmoe.stages.allocation import model_shape, r_sweep_allocations, routing_profile
from mxmoe.stages.evaluate import evaluate_config


def predicted_throughput(model: str, batch_tokens: int, gpu: str = "nvidia_h100", *, scheme: "str | None" = None,
                         scheme_map: "dict | None" = None) -> dict:
    """Predicted MoE-block GEMM time of one batch: {'T_ms', 'tokens_per_s', 'time_source'}.

    Give one uniform ``scheme`` or an allocation ``scheme_map`` {(layer, expert, block): Scheme};
    gate_up uses the gate's scheme (gate and up are tied). Shared experts run every token.
    """
    if (scheme is None) == (scheme_map is None):
        raise ValueError("give exactly one of scheme= or scheme_map=")
    rout, dims, table = routing_profile(model), model_shape(model), load_table(gpu)
    rows = batch_workload(np.asarray(rout["counts"]), batch_tokens, rout["top_k"])  # [L, E]
    h, w = dims["hidden"], dims["expert_width"]
    total, sources = 0.0, set()
    for li, layer in enumerate(rout["layers"]):
        experts = [(e, int(m), w) for e, m in enumerate(rows[li])]
        experts += [(f"shared{i}", batch_tokens, sw) for i, sw in enumerate(dims["shared_widths"])]

        def of(e, block):
            return Scheme.parse(scheme if scheme_map is None else scheme_map[(layer, e, block)])

        gate_up = launch_time([(of(e, "gate"), m, 2 * width, h) for e, m, width in experts], table)
        down = launch_time([(of(e, "down"), m, h, width) for e, m, width in experts], table)
        total += gate_up.ms + down.ms
        sources |= {gate_up.source, down.source}
    return {"T_ms": total, "tokens_per_s": batch_tokens / (total / 1e3), "time_source": ",".join(sorted(sources))}


def measured_throughput(model: str) -> "dict | None":
    """{(setting, batch): row} from the newest GPU run of ``mxmoe.bench.alloc`` for ``model``, or None.

    Each row has ms, tokens_per_s and the run's device; the file is results/kernels/figure5_<model>_<gpu>.json.
    """
    files = sorted(kernel_results_dir().glob(f"figure5_{model}_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    doc = json.loads(files[-1].read_text())
    device = doc["provenance"]["device"]
    return {(r["setting"], r["batch"]): {**r, "device": device, "source": files[-1].name} for r in doc["rows"]}
