"""What a chapter shows beside its figure: the paper's numbers next to ours, and the verdicts of its claims.

``verdicts(items, model)`` gives the "paper | ours | verdict" rows of the claims about some paper items,
computed by ``build_claims`` from the result files present (chapter 06 writes claims.json last, so the
earlier chapters compute their rows here). The ``*_vs_paper`` functions put one of our result tables
beside the paper's (``mxmoe.paper``, docs/paper_results.json); where the models differ (the paper's
Qwen1.5-MoE and DeepSeek-V2-Lite, our smollm2-moe) they compare *relative* numbers: PPL over full
precision, accuracy in points below full precision, speedups. Every function returns a pandas frame or
Styler with display formats: percentages as percentages, PPL with 2 decimals, speedups as "1.23×".
A value the paper does not state shows as "not stated"; a value we have no result for as "—".
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mxmoe import paper
from mxmoe.claims.rules import TABLE1_TARGETS, build_claims
from mxmoe.paths import results_dir

VERDICT_STYLE = {
    "reproduced": "background-color:#d9f2d9",
    "direction": "background-color:#fff3cd",
    "not-reproduced": "background-color:#f8d7da",
    "not-run": "color:#777",
}
NOT_STATED = "not stated"
# our Table 1 labels -> the paper's (method, bits)
TABLE1_PAPER = {
    "fp16": ("Baseline", "16-16"),
    "gptq*-3.25": ("GPTQ*", "3.25-16"),
    "gptq*-2.25": ("GPTQ*", "2.25-16"),
    "quarot-w4a4": ("QuaRot", "4-4"),
    "mxmoe-3.25": ("MxMoE", "3.25-16"),
    "mxmoe-2.25": ("MxMoE", "2.25-16"),
    "mxmoe-w5a5": ("MxMoE", "5-5"),
}
# lm-eval task names -> the paper's column names
TASKS = {
    "arc_challenge": "AC",
    "arc_easy": "AE",
    "hellaswag": "HS",
    "lambada_openai": "LO",
    "lambada_standard": "LS",
    "piqa": "PQ",
    "winogrande": "WG",
}
PAPER_MODELS = ("Qwen1.5-MoE", "DeepSeek-V2-Lite")  # Table 1 models shown beside ours


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_value(x, unit: str = "") -> str:
    """One claim value in its unit's display format ("21.4%", "1.05×", "32.20 → 30.68", "+29.4%", PPL ratios "0.996")."""
    if x is None:
        return "—"
    if isinstance(x, (list, tuple)):
        if not x:
            return "—"
        if unit.startswith("PPL at"):
            return " → ".join(fmt_value(v, "PPL") for v in x)
        parts = [fmt_value(v, unit) for v in x]
        suffix = "×" if all(p.endswith("×") for p in parts) else ""
        return "–".join(p.removesuffix("×") for p in parts) + suffix
    if not _num(x):
        return str(x)
    u = unit.lower()
    if u == "ppl":
        return f"{x:.2f}"
    if u.startswith("ppl ratio"):  # three decimals: 0.996 must not read as 1.00
        return f"{x:.3f}"
    if u.startswith("relative"):
        return f"{100 * x:.1f}%"
    if u.startswith("% median"):
        return f"{x:.1f}%"
    if u.startswith("%"):
        return f"{x:+.1f}%"
    if u.startswith("launches"):
        return f"{int(x)}"
    if u.startswith("max/min"):
        return f"{x:.1f}×" if x < 100 else f"{x:.0f}×"
    return f"{x:.2f}×"


def verdict_rows(items=(), ids=(), model: str = "smollm2-moe", root: "Path | None" = None) -> pd.DataFrame:
    """The claims about paper ``items`` (or with these ``ids``) as display rows: claim, paper, ours, verdict."""
    rows = [
        r
        for r in build_claims(model.replace("/", "--"), Path(root or results_dir()))
        if r["item"] in items or r["id"] in ids
    ]
    return pd.DataFrame(
        [
            {
                "claim": r["claim"],
                "paper": fmt_value(r["paper"], r["unit"]) if r["paper"] is not None else NOT_STATED,
                "ours": fmt_value(r["ours"], r["unit"]),
                "unit": r["unit"],
                "verdict": r["verdict"],
            }
            for r in rows
        ],
        columns=["claim", "paper", "ours", "unit", "verdict"],
    )


def verdicts(items=(), ids=(), model: str = "smollm2-moe", root: "Path | None" = None):
    """``verdict_rows`` styled for a chapter: verdicts coloured, no index. The Claims chapter has the notes."""
    return (
        verdict_rows(items, ids, model, root)
        .style.hide(axis="index")
        .map(lambda v: VERDICT_STYLE.get(v, ""), subset=["verdict"])
    )


# ---- tables beside the paper's


