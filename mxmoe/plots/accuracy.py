"""Accuracy-side figures: sensitivity (Figure 1a, layer x block summary, Table 4) and routing (Figure 1b right)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter, NullFormatter

from mxmoe.plots import figure
from mxmoe.sensitivity import sensitivity_array
from mxmoe.stages.proxy import scheme_prices

BLOCK_NAMES = ("gate", "up", "down")


def sensitivity_frame(result: dict) -> pd.DataFrame:
    """Long table of one sensitivity result: layer, expert, block, scheme, delta (experts without tokens dropped)."""
    rows = []
    for layer in result["layers"]:
        arr, experts = sensitivity_array(result, int(layer), fill="nan")  # [E, 3, S]
        for i, e in enumerate(experts):
            for j, block in enumerate(result["blocks"]):
                for k, scheme in enumerate(result["schemes"]):
                    rows.append((int(layer), str(e), block, scheme, arr[i, j, k]))
    return pd.DataFrame(rows, columns=["layer", "expert", "block", "scheme", "delta"]).dropna()


def fig1a_sensitivity(result: dict, layer: int, schemes, block: str = "gate", compare: str = "w4a4_g-1_sym"):
    """Figure 1a: Δ per expert of one layer for several schemes (log scale), and gate vs down under ``compare``.

    Experts are ordered by their Δ under the first scheme so the spread across experts is visible.
    """
    df = sensitivity_frame(result)
    df = df[(df.layer == layer) & ~df.expert.str.startswith("shared")]  # shared experts see every token: own scale
    fig, axes = figure(1, 2, width=11, height=3.6)
    ax1, ax2 = axes[0]
    one = df[(df.block == block) & df.scheme.isin(schemes)]
    order = one[one.scheme == schemes[0]].sort_values("delta").expert.tolist()
    sns.pointplot(
        one,
        x="expert",
        y="delta",
        hue="scheme",
        order=order,
        hue_order=list(schemes),
        ax=ax1,
        markersize=3,
        linewidth=1,
    )
    ax1.set(
        yscale="log",
        xlabel=f"expert (sorted by Δ under {schemes[0]})",
        ylabel="Δ = ‖Ô − O‖₂ (log)",
        title=f"layer {layer} {block}_proj: Δ per routed expert",
    )
    ax1.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax1.legend(
        fontsize=8,
        title="scheme",
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.28),
        ncol=2,
        frameon=False,
    )
    pair = df[(df.scheme == compare) & df.block.isin(["gate", "down"])].pivot(
        index="expert", columns="block", values="delta"
    )
    ax2.scatter(pair["gate"], pair["down"], s=14)
    lim = [pair.min().min() * 0.8, pair.max().max() * 1.25]
    ax2.plot(lim, lim, color="0.6", lw=0.8, ls="--", label="equal")
    ax2.set(
        xscale="log",
        yscale="log",
        xlim=lim,
        ylim=lim,
        xlabel="Δ gate_proj",
        ylabel="Δ down_proj",
        title=f"layer {layer}, {compare}: gate vs down",
    )
    ax2.legend(fontsize=8)
    for axis in (ax2.xaxis, ax2.yaxis):
        axis.set_minor_formatter(NullFormatter())
    return fig


def layer_block_summary(result: dict, scheme: str):
    """Heatmap: median Δ over experts per (layer, block type) under one scheme, log colour scale."""
    df = sensitivity_frame(result)
    df = df[(df.scheme == scheme) & ~df.expert.str.startswith("shared")]
    table = df.groupby(["layer", "block"]).delta.median().unstack()[list(BLOCK_NAMES)]  # [layers, 3]
    fig, axes = figure(1, 1, width=4.2, height=0.5 * len(table) + 1.2)
    ax = axes[0][0]
    sns.heatmap(table, annot=True, fmt=".3g", norm=LogNorm(), cmap="rocket_r", cbar_kws={"label": "median Δ"}, ax=ax)
    ax.set(title=f"median Δ over routed experts, {scheme}", xlabel="linear block", ylabel="MoE layer")
    return fig


def table4_heatmap(grid: pd.DataFrame, fp_ppl: float):
    """Table 4 as a heatmap: WikiText-2 PPL under RTN, rows weight bits, columns activation bits."""
    fig, axes = figure(1, 1, width=5.2, height=4.0)
    ax = axes[0][0]
    sns.heatmap(grid, annot=True, fmt=".1f", norm=LogNorm(), cmap="mako_r", cbar_kws={"label": "PPL"}, ax=ax)
    ax.set(title=f"RTN perplexity (full precision {fp_ppl:.2f})", xlabel="activation bits", ylabel="weight bits")
    return fig


def routing_frequencies(reports: dict, layer_index: int):
    """Figure 1b right: share of routed tokens per expert of one MoE layer on several corpora."""
    rows = []
    for corpus, r in reports.items():
        counts = np.asarray(r["counts"][layer_index], dtype=float)  # [E]
        rows += [(corpus, str(e), c / counts.sum()) for e, c in enumerate(counts)]
    df = pd.DataFrame(rows, columns=["corpus", "expert", "share"])
    first = next(iter(reports))
    order = df[df.corpus == first].sort_values("share", ascending=False).expert.tolist()
    fig, axes = figure(1, 1, width=9, height=3.4)
    ax = axes[0][0]
    sns.barplot(df, x="expert", y="share", hue="corpus", order=order, ax=ax)
    layer = reports[first]["layers"][layer_index]
    k = reports[first]["top_k"]
    ax.axhline(1 / len(order), color="0.4", lw=0.8, ls="--", label="uniform")
    ax.set(
        xlabel=f"expert (sorted by {first} share)",
        ylabel="share of routed tokens",
        title=f"MoE layer {layer} (top-{k}): activation frequency per expert",
    )
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.legend(fontsize=8, loc="upper right", title=None)
    return fig


def skew_across_layers(reports: dict):
    """Routing skew per MoE layer and corpus: max/min ratio (log) and Gini coefficient."""
    rows = []
    for corpus, r in reports.items():
        s = r["skew"]
        for i, layer in enumerate(r["layers"]):
            ratio = s["max_over_min"][i]
            rows.append((corpus, layer, np.inf if ratio is None else ratio, s["gini"][i]))
    df = pd.DataFrame(rows, columns=["corpus", "layer", "max/min", "gini"])
    fig, axes = figure(1, 2, width=10, height=3.4)
    for ax, col in zip(axes[0], ["max/min", "gini"]):
        sns.pointplot(df.replace(np.inf, np.nan), x="layer", y=col, hue="corpus", ax=ax, markersize=4, linewidth=1)
        ax.set(
            title=f"{col} of tokens per expert",
            xlabel="MoE layer",
            ylabel="max/min tokens per expert (×, log)" if col == "max/min" else "Gini coefficient (0 = uniform)",
        )
        ax.legend(fontsize=8, title=None)
    axes[0][0].set_yscale("log")
    return fig


def skew_table(reports: dict) -> pd.DataFrame:
    """Routing skew per corpus and MoE layer: max/min tokens per expert, Gini, top-10% share, unused experts."""
    rows = []
    for corpus, r in reports.items():
        s = r["skew"]
        for i, lay in enumerate(r["layers"]):
            rows.append(
                {
                    "corpus": corpus,
                    "layer": lay,
                    "max/min": s["max_over_min"][i],
                    "gini": s["gini"][i],
                    "top-10% share": s["top10_share"][i],
                    "unused experts": s["unused_experts"][i],
                }
            )
    return pd.DataFrame(rows).set_index(["corpus", "layer"])


def rank_agreement(reports: dict, layer_index: int) -> pd.Series:
    """Spearman rank correlation of the expert shares of one layer, first corpus vs each other corpus."""
    shares = {c: pd.Series(np.asarray(r["counts"][layer_index], dtype=float)) for c, r in reports.items()}
    first = next(iter(shares))
    return pd.Series(
        {f"{first} vs {c}": shares[first].rank().corr(shares[c].rank()) for c in shares if c != first},
        name="Spearman rank correlation",
    )


def workloads_table(report: dict, batches) -> pd.DataFrame:
    """Tokens per expert (max, median, min) per MoE layer at each batch size, from one routing report."""
    w = report["workloads"]
    return pd.DataFrame(
        {
            f"{b} tokens: {stat}": [fn(np.asarray(row)) for row in w[str(b)]]
            for b in batches
            for stat, fn in (("max", np.max), ("median", np.median), ("min", np.min))
        },
        index=pd.Index(report["layers"], name="MoE layer"),
    )


def table4_grid(t4: dict, bits) -> pd.DataFrame:
    """Table 4's PPL as a grid: rows weight bits, columns activation bits (``t4``: ``mxmoe.stages.evaluate.table4``)."""
    grid = pd.DataFrame([[t4["ppl"][f"w{w}a{a}"] for a in bits] for w in bits], index=list(bits), columns=list(bits))
    grid.index.name, grid.columns.name = "w_bits", "a_bits"
    return grid


