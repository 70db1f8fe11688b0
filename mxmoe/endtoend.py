"""End-to-end helpers (notebook 05): Table 1 rows, MoE-block throughput of an allocation, the r sweep.

Throughput here is the time of every MoE layer's two grouped-GEMM launches (gate_up fused, down) for
a batch routed like the WikiText-2 routing profile, predicted by ``mxmoe.perfmodel`` from a GPU's cost
table — the same model the allocation optimised. Measured kernel throughput comes from GPU runs
(results/kernels/), never from here.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from mxmoe.allocate import (allocation_doc, card_dims, layer_problem, model_dims, pareto_front, scheme_map,
                            write_allocation)
from mxmoe.errors import MxMoEError
from mxmoe.paths import kernel_results_dir, results_dir
from mxmoe.perfmodel import launch_time, load_table
from mxmoe.routing import batch_workload
from mxmoe.schemes import Scheme

TABLE1_KEYS = ("w_bits", "a_bits", "ppl", "tasks", "profile", "device")


def table1_row(row: dict) -> dict:
    """The results/<model>/eval/table1.json entry of one ``evaluate_config`` row."""
    return {k: row[k] for k in TABLE1_KEYS}


def model_shape(model: str) -> dict:
    """{'hidden', 'expert_width', 'shared_widths'}: from the model card, else from the loaded model (tiny models)."""
    try:
        return card_dims(model)
    except MxMoEError:
        from mxmoe.models import load_model

        return model_dims(load_model(model)[0])


def routing_profile(model: str, corpus: str = "wikitext2") -> dict:
    """The routing result of ``corpus`` (the one with the most tokens) under results/<model>/routing/."""
    files = list((results_dir() / model / "routing").glob(f"{corpus}_*.json")) or \
        list((results_dir() / model / "routing").glob("random_*.json"))  # smoke profile
    if not files:
        raise MxMoEError(f"no routing profile for {model} under {results_dir() / model / 'routing'}; run notebook 02")
    return max((json.loads(f.read_text()) for f in files), key=lambda r: r["tokens"])


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


def r_sweep_allocations(model: str, rs, budget_bits: float, schemes: str = "w5a5", batch_tokens: int = 512,
                        gpu: str = "nvidia_h100", method: str = "gptq-had", profile: str = "") -> dict:
    """Allocations for several r from one Pareto front per layer: {r: (setting, scheme map, allocation doc)}.

    Each is written to results/<model>/alloc/<schemes>-b<budget>-r<r>.json.
    """
    dims, rout = model_shape(model), routing_profile(model)
    problems = [layer_problem(model, layer, method, schemes, batch_tokens, gpu, dims=dims, routing=rout)
                for layer in rout["layers"]]
    fronts = [pareto_front(p.loss, p.time, p.bits, p.size, budget_bits, labels=p.labels) for p in problems]
    out = {}
    for r in rs:
        choices = [f.pick(r).choice for f in fronts]
        setting = f"{schemes}-b{budget_bits:g}-r{r:g}"
        doc = allocation_doc(problems, choices, setting, r, budget_bits, profile=profile,
                             solve_seconds=sum(f.seconds for f in fronts))
        write_allocation(doc)
        out[r] = (setting, scheme_map(problems, choices), doc)
    return out


def measured_throughput(model: str) -> "dict | None":
    """{(setting, batch): row} from the newest GPU run of ``mxmoe.kernels.alloc_bench`` for ``model``, or None.

    Each row has ms, tokens_per_s and the run's device; the file is results/kernels/figure5_<model>_<gpu>.json.
    """
    files = sorted(kernel_results_dir().glob(f"figure5_{model}_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    doc = json.loads(files[-1].read_text())
    device = doc["provenance"]["device"]
    return {(r["setting"], r["batch"]): {**r, "device": device, "source": files[-1].name} for r in doc["rows"]}


# Figure 5 panels of the paper's models (no weights here: throughput only) -> benchmark variant per setting
PAPER_FIG5_VARIANTS = {"fp16": "torch_grouped_bf16", "w4a16": "ours_w4a16_g128", "w8a8": "ours_w8a8_int8",
                       "w4a4": "ours_w4a4_g-1", "mix 4.25 (w4a16+w8a8)": "ours_mix4.25_w4a16+w8a8",
                       "mix 5 (w4a4+w8a8)": "ours_mix5_w4a4+w8a8"}


def paper_model_throughput(bench_files, batches=(512, 8192)) -> "pd.DataFrame":
    """Figure 5 rows for the paper's models from kernel benchmark files: MoE-block (gate_up + down GEMM)
    tokens/s per model, batch and setting, and the speedup over fp16 (torch's bf16 grouped GEMM).

    Their weights cannot be loaded here, so there is no PPL and no allocation: the mixes are the
    benchmark's fixed expert mixes at the named average width, not MxMoE allocations.
    """
    from mxmoe.plots import kernels as kp

    blocks = kp.block_times(kp.case_rows([kp.load_bench(f) for f in bench_files]), tuple(PAPER_FIG5_VARIANTS.values()))
    blocks = blocks[blocks.model.isin(kp.PAPER_MODELS) & blocks.tokens.isin(batches)]
    setting = {v: k for k, v in PAPER_FIG5_VARIANTS.items()}
    rows = blocks.assign(setting=blocks.variant.map(setting), batch=blocks.tokens)
    rows = rows.drop_duplicates(["model", "batch", "setting"])  # the first file that measured a case wins
    order = {k: i for i, k in enumerate(PAPER_FIG5_VARIANTS)}
    rows = rows.sort_values(["model", "batch", "setting"], key=lambda c: c.map(order) if c.name == "setting" else c)
    return rows[["model", "batch", "setting", "block_us", "tokens_per_s", "speedup_vs_torch_grouped"]].rename(
        columns={"speedup_vs_torch_grouped": "speedup_vs_fp16"}).reset_index(drop=True)