def _bits(x) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if _num(x) else "—"


def table1_frame(t1: dict) -> pd.DataFrame:
    """Our Table 1: bits, WikiText-2 PPL (2 decimals) and zero-shot accuracies in percent, paper column names."""
    rows = {}
    for label, r in t1.items():
        row = {"bits": f"{_bits(r['w_bits'])}-{_bits(r['a_bits'])}", "PPL": f"{r['ppl']:.2f}"}
        acc = {c: 100 * r.get("tasks", {})[t] for t, c in TASKS.items() if _num(r.get("tasks", {}).get(t))}
        row.update({c: f"{v:.1f}%" for c, v in acc.items()})
        if len(acc) == len(TASKS):
            row["Avg."] = f"{sum(acc.values()) / len(acc):.1f}%"
        rows[label] = row
    return pd.DataFrame(rows).T.fillna("—")


def table1_vs_paper(t1: dict) -> pd.DataFrame:
    """Table 1 as relative numbers, ours beside the paper's Qwen1.5-MoE and DeepSeek-V2-Lite rows:
    PPL over full precision, and the 7-task mean accuracy in points relative to full precision."""

    def avg(r):
        acc = [100 * r["tasks"][t] for t in TASKS if _num(r.get("tasks", {}).get(t))]
        return sum(acc) / len(acc) if len(acc) == len(TASKS) else None

    fp = t1.get("fp16")
    out = {}
    for label, (method, bits) in TABLE1_PAPER.items():
        r = t1.get(label)
        row = {"method": f"{method} {bits}", "ours: PPL / full": f"{r['ppl'] / fp['ppl']:.2f}×" if r and fp else "—"}
        a, a0 = (avg(r) if r else None), (avg(fp) if fp else None)
        row["ours: Avg. vs full"] = f"{a - a0:+.1f} pts" if a is not None and a0 is not None else "—"
        for m in PAPER_MODELS:
            p, p0 = paper.table1_row(m, method, bits), paper.table1_row(m, "Baseline", "16-16")
            row[f"{m}: PPL / full"] = f"{p['ppl'] / p0['ppl']:.2f}×"
            row[f"{m}: Avg. vs full"] = f"{p['avg'] - p0['avg']:+.1f} pts"
        out[label] = row
    return pd.DataFrame(out).T


def table1_targets(t1: dict) -> pd.DataFrame:
    """The Table 1 targets the embedded model was built for (``TABLE1_TARGETS``) against our PPL ratios; rows whose
    two Table 1 rows are not both present are left out."""
    rows = []
    for measure, ours, ref, target, limit in TABLE1_TARGETS:
        if ours in t1 and ref in t1:
            a, b = t1[ours]["ppl"], t1[ref]["ppl"]
            rows.append(
                {
                    "measure": f"{measure}, WikiText-2 PPL",
                    "target": target,
                    "measured": f"{a:.2f} / {b:.2f} = {a / b:.3f}×",
                    "met": "met" if a / b <= limit else "missed",
                }
            )
    return pd.DataFrame(rows, columns=["measure", "target", "measured", "met"]).set_index("measure")


def table3_vs_paper(t3: dict) -> pd.DataFrame:
    """Table 3: PPL at linear-block and expert granularity (W5A5) and their ratio, ours and the paper's."""
    rows = {}
    lin, exp = (t3.get("linear block") or {}).get("ppl"), (t3.get("expert") or {}).get("ppl")
    rows["ours"] = {
        "PPL linear-block": f"{lin:.2f}" if _num(lin) else "—",
        "PPL expert": f"{exp:.2f}" if _num(exp) else "—",
        "linear / expert": f"{lin / exp:.3f}" if _num(lin) and _num(exp) else "—",
    }
    for r in paper.item("table3")["rows"]:
        rows[f"paper, {r['model']}"] = {
            "PPL linear-block": f"{r['ppl_linear']:.2f}",
            "PPL expert": f"{r['ppl_expert']:.2f}",
            "linear / expert": f"{r['ppl_linear'] / r['ppl_expert']:.3f}",
        }
    return pd.DataFrame(rows).T


def table4_vs_paper(grid: pd.DataFrame, fp_ppl: "float | None" = None) -> pd.DataFrame:
    """Table 4: our RTN PPL grid (weight bits x activation bits) beside the paper's, as "ours | paper" per cell.
    The models differ, so both are also shown over their own best cell (w8a8 for the paper)."""
    ppl = paper.item("table4")["ppl"]
    cells = {}
    for w in grid.index:
        cells[w] = {}
        for a in grid.columns:
            ours = grid.loc[w, a]
            theirs = ppl.get(str(w), {}).get(str(a))
            o = f"{ours:.2f}" if _num(ours) else "—"
            t = f"{theirs:.2f}" if _num(theirs) else NOT_STATED
            cells[w][a] = f"{o} | {t}"
    out = pd.DataFrame(cells).T
    out.index.name, out.columns.name = "W bits", "A bits (ours | paper)"
    return out


