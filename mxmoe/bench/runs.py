"""Which kernel benchmark runs count, and reading them: the one rule notebooks, figures and claims share.

A benchmark document is what ``mxmoe bench gemm`` writes (``bench_<gpu>[_<tag>].json``). A *case* is
one (model, gemm, tokens). ``bench_docs`` lists the runs of a results folder in the order cases are
taken: the runs named in ``COUNTED`` first (in that order), then any other run, H100 before other
cards, the run covering the most paper-shape GEMMs first (a partial re-run must not hide a full one),
newest first. ``case_rows`` merges them, each case from the first run that has it, remembering the
file and timer it came from, so every number stays traceable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mxmoe.bench.cases import PAPER
from mxmoe.files import write_json_atomic
from mxmoe.paths import kernel_results_dir, results_dir
from mxmoe.plan import BATCHES

# relative error against reference_group_gemm above which a timed row's output is wrong (fp8 and bf16 rounding
# give ~0.002): such a row counts for no target
WRONG_OUTPUT = 0.02


def wrong_output(row: dict) -> bool:
    """True when a benchmark row's output was checked and is farther than ``WRONG_OUTPUT`` from the reference."""
    return (row.get("rel_err_vs_reference") or 0.0) > WRONG_OUTPUT


def wrong_outputs(df: pd.DataFrame) -> pd.Series:
    """``wrong_output`` of every row of a frame of benchmark rows (bool [rows]; an unchecked row is not wrong)."""
    err = df["rel_err_vs_reference"] if "rel_err_vs_reference" in df else pd.Series(0.0, index=df.index)
    return err.fillna(0.0) > WRONG_OUTPUT


# The committed H100 runs of the current kernel, in the order cases are taken: CUDA-graph replays of the
# decode size (16 tokens) of Qwen1.5-MoE, DeepSeek-V2-Lite and Qwen3-30B (with Qwen3-30B's Table 6 launches;
# a captured decode step runs its 35-75 us GEMMs back to back with a warm L2), the paper shapes timed one call
# per L2 flush with CUDA events (Table 6 on four models), and the CUDA-graph run of smollm2-moe's GEMMs of a
# few microseconds (and of Qwen1.5-MoE's, which notebook 03 pairs with their event-timed rows).
COUNTED = (
    "bench_NVIDIA_H100_80GB_HBM3_2a57a78_graph16.json",
    "bench_NVIDIA_H100_80GB_HBM3_2a57a78_all.json",
    "bench_NVIDIA_H100_80GB_HBM3_2a57a78_cudagraph.json",
)


def load_bench(path: "str | Path") -> dict:
    """One benchmark document, with its file name under ``_file``."""
    doc = json.loads(Path(path).read_text())
    doc["_file"] = Path(path).name
    return doc


def paper_rows(doc: dict) -> "list[dict]":
    """Rows of a document on the paper's model shapes (smollm2-moe's tiny GEMMs time launch overhead)."""
    return [r for r in doc.get("results", []) if r.get("model") in PAPER]


def _rank(doc: dict) -> tuple:
    name = doc["_file"]
    if name in COUNTED:
        return (0, COUNTED.index(name))
    prov = doc.get("provenance", {})
    cases = {(r.get("model"), r.get("gemm"), r.get("tokens")) for r in paper_rows(doc)}
    return (1, "H100" not in prov.get("device", name), -len(cases), _neg(prov.get("date_utc", "")), name)


def _neg(date: str) -> str:
    """A sort key that puts later ISO dates first."""
    return "".join(chr(0x10FFFF - ord(c)) for c in date)


def bench_docs(folder: "str | Path") -> "list[dict]":
    """Every benchmark document of ``folder`` in the order its cases count (module docstring)."""
    docs = [load_bench(p) for p in Path(folder).glob("bench_*.json")]
    return sorted(docs, key=_rank)


