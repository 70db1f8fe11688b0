"""Allocation figures: Table 7 (scheme map, experts x gate/up/down) and Figure 6 (speed vs accuracy front).

Each function returns a matplotlib figure; save it with ``mxmoe.plots.save(fig, model, name, meta)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from mxmoe.plots import figure

BLOCKS = ("gate", "up", "down")


def short(scheme: str) -> str:
    """Compact label of a scheme string: 'w4a16_g128_asym' -> 'w4a16 g128', 'w8a8_g-1_sym_fp8' -> 'w8a8 fp8',
    'w4a8_g128_sym_fp8' -> 'w4a8 g128 fp8'."""
    if scheme == "bf16":
        return "bf16"
    parts = scheme.split("_")
    group = "" if parts[1] == "g-1" else parts[1]
    return " ".join(p for p in (parts[0], group, "fp8" if scheme.endswith("_fp8") else "") if p)


def allocation_map(doc: dict, layer: int, title: "str | None" = None):
    """Table 7: the scheme of every (expert, block) of one layer of an allocation document, as a colour map.

    Rows are experts (routed in id order, then shared); columns gate, up, down. Returns (fig, table) where
    table is {expert: [gate, up, down]} of scheme strings.
    """
    rows = [r for r in doc["rows"] if r["layer"] == layer]
    if not rows:
        raise ValueError(
            f"layer {layer} is not in allocation {doc.get('setting')!r}; layers: "
            f"{sorted({r['layer'] for r in doc['rows']})}"
        )
    experts = sorted(
        {r["expert"] for r in rows}, key=lambda e: (isinstance(e, str), e if isinstance(e, int) else 0, str(e))
    )
    table = {e: [None] * 3 for e in experts}
    for r in rows:
        table[r["expert"]][BLOCKS.index(r["block"])] = r["scheme"]
    schemes = list(doc["schemes"])
    grid = np.array([[schemes.index(table[e][j]) for e in experts] for j in range(3)])  # [3, E]
    fig, axes = figure(width=max(6.4, 0.22 * len(experts) + 1.5), height=2.4)
    ax = axes[0, 0]
    colours = sns.color_palette("colorblind", len(schemes))
    ax.imshow(
        grid, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=len(schemes) - 0.5, interpolation="nearest"
    )
    ax.set_yticks(range(3), BLOCKS)
    ax.set_xticks(range(len(experts)), [str(e).replace("shared", "s") for e in experts], fontsize=6)
    ax.set_xlabel("expert (s0: shared)")
    ax.grid(False)
    used = sorted(set(grid.ravel()))
    handles = [Patch(color=colours[k], label=short(schemes[k])) for k in used]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or f"{doc['setting']}: layer {layer} (r = {doc['r']}, {doc['budget_bits']} bits)")
    return fig, {str(e): v for e, v in table.items()}


def front_plot(
    front_points: list,
    picks: dict,
    tokens: int,
    measured: "dict | None" = None,
    title: str = "Speed vs accuracy",
    label: str = "Pareto front (ILP, predicted)",
):
    """Figure 6: predicted throughput (tokens / T) against predicted loss L along the ILP's Pareto front.

    ``front_points``: [(L, T_ms), ...] drawn as a line named ``label``; ``picks``: {r: (L, T_ms)} optimal points per r (marked and
    labelled); ``measured``: optional {label: (throughput tokens/s, y)} points measured elsewhere, drawn
    on a second y axis (e.g. WikiText-2 PPL from notebook 05).
    """
    fig, axes = figure()
    ax = axes[0, 0]
    pts = sorted(front_points, key=lambda p: p[1])
    tp = [tokens / (t * 1e-3) for _, t in pts]
    ax.plot(tp, [loss for loss, _ in pts], "-o", ms=3, lw=1, label=label)
    for r, (L, T) in sorted(picks.items()):
        ax.plot(tokens / (T * 1e-3), L, "s", ms=7, mfc="none", mew=1.5)
        ax.annotate(f"r={r:g}", (tokens / (T * 1e-3), L), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("predicted MoE-block GEMM throughput (tokens/s)")
    ax.set_ylabel("sensitivity loss L (Σ Δ)")
    if measured:
        ax2 = ax.twinx()
        for label, (x, y) in measured.items():
            ax2.plot(x, y, "^", color="C3")
            ax2.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="C3")
        ax2.set_ylabel("measured", color="C3")
        ax2.grid(False)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    return fig


def validation_table(perf_doc: dict) -> pd.DataFrame:
    """The performance model's errors per benchmark run (``mxmoe.bench.validate.validation_report``): mixed cases,
    median and max |relative error| on the mixed GEMMs, the same with the case's shape held out, and on uniform ones."""
    return pd.DataFrame(
        [
            {
                "bench": name,
                "mixed cases": d["all"]["n_mixed"],
                "median |err| mixed": d["all"]["mixed_median_abs_err"],
                "max |err| mixed": d["all"]["mixed_max_abs_err"],
                "median |err| mixed, holdout": d["holdout"]["mixed_median_abs_err"],
                "median |err| uniform": d["all"]["uniform_median_abs_err"],
            }
            for name, d in perf_doc["per_file"].items()
        ]
    ).set_index("bench")