def table5_vs_paper(t5: dict) -> pd.DataFrame:
    """Table 5: uniform rotated w4a4..w8a8 and the mixed 5-bit allocation, PPL (ours, paper) and each over w8a8."""
    p = paper.item("table5")["ppl"]
    uni, mixed = p["QuaRot (uniform)"], p["MxMoE (mixed)"]["w5a5"]
    cols = ["w4a4", "w5a5", "w6a6", "w7a7", "w8a8"]
    ours = {c: t5.get(c) for c in cols} | {"mixed 5-bit": t5.get("mxmoe-w5a5")}
    theirs = {c: uni.get(c) for c in cols} | {"mixed 5-bit": mixed}

    def row(d, rel):
        base = d.get("w8a8")
        if rel:
            return {k: f"{v / base:.2f}×" if _num(v) and _num(base) else "—" for k, v in d.items()}
        return {k: f"{v:.2f}" if _num(v) else "—" for k, v in d.items()}

    return pd.DataFrame(
        {
            "ours: PPL": row(ours, False),
            "paper (Qwen1.5-MoE): PPL": row(theirs, False),
            "ours: PPL / w8a8": row(ours, True),
            "paper: PPL / w8a8": row(theirs, True),
        }
    ).T


def fig5_vs_paper(paper5: pd.DataFrame, ours: "pd.DataFrame | None" = None) -> pd.DataFrame:
    """Figure 5's stated numbers beside ours: mixed precision over full precision at 512 and 8192 tokens
    (range over the paper models' shapes), and MxMoE W5A5 over w8a8. ``paper5``: the paper models' block
    throughput (``mxmoe.bench.runs.paper_models_figure5``); ``ours``: our model's figure5 rows."""
    rows = []
    mixed = paper5[paper5.setting.str.startswith("mix")] if len(paper5) else paper5
    for batch, key in ((512, "mixed_vs_full_precision_512"), (8192, "mixed_vs_full_precision_8192")):
        s = mixed[mixed.batch == batch].speedup_vs_fp16 if len(mixed) else pd.Series(dtype=float)
        lo, hi = paper.value("fig5", key)
        rows.append(
            {
                "statement": f"mixed precision over full precision, {batch} tokens",
                "paper (RTX 4090)": f"{lo:.2f}–{hi:.2f}×",
                "ours (paper models' shapes)": f"{s.min():.2f}–{s.max():.2f}×" if len(s) else "—",
            }
        )
    w = paper.value("fig5", "w5a5_vs_w8a8_8192_max")
    got = "—"
    if ours is not None and len(ours):
        t = ours.pivot_table(index="setting", columns="batch", values="tokens_per_s")
        if {"mxmoe-w5a5", "w8a8"} <= set(t.index):
            g = 100 * (t.loc["mxmoe-w5a5"] / t.loc["w8a8"] - 1)
            got = ", ".join(f"{v:+.1f}% ({b})" for b, v in g.items())
    rows.append(
        {
            "statement": "MxMoE W5A5 over uniform w8a8 (up to, 8192 tokens)",
            "paper (RTX 4090)": f"+{w:.1f}%",
            "ours (paper models' shapes)": got,
        }
    )
    out = pd.DataFrame(rows).set_index("statement")
    return out.rename(columns={"ours (paper models' shapes)": "ours (MoE blocks)"})


def fig6_vs_paper(f6: pd.DataFrame) -> pd.DataFrame:
    """Figure 6's direction: from the smallest to the largest r, how PPL and throughput move (ours, paper)."""
    f = f6.dropna(subset=["ppl"]).sort_values("r")
    rows = []
    if len(f) >= 2:
        lo, hi = f.iloc[0], f.iloc[-1]
        rows.append(
            {
                "as r rises": "PPL",
                "paper": "falls (more accurate)",
                "ours": f"{lo.ppl:.2f} → {hi.ppl:.2f} ({'falls' if hi.ppl <= lo.ppl else 'rises'})",
            }
        )
        if _num(lo.get("tokens_per_s")) and _num(hi.get("tokens_per_s")):
            rows.append(
                {
                    "as r rises": "MoE-block throughput",
                    "paper": "falls (slower)",
                    "ours": f"{hi.tokens_per_s / lo.tokens_per_s:.2f}× of r={lo.r:g}'s "
                    f"({'falls' if hi.tokens_per_s < lo.tokens_per_s else 'rises'})",
                }
            )
    return pd.DataFrame(rows, columns=["as r rises", "paper", "ours"]).set_index("as r rises")