def case_rows(docs: "list[dict]") -> pd.DataFrame:
    """Result rows of several documents, each case from the first document that has it.

    Adds columns ``source`` (file), ``timer`` (events / cudagraph), ``device`` and ``kernel_commit``.
    """
    seen: set = set()
    frames = []
    for d in docs:
        rows = [r for r in d.get("results", []) if (r["model"], r["gemm"], r["tokens"]) not in seen]
        if not rows:
            continue
        df = pd.DataFrame(rows)
        df["source"], df["timer"] = d["_file"], d.get("timer_kind", "events")
        df["device"], df["kernel_commit"] = d["provenance"]["device"], d["provenance"].get("git_commit")
        seen |= {(r["model"], r["gemm"], r["tokens"]) for r in rows}
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def block_times(df: pd.DataFrame, variants) -> pd.DataFrame:
    """MoE block GEMM time (gate_up + down, GEMM launches only) per model, tokens and variant, and its
    speedup over torch's bf16 grouped GEMM; only (model, tokens) with both GEMMs measured."""
    d = df[df.variant.isin(variants) & df.ms.notna()]
    t = d.pivot_table(index=["model", "tokens", "variant"], columns="gemm", values="ms").dropna()
    t["block_us"] = (t["gate_up"] + t["down"]) * 1e3
    t = t.reset_index()
    base = t[t.variant == "torch_grouped_bf16"].set_index(["model", "tokens"]).block_us
    t["speedup_vs_torch_grouped"] = [
        base.get((m, tok), np.nan) / us for m, tok, us in zip(t.model, t.tokens, t.block_us)
    ]
    t["tokens_per_s"] = t.tokens / (t.block_us * 1e-6)
    return t


# Figure 5 panels of the paper's models (no weights here: throughput only) -> benchmark variant per setting
PAPER_FIG5_VARIANTS = {
    "fp16": "torch_grouped_bf16",
    "w4a16": "ours_w4a16_g128",
    "w8a8": "ours_w8a8_int8",
    "w4a4": "ours_w4a4_g-1",
    "mix 4.25 (w4a16+w8a8)": "ours_mix4.25_w4a16+w8a8",
    "mix 5 (w4a4+w8a8)": "ours_mix5_w4a4+w8a8",
    "mix 4.25 fp8 (w4a8+w8a8 fp8)": "ours_mix4.25_w4a8+w8a8_fp8",
}


def paper_model_throughput(bench_files, batches=(512, 8192)) -> "pd.DataFrame":
    """Figure 5 rows for the paper's models from kernel benchmark files: MoE-block (gate_up + down GEMM)
    tokens/s per model, batch and setting, and the speedup over fp16 (torch's bf16 grouped GEMM).

    Their weights cannot be loaded here, so there is no PPL and no allocation: the mixes are the
    benchmark's fixed expert mixes at the named average width, not MxMoE allocations.
    """
    blocks = block_times(case_rows([load_bench(f) for f in bench_files]), tuple(PAPER_FIG5_VARIANTS.values()))
    blocks = blocks[blocks.model.isin(PAPER) & blocks.tokens.isin(batches)]
    setting = {v: k for k, v in PAPER_FIG5_VARIANTS.items()}
    rows = blocks.assign(setting=blocks.variant.map(setting), batch=blocks.tokens)
    rows = rows.drop_duplicates(["model", "batch", "setting"])  # the first file that measured a case wins
    order = {k: i for i, k in enumerate(PAPER_FIG5_VARIANTS)}
    rows = rows.sort_values(["model", "batch", "setting"], key=lambda c: c.map(order) if c.name == "setting" else c)
    return (
        rows[["model", "batch", "setting", "block_us", "tokens_per_s", "speedup_vs_torch_grouped"]]
        .rename(columns={"speedup_vs_torch_grouped": "speedup_vs_fp16"})
        .reset_index(drop=True)
    )


def paper_models_figure5(rows_of_model: "list[dict]", profile: str) -> "tuple[pd.DataFrame, str]":
    """Figure 5 rows of the paper's models (throughput only) from the benchmark runs that count, and the
    shared results/kernels/figure5.json with ``rows_of_model`` (this model's Figure 5 rows) beside them.
    Returns (the paper models' rows, the device of the runs)."""
    docs = bench_docs(kernel_results_dir())
    files = [kernel_results_dir() / d["_file"] for d in docs]
    paper = paper_model_throughput(files, BATCHES)
    device = docs[0]["provenance"]["device"] if docs else "none"
    write_json_atomic(
        results_dir() / "kernels" / "figure5.json",
        {
            "profile": profile,
            "rows": rows_of_model
            + [
                {**r, "ppl": None, "device": device, "time_source": "measured: kernel benchmark (fixed mixes)"}
                for r in paper.to_dict("records")
            ],
        },
    )
    return paper, device
