"""Figure 5 for the paper's models as whole models: throughput against memory per setting.

``rows_of(docs)`` flattens ``mxmoe.bench.paper_models`` result documents into one table;
``fig_whole_model`` plots measured whole-model prefill and decode tokens/s (CUDA-graph captured)
against the weight memory each setting needs; ``fig_predicted`` plots the perfmodel's MoE-block
GEMM throughput against expert weight memory when no GPU run is committed. Save them with
``mxmoe.plots.save`` (which draws the provenance line).
"""

from __future__ import annotations

import pandas as pd

from mxmoe.bench.paper_models import gpu_of
from mxmoe.plots import figure, label_points

GIB = 2**30


def rows_of(docs: list) -> pd.DataFrame:
    """One row per (model, setting, phase, shape) of measured result documents: tokens/s eager and captured,
    weight GiB (the model with these experts: bf16 non-expert weights + the setting's expert bytes) and peak GiB."""
    out = []
    for doc in docs:
        non_expert = doc["build"]["weight_gib_bf16"] - doc["build"]["expert_gib_bf16"]
        for r in doc["settings"]:
            if "error" in r:
                continue
            weight_gib = non_expert + r["expert_bytes"] / GIB
            for phase, key in (("prefill", "prefill"), ("decode", "decode")):
                for shape, m in r[key].items():
                    if "tokens_per_s_graph" not in m and "tokens_per_s_eager" not in m:
                        continue
                    out.append(
                        {
                            "model": doc["model"],
                            "gpu": gpu_of(doc),
                            "setting": r["setting"],
                            "phase": phase,
                            "shape": shape if phase == "prefill" else f"batch {shape}",
                            "tokens_per_s_graph": m.get("tokens_per_s_graph"),
                            "tokens_per_s_eager": m.get("tokens_per_s_eager"),
                            "weight_gib": weight_gib,
                            "expert_gib": r["expert_bytes"] / GIB,
                            "peak_gib": r.get("peak_gib"),
                        }
                    )
    return pd.DataFrame(out)


SPEEDUPS = {  # summary key -> short column heading (captured, vs bf16 grouped_mm)
    "block": {"block_512_graph_speedup": "512", "block_8192_graph_speedup": "8192"},
    "prefill": {"prefill_1x512_graph_speedup": "1×512", "prefill_4x2048_graph_speedup": "4×2048"},
    "decode": {f"decode_{b}_graph_speedup": f"batch {b}" for b in (1, 16, 64)},
}


def speedup_table(docs: list, part: str) -> pd.DataFrame:
    """Captured speedups over bf16 grouped_mm of one ``part`` of ``SPEEDUPS`` (MoE block, prefill or decode), one
    row per (model, GPU, setting), narrow enough for a book page; the decode table adds expert bytes vs bf16."""
    cols = dict(SPEEDUPS[part], **({"expert_bytes_vs_bf16": "bytes"} if part == "decode" else {}))
    rows = [
        {"model": d["model"], "gpu": gpu_of(d), "setting": s, **{h: v.get(k) for k, h in cols.items()}}
        for d in docs
        for s, v in d["summary"].items()
    ]
    return pd.DataFrame(rows).set_index(["model", "gpu", "setting"])


def fig_whole_model(df: pd.DataFrame, prefill_shape: str = "4x2048", decode_shape: str = "batch 16"):
    """Whole-model tokens/s (captured) vs weight GiB per setting: prefill and decode panels, one row per
    (model, GPU)."""
    runs = list(dict.fromkeys(zip(df.model, df.gpu)))
    fig, axes = figure(len(runs), 2, width=11, height=3.4 * len(runs))
    for row, (model, gpu) in zip(axes, runs):
        for ax, (phase, shape) in zip(row, (("prefill", prefill_shape), ("decode", decode_shape))):
            d = df[(df.model == model) & (df.gpu == gpu) & (df.phase == phase) & (df["shape"] == shape)]
            ys = d.tokens_per_s_graph.fillna(d.tokens_per_s_eager)  # captured where it ran, else eager
            for r, y in zip(d.itertuples(), ys):
                ax.scatter(r.weight_gib, y, s=40, marker="o" if r.setting.startswith("mxmoe") else "s")
            label_points(ax, d.weight_gib, ys, d.setting)
            ax.set(title=f"{model}, {gpu}: {phase} {shape}", xlabel="weight memory (GiB)", ylabel="tokens/s (captured)")
    fig.tight_layout()
    return fig


def fig_predicted(df: pd.DataFrame):
    """Predicted MoE-block GEMM tokens/s vs expert weight GiB per setting, one panel per (model, tokens).

    ``df``: ``mxmoe.bench.paper_models.predicted_rows`` rows (the kernel's GEMMs only, from the cost table)."""
    keys = list(dict.fromkeys(zip(df.model, df.tokens)))
    ncols = 2
    nrows = -(-len(keys) // ncols)
    fig, axes = figure(nrows, ncols, width=11, height=3.2 * nrows)
    for ax, (model, tokens) in zip(axes.flat, keys):
        d = df[(df.model == model) & (df.tokens == tokens)]
        for r in d.itertuples():
            ax.scatter(r.expert_gib, r.tokens_per_s, s=40)
        label_points(ax, d.expert_gib, d.tokens_per_s, [s.removeprefix("mxmoe ") for s in d.setting])
        ax.set(
            title=f"{model}: {tokens} tokens (MoE GEMMs, predicted)", xlabel="expert weights (GiB)", ylabel="tokens/s"
        )
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