def table6_vs_paper(t6: pd.DataFrame) -> pd.DataFrame:
    """Table 6: the specialised (fused) launch over the unified kernel, the paper's two W4A4 ratios beside
    the range and median of ours over every mix, shape and token count."""
    rows = {r["kernel"]: r for r in paper.item("table6")["rows"]}
    uni = rows["Unified kernel"]
    pc = rows["W4A4 per-channel (specialized)"]["w4a4_per_channel"] / uni["w4a4_per_channel"]
    g = rows["W4A4 group128 (specialized)"]["w4a4_group128"] / uni["w4a4_group128"]
    s = t6.fused_vs_unified if len(t6) else pd.Series(dtype=float)
    ours = f"{s.min():.2f}–{s.max():.2f}× (median {s.median():.2f}×, {len(s)} cases)" if len(s) else "—"
    return pd.DataFrame(
        {
            "specialised over unified": {
                "paper: W4A4 per-channel, 8192³ (RTX 4090)": f"{pc:.2f}×",
                "paper: W4A4 group-128, 8192³ (RTX 4090)": f"{g:.2f}×",
                "ours: fused mixes over unified, grouped GEMMs": ours,
            }
        }
    )


def table7_vs_paper(t7: dict) -> pd.DataFrame:
    """Table 7: how the W5A5 allocation of one layer splits, share of experts per (block, scheme), ours
    (routed experts of the layer shown) beside the paper's Qwen1.5-MoE layer 5."""
    p = paper.item("table7")
    prow = p["rows"]

    def short(s):
        return str(s).removesuffix("_sym").removesuffix("_asym")

    def shares(rows):
        n = len(rows)
        out = {}
        for block in ("gate", "down"):
            for scheme in ("w8a8_g-1", "w4a4_g-1", "w4a4_g128"):
                out[f"{block}{'/up' if block == 'gate' else ''} {scheme}"] = (
                    sum(short(r[block]) == scheme for r in rows) / n
                )
        return out, n

    ours_rows = [{"gate": v[0], "up": v[1], "down": v[2]} for e, v in t7.items() if not str(e).startswith("shared")]
    ours, n_ours = shares(ours_rows) if ours_rows else ({}, 0)
    theirs, n_theirs = shares(prow)
    keys = list(theirs)
    return pd.DataFrame(
        {
            f"ours ({n_ours} experts)": {k: f"{100 * ours[k]:.0f}%" if k in ours else "—" for k in keys},
            f"paper, Qwen1.5-MoE layer {p['layer']} ({n_theirs} experts)": {k: f"{100 * theirs[k]:.0f}%" for k in keys},
        }
    )


def table2_vs_paper(card: dict) -> pd.DataFrame:
    """Table 2: the paper's models (parameters, experts, top-k) and ours (``card``: name, parameters,
    experts, top_k as display strings)."""
    rows = [
        {
            "model": r["model"],
            "parameters": f"{r['params_gb']:.1f} GB",
            "experts (routed+shared)": str(r["experts"]),
            "top-k": r["top_k"],
            "source": "paper, Table 2",
        }
        for r in paper.item("table2")["rows"]
    ]
    rows.append(
        {
            "model": card.get("name", "ours"),
            "parameters": card.get("parameters", "—"),
            "experts (routed+shared)": str(card.get("experts", "—")),
            "top-k": card.get("top_k", "—"),
            "source": "ours (this book)",
        }
    )
    return pd.DataFrame(rows).set_index("model")


def roofline_vs_paper(roofline: dict, n: int, k: int) -> pd.DataFrame:
    """Figure 1b (left): below how many rows per expert a low-weight-bit scheme beats a weight-activation one on
    the roofline, the paper's RTX 4090 values (arithmetic intensity, ~ rows for N, K >> rows) beside ours on the
    measured Hopper ceilings (one expert of shape [N, K]; Hopper runs w4a4 as an int8 dot)."""
    from mxmoe.plots.kernels import faster_below

    item = paper.item("fig1b")
    pairs = [
        (
            "W4A16 beats W8A8 below",
            (4, 16, "bf16"),
            (8, 8, "int8"),
            item["w4a16_beats_w8a8_below_arithmetic_intensity"],
        ),
        (
            "W2A16 beats W4A4 below",
            (2, 16, "bf16"),
            (4, 8, "int8"),
            item["w2a16_beats_w4a4_below_arithmetic_intensity"],
        ),
    ]
    rows = {}
    for label, low, high, stated in pairs:
        ours = faster_below(roofline, low, high, n, k)
        rows[label] = {
            "paper (RTX 4090)": f"{stated} rows",
            "ours (measured ceilings)": f"{ours:.0f} rows"
            if _num(ours)
            else ("always" if ours == float("inf") else "never"),
        }
    return pd.DataFrame(rows).T