def median_delta(frames: dict) -> pd.DataFrame:
    """Median Δ over routed expert blocks, per scheme (rows) and method (columns); ``frames``: method -> sensitivity_frame."""
    return pd.DataFrame(
        {
            m: f[~f.expert.str.startswith("shared")].groupby("scheme", sort=False).delta.median()
            for m, f in frames.items()
        }
    )


def block_spread(frame: pd.DataFrame, layer: int, scheme: str) -> pd.DataFrame:
    """For one layer and scheme: max/min Δ across routed experts per block type, and down/gate Δ per expert
    (median, min, max), formatted as ratios."""
    f = frame[(frame.layer == layer) & (frame.scheme == scheme) & ~frame.expert.str.startswith("shared")]
    spread = f.groupby("block").delta.agg(lambda d: d.max() / d.min())
    ratio = f[f.block == "down"].set_index("expert").delta / f[f.block == "gate"].set_index("expert").delta
    rows = {f"{b}: max/min Δ across experts": f"{v:.1f}×" for b, v in spread.items()}
    rows["down / gate Δ per expert: median (range)"] = (
        f"{ratio.median():.2f}× ({ratio.min():.2f}–{ratio.max():.2f}×)" if len(ratio.dropna()) else "—"
    )
    return pd.Series(rows, name=f"layer {layer}, {scheme}").to_frame()


