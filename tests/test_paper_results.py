"""docs/paper_results.json: the paper's numbers, one entry per paper figure and table the stages show,
internally consistent (Table 1's averages) and agreeing with the paper values in mxmoe.claims."""

from __future__ import annotations

import json

from mxmoe.claims.rules import CLAIMS
from mxmoe.env import REPO_ROOT
from mxmoe.stages import paper_items

DOC = json.loads((REPO_ROOT / "docs" / "paper_results.json").read_text())
ACC = ("AC", "AE", "HS", "LO", "LS", "PQ", "WG")


def test_every_paper_item_has_an_entry_with_its_section():
    items, known = DOC["items"], paper_items()
    missing = sorted(set(known) - set(items))
    assert not missing, f"docs/paper_results.json lacks {missing}"
    assert all(items[k].get("section") for k in known)


def test_table1_averages_are_the_mean_of_the_seven_tasks():
    rows = DOC["items"]["table1"]["rows"]
    assert len(rows) == 28 and {r["model"] for r in rows} == {
        "DeepSeek-V2-Lite",
        "Qwen1.5-MoE",
        "Qwen2-MoE",
        "Mixtral-8x7B",
    }
    for r in rows:  # a transcription slip in any cell shows up here
        assert abs(sum(r[c] for c in ACC) / 7 - r["avg"]) < 0.006, r


def test_claims_paper_values_match_the_notes():
    rows = {(r["model"], r["method"], r["bits"]): r for r in DOC["items"]["table1"]["rows"]}
    gptq, ours = rows[("Qwen1.5-MoE", "GPTQ*", "2.25-16")]["ppl"], rows[("Qwen1.5-MoE", "MxMoE", "2.25-16")]["ppl"]
    abstract = DOC["items"]["abstract"]
    assert round(gptq - ours, 1) == abstract["ppl_gain_vs_gptq_2.25bit"]["value"]
    paper = {cid: value for cid, _, _, value, *_ in CLAIMS}
    assert paper["ppl-2.25bit"] == round((gptq - ours) / gptq, 3)
    assert paper["mix5-vs-w8a8"] == paper["w5a5-vs-w8a8-block"] == abstract["speedup_vs_uniform_w5a5_max"]["value"]
    assert paper["speedup-vs-fp"] == abstract["speedup_vs_full_precision_max"]["value"]
    assert paper["mix4.25-speedup"] == DOC["items"]["fig5"]["mixed_vs_full_precision_512"]["value"]
    t1 = {(r["method"], r["bits"]): r["ppl"] for r in DOC["items"]["table1"]["rows"] if r["model"] == "Qwen1.5-MoE"}
    assert paper["w4a4-vs-w5a5"] == round(t1[("QuaRot", "4-4")] / t1[("MxMoE", "5-5")], 2)
    assert paper["w5a5-near-fp"] == round(t1[("MxMoE", "5-5")] / t1[("Baseline", "16-16")], 3)
    assert paper["routing-skew"] == DOC["items"]["fig1b"]["expert_frequency_spread_min"]["value"]


def test_no_claim_uses_a_value_the_paper_does_not_state():
    assert "project_target_not_in_text" not in DOC["items"]["fig5"]


def test_the_notes_page_shows_every_table_number():
    text = (REPO_ROOT / "docs" / "paper_results.md").read_text()
    for r in DOC["items"]["table1"]["rows"]:
        assert f"{r['ppl']:.2f}" in text and f"{r['avg']:.2f}" in text
    for row in DOC["items"]["table4"]["ppl"].values():
        assert all(f"{v:.3f}" in text for v in row.values())
