"""End-to-end figures: Figure 5 (throughput with perplexity marked) and Figure 6 (the r trade-off)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter

from mxmoe import paper
from mxmoe.plots import figure


def _tokens(x, _pos=None) -> str:
    """Axis label of a token rate: 2.5M, 800k."""
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}"


def fig5_throughput(df: pd.DataFrame):
    """Figure 5: MoE-block tokens/s per setting at each batch size, each bar labelled with its WikiText-2 PPL.

    ``df`` columns: setting, batch, tokens_per_s, ppl (None where not measured).
    """
    batches = sorted(df.batch.unique())
    fig, axes = figure(len(batches), 1, width=8, height=3.2 * len(batches))
    for ax, batch in zip(axes[:, 0], batches):
        part = df[df.batch == batch]
        sns.barplot(part, x="setting", y="tokens_per_s", hue="setting", ax=ax, legend=False)
        for patch, (_, row) in zip(ax.patches, part.iterrows()):
            label = "PPL n/a" if pd.isna(row.ppl) else f"PPL {row.ppl:.2f}"
            ax.annotate(
                label, (patch.get_x() + patch.get_width() / 2, patch.get_height()), ha="center", va="bottom", fontsize=7
            )
        base = part[part.setting == part.setting.iloc[0]].tokens_per_s.iloc[0]
        ax.set(
            title=f"{batch} tokens (speedup vs {part.setting.iloc[0]}: {part.tokens_per_s.max() / base:.2f}× best)",
            xlabel="",
            ylabel="MoE-block throughput (tokens/s)",
        )
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.yaxis.set_major_formatter(FuncFormatter(_tokens))
    fig.tight_layout()
    return fig


def fig5_paper_models(df: pd.DataFrame):
    """Figure 5, the paper's models: MoE-block throughput over fp16 per model, one panel per batch size
    ("throughput only": no weights, so no PPL), with the paper's stated range for mixed precision over full
    precision at that batch size shaded (``mxmoe.paper``; RTX 4090). ``df``: ``mxmoe.bench.runs.paper_model_throughput``
    rows. The legend sits below the panels."""
    batches = sorted(df.batch.unique())
    fig, axes = figure(len(batches), 1, width=8, height=2.9 * len(batches) + 0.6)
    stated = {512: "mixed_vs_full_precision_512", 8192: "mixed_vs_full_precision_8192"}
    for ax, batch in zip(axes[:, 0], batches):
        sns.barplot(df[df.batch == batch], x="model", y="speedup_vs_fp16", hue="setting", ax=ax)
        ax.axhline(1.0, color="0.3", lw=0.8)
        if batch in stated:
            lo, hi = paper.value("fig5", stated[batch])
            ax.axhspan(
                lo,
                hi,
                color="0.5",
                alpha=0.18,
                lw=0,
                zorder=0,
                label="paper's stated range: mixed vs full precision (RTX 4090)",
            )
            ax.text(
                0.995,
                hi,
                f"paper {lo:g}–{hi:g}×",
                transform=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=8,
                color="0.3",
            )
            ax.set_ylim(0, max(ax.get_ylim()[1], hi * 1.08))
        ax.set(
            title=f"{batch} tokens: throughput only (no weights, no PPL)",
            xlabel="",
            ylabel="MoE-block speedup over fp16 (×)",
        )
        ax.tick_params(axis="x", labelsize=8)
        ax.get_legend().remove()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    return fig


def fig5_speedups(rows: list) -> pd.DataFrame:
    """Figure 5 of our model as a table: each setting's MoE-block throughput over fp16's, per batch size."""
    t = pd.DataFrame(rows).pivot(index="setting", columns="batch", values="tokens_per_s")
    t = t / t.loc["fp16"]
    t.columns = [f"{b} tokens" for b in t.columns]
    return t


def fp8_frame(doc: dict, reference: str) -> pd.DataFrame:
    """The fp8 extension (``mxmoe.stages.endtoend.fp8_table``) as a display table: bits, WikiText-2 PPL and its change
    from full precision, the mean zero-shot accuracy (points) and the MoE-block throughput per batch size relative to
    the ``reference`` row and to full precision."""
    rows = pd.DataFrame(doc["rows"]).set_index("setting")
    out = pd.DataFrame(
        {
            "W bits": rows.w_bits.map(lambda b: f"{b:.2f}"),
            "A bits": rows.a_bits.map(lambda a: f"{a:g}"),
            "WikiText-2 PPL": rows.ppl.map(lambda x: f"{x:.2f}"),
            "PPL vs fp16": (rows.ppl / rows.ppl["fp16"] - 1).map(lambda x: f"{x:+.1%}"),
            "zero-shot mean": rows.tasks.map(lambda t: f"{100 * sum(t.values()) / len(t):.1f}" if t else "—"),
        }
    )
    for col in (c for c in rows.columns if c.startswith("tokens_per_s_")):
        batch = col.removeprefix("tokens_per_s_")
        out[f"{batch} tok vs {reference}"] = (rows[col] / rows[col][reference]).map(lambda x: f"{x:.2f}×")
        out[f"{batch} tok vs fp16"] = (rows[col] / rows[col]["fp16"]).map(lambda x: f"{x:.2f}×")
    return out


def fig6_points(f6: pd.DataFrame) -> pd.DataFrame:
    """Figure 6's points as a display table: r, PPL (2 decimals), MoE-block throughput and its source."""
    out = f6.sort_values("r").set_index("r")
    return pd.DataFrame(
        {
            "WikiText-2 PPL": out.ppl.map(lambda x: f"{x:.2f}" if pd.notna(x) else "—"),
            "MoE-block tokens/s": out.tokens_per_s.map(lambda x: f"{x:,.0f}" if pd.notna(x) else "—"),
            "throughput": out.time_source,
        }
    )


def fig6_tradeoff(df: pd.DataFrame, kind: str = "predicted"):
    """Figure 6: throughput vs PPL of the allocations for each r (points labelled with r, joined in r order).

    ``df`` columns: r, ppl, tokens_per_s; ``kind`` says whether throughput was measured or predicted.
    """
    fig, axes = figure(1, 1, width=5.5, height=4.0)
    ax = axes[0][0]
    df = df.sort_values("r")
    ax.plot(df.tokens_per_s, df.ppl, color="0.6", lw=0.8, zorder=1)
    sns.scatterplot(df, x="tokens_per_s", y="ppl", hue="r", palette="viridis", s=50, ax=ax, zorder=2, legend=False)
    for _, row in df.iterrows():
        ax.annotate(f"r={row.r:g}", (row.tokens_per_s, row.ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(
        xlabel=f"MoE-block throughput (tokens/s, {kind})",
        ylabel="WikiText-2 PPL (measured)",
        title="accuracy vs performance as r varies (points labelled with r)",
    )
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    return fig