def proxy_scatter(check: dict):
    """The proxy check (``mxmoe.stages.proxy``): per layer and scheme, Σ Δ against the whole model's NLL increase."""
    df = pd.DataFrame(check["pairs"].values())
    fig, axes = figure(1, 1, width=5.6, height=4.0)
    ax = axes[0][0]
    sns.scatterplot(data=df, x="proxy", y="nll_increase", hue="scheme", style="scheme", s=40, ax=ax)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-2)  # linear within ±0.01 nats (small changes of either sign)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    rho = check["agreement"]["all pairs"]
    how = {"rtn": "RTN", "gptq": "GPTQ + rotation"}[check["params"]["quantizer"]]
    ax.set(
        title=f"one MoE layer quantized ({how}): Spearman ρ = {rho:.2f}"
        if rho is not None
        else f"one MoE layer quantized ({how})",
        xlabel="proxy: Σ Δ over the layer's blocks",
        ylabel="whole-model NLL increase (nats)",
    )
    return fig


def proxy_table(check: dict) -> pd.DataFrame:
    """Spearman ρ of the proxy check: across layers per scheme, then over every (layer, scheme) pair."""
    agree = check["agreement"]
    rows = {f"across layers, {s}": rho for s, rho in agree["per scheme"].items()}
    rows["every (layer, scheme) pair"] = agree["all pairs"]
    return pd.Series(rows, name="Spearman ρ (proxy vs NLL increase)").to_frame()


