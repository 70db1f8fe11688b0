"""The paper's own numbers, as the research notes record them.

Every number that the MxMoE paper (Duanmu et al., ICML 2025, arXiv 2505.05799) reports for its
Figures 1-6 and Tables 1-7 is in ``docs/paper_results.json``, keyed by item (``fig1a`` ... ``table7``);
``docs/paper_results.md`` is the same data as a page, with the section each number comes from. A value
the paper only plots is ``None`` there, never estimated. The chapters read these to show the paper's
value beside ours; the claims read them for their paper values.
"""

from __future__ import annotations

import json
from functools import lru_cache

from mxmoe.env import REPO_ROOT

PAPER_RESULTS = REPO_ROOT / "docs" / "paper_results.json"
SOURCE = "docs/paper_results.md"  # where a reader checks a number against its section


@lru_cache(maxsize=1)
def paper_results() -> dict:
    """The whole of docs/paper_results.json (``{"source", "read_from", "conventions", "items"}``)."""
    return json.loads(PAPER_RESULTS.read_text())


def item(name: str) -> dict:
    """One paper item (``"table1"``, ``"fig5"``, ``"abstract"``, ...) from docs/paper_results.json."""
    items = paper_results()["items"]
    if name not in items:
        raise KeyError(f"docs/paper_results.json has no item {name!r}; items: {sorted(items)}")
    return items[name]


def value(name: str, key: str):
    """The ``value`` of an entry of a paper item, e.g. ``value("fig5", "mixed_vs_full_precision_512")``."""
    entry = item(name)[key]
    return entry["value"] if isinstance(entry, dict) and "value" in entry else entry


def section(name: str) -> str:
    """The paper section a paper item comes from ("5.2, Table 1")."""
    return item(name)["section"]


def table1_rows(model: "str | None" = None) -> list[dict]:
    """Table 1's rows (model, method, bits, seven task accuracies in percent, avg, ppl), of one model or all."""
    rows = item("table1")["rows"]
    return [r for r in rows if model is None or r["model"] == model]


def table1_row(model: str, method: str, bits: str) -> dict:
    """The Table 1 row of ``model`` for ``method`` ("Baseline", "GPTQ*", "QuaRot", "MxMoE") at ``bits`` ("2.25-16")."""
    for r in table1_rows(model):
        if r["method"] == method and r["bits"] == bits:
            return r
    raise KeyError(f"Table 1 has no row {model} / {method} / {bits}")
