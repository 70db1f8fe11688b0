"""What chapters show beside their figures: display formats, the paper's numbers beside ours, verdict rows."""

from __future__ import annotations

import json

import pandas as pd

from mxmoe import paper
from mxmoe.claims import chapter


def test_formats_percent_ppl_and_speedups():
    assert chapter.fmt_value(0.214, "relative PPL reduction") == "21.4%"
    assert chapter.fmt_value(29.4, "% faster than w8a8") == "+29.4%"
    assert chapter.fmt_value([1.6, 2.7], "x vs bf16 grouped GEMM") == "1.60–2.70×"
    assert chapter.fmt_value([32.196, 30.68], "PPL at smallest, largest r") == "32.20 → 30.68"
    assert chapter.fmt_value(0.9957, "PPL ratio linear/expert") == "0.996"
    assert chapter.fmt_value(1.18, "throughput ratio r=0 / r=1") == "1.18×"
    assert chapter.fmt_value(None, "x") == "—"


def test_table1_shows_percentages_not_fractions():
    t1 = {
        "fp16": {"w_bits": 16, "a_bits": 16, "ppl": 29.254, "tasks": {t: 0.4 for t in chapter.TASKS}},
        "mxmoe-w5a5": {"w_bits": 5, "a_bits": 4.88194, "ppl": 30.79, "tasks": {"arc_easy": 0.1}},
    }
    f = chapter.table1_frame(t1)
    assert f.loc["fp16", "PPL"] == "29.25" and f.loc["fp16", "AE"] == "40.0%" and f.loc["fp16", "Avg."] == "40.0%"
    assert f.loc["mxmoe-w5a5", "bits"] == "5-4.88" and f.loc["mxmoe-w5a5", "AC"] == "—"
    rel = chapter.table1_vs_paper(t1)
    assert rel.loc["quarot-w4a4", "ours: PPL / full"] == "—"  # no row: no invented number
    assert rel.loc["quarot-w4a4", "Qwen1.5-MoE: PPL / full"] == f"{18.44 / 6.79:.2f}×"


def test_table1_targets_judge_the_ppl_ratios_and_leave_out_missing_rows():
    t1 = {"fp16": {"ppl": 40.0}, "mxmoe-w5a5": {"ppl": 44.0}, "gptq*-2.25": {"ppl": 100.0}, "mxmoe-2.25": {"ppl": 85.5}}
    f = chapter.table1_targets(t1)
    assert list(f.index) == ["MxMoE 2.25 vs GPTQ* 2.25, WikiText-2 PPL", "MxMoE W5A5 vs full precision, WikiText-2 PPL"]
    assert f["met"].tolist() == ["missed", "met"]  # 0.855x is not 15% lower; 1.10x is within 1.10x
    assert f.iloc[0]["measured"] == "85.50 / 100.00 = 0.855×"
    assert chapter.table1_targets({}).empty


def test_tables_beside_the_paper_read_docs_paper_results():
    grid = pd.DataFrame([[40.0, 20.0]], index=[4], columns=[4, 8])
    cell = chapter.table4_vs_paper(grid).loc[4, 4]
    assert cell == f"40.00 | {paper.item('table4')['ppl']['4']['4']:.2f}"
    t5 = chapter.table5_vs_paper({"w4a4": 30.0, "w8a8": 27.0, "mxmoe-w5a5": 28.0})
    assert t5.loc["paper (Qwen1.5-MoE): PPL", "mixed 5-bit"] == "7.16" and t5.loc["ours: PPL", "w5a5"] == "—"
    empty = chapter.fig5_vs_paper(pd.DataFrame())
    assert list(empty["ours (MoE blocks)"]) == ["—", "—", "—"] and empty.iloc[0, 0] == "1.60–2.70×"
    t7 = chapter.table7_vs_paper({0: ["w8a8_g-1_sym"] * 3, "shared0": ["w4a4_g128_sym"] * 3})
    assert t7.iloc[:, 0]["down w8a8_g-1"] == "100%"  # shared experts left out
    assert t7.iloc[:, 1]["down w8a8_g-1"] == f"{100 * 35 / 61:.0f}%"


def test_verdict_rows_of_one_item(tmp_path):
    p = tmp_path / "m" / "eval" / "table1.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"fp16": {"ppl": 10.0}, "mxmoe-w5a5": {"ppl": 10.5}, "quarot-w4a4": {"ppl": 11.0}}))
    rows = chapter.verdict_rows(["table1"], model="m", root=tmp_path).set_index("claim")
    assert len(rows) == 4 and set(rows.verdict) <= {"reproduced", "direction", "not-run"}
    far = rows[rows.index.str.startswith("Uniform W4A4")].iloc[0]
    assert far.paper == "2.630" and far.ours == "1.050" and far.verdict == "direction"