def proxy_repair_table(rtn: dict, gptq: dict) -> pd.DataFrame:
    """Per scheme, the proxy check's damage with RTN and with GPTQ after a rotation (mean whole-model NLL increase
    over the layers, their ratio) and how well each check's Δ ranks the layers by it (Spearman ρ); last row: ρ over
    every (layer, scheme) pair. ``rtn``, ``gptq``: ``proxy_check`` results with those quantizers."""
    rho = {c["params"]["quantizer"]: f"ρ({c['params']['sensitivity']['method']} Δ, damage)" for c in (rtn, gptq)}
    rows = {}
    for s in rtn["agreement"]["per scheme"]:
        r = [x["nll_increase"] for x in rtn["pairs"].values() if x["scheme"] == s]
        g = [x["nll_increase"] for x in gptq["pairs"].values() if x["scheme"] == s]
        rows[s] = {
            "NLL increase, RTN": np.mean(r),
            "NLL increase, GPTQ + rotation": np.mean(g),
            "RTN / GPTQ": np.mean(r) / np.mean(g) if np.mean(g) > 0 else np.nan,  # a mean within noise: no ratio
            f"{rho['rtn']}, RTN": rtn["agreement"]["per scheme"][s],
            f"{rho['gptq']}, GPTQ": gptq["agreement"]["per scheme"].get(s, np.nan),
        }
    rows["every (layer, scheme) pair"] = {
        f"{rho['rtn']}, RTN": rtn["agreement"]["all pairs"],
        f"{rho['gptq']}, GPTQ": gptq["agreement"]["all pairs"],
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def proxy_scale_table(check: dict, reference: str) -> pd.DataFrame:
    """``mxmoe.stages.proxy.scheme_prices`` of a ``proxy_check`` as a table: per scheme, the damage the model pays and
    the Δ an allocation assumes, both relative to ``reference``; their ratio is how far Δ understates (> 1) or
    overstates a scheme's damage relative to the reference."""
    prices = scheme_prices(check["pairs"], reference)
    rows = {
        s: {
            f"NLL increase / {reference}'s": p["damage"],
            f"Δ / {reference}'s": p["delta"],
            "Δ understates by": p["damage"] / p["delta"],
        }
        for s, p in prices["schemes"].items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"{prices['layers']} layers")


def calibrated_table(t1: dict, calibrated: "list[dict]") -> pd.DataFrame:
    """The calibrated allocations (``mxmoe.stages.calibrated``) beside Table 1's uniform baseline and the paper's
    MxMoE at the same budget: bits, WikiText-2 test PPL as Table 1 quantizes (GPTQ after a rotation) and with
    RTN, each relative to the uniform row (negative = lower), the NLL increase the calibrated damages add up to
    (for the uniform row: the same damages' sum with every layer at its scheme) against the one measured on the
    test windows, and the calibrated allocation's blocks per scheme."""
    rows = []
    fp_ppl = _t1_bits_ppl(t1, "fp16")[1]
    for budget in dict.fromkeys(r["budget_bits"] for r in calibrated):
        mine = [r for r in calibrated if r["budget_bits"] == budget]
        first, b = mine[0], f"{budget:g}"
        g_bits, g_ppl = _t1_bits_ppl(t1, first["uniform"]["label"])
        u_rtn = first["uniform"]["ppl_rtn"]
        settings = [
            (f"{first['uniform']['label']} (uniform)", g_bits, g_ppl, u_rtn, {"measured": np.log(g_ppl / fp_ppl)}, ""),
            (f"MxMoE {b} (paper's Δ)", *_t1_bits_ppl(t1, first["paper"]["label"]), first["paper"]["ppl_rtn"], {}, ""),
        ]
        for r in mine:
            mix = ", ".join(f"{s} {n}" for s, n in r["blocks_per_scheme"].items() if n)
            label = f"MxMoE {b}, Δ calibrated to {r['damage'].upper()} damage (extension)"
            settings.append((label, r["w_bits"], r["ppl"], r["ppl_rtn"], r["nll_increase"], mix))
            uniform = f"  uniform, as {r['damage'].upper()} damage adds up"  # the prediction alone
            settings.append(
                (uniform, np.nan, np.nan, np.nan, {"predicted": r["nll_increase"]["uniform_predicted"]}, "")
            )
        for label, bits, ppl, rtn, nll, blocks in settings:
            rows.append(
                {
                    "setting": label,
                    "bits": bits,
                    "PPL, GPTQ + rotation": ppl,
                    "vs uniform": ppl / g_ppl - 1,
                    "PPL, RTN": rtn,
                    "vs uniform RTN": rtn / u_rtn - 1,
                    "NLL increase, predicted": nll.get("predicted", np.nan),
                    "NLL increase, measured": nll.get("measured", np.nan),
                    "blocks per scheme": blocks,
                }
            )
    return pd.DataFrame(rows).set_index("setting")


def _t1_bits_ppl(t1: dict, label: str) -> tuple:
    """(weight bits, PPL) of a Table 1 row, (nan, nan) when the profile has no such row."""
    row = t1.get(label)
    return (row["w_bits"], row["ppl"]) if row else (np.nan, np.nan)
