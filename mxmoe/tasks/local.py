"""Functions the task YAMLs in this folder call: local JSONL files and the HellaSwag query.

lm-eval imports this file by path (``!function local.<name>``); it is not imported by mxmoe.
"""

from __future__ import annotations

import re

import datasets

from mxmoe.data import ENV_VAR, data_dir
from mxmoe.errors import DataUnavailable


def load_local(data_files: dict[str, str], **_) -> datasets.DatasetDict:
    """``load_dataset("json", data_files=...)`` with each file taken from $MXMOE_DATA_DIR/tasks/.

    lm-eval calls it with the task's metadata and dataset_kwargs; only ``data_files`` is used.
    """
    root = data_dir()
    if root is None:
        raise DataUnavailable(f"the mxmoe_* zero-shot tasks read local files: set {ENV_VAR}")
    files = {split: root / "tasks" / name for split, name in data_files.items()}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DataUnavailable(f"zero-shot task file(s) missing: {', '.join(missing)} ({ENV_VAR}={root})")
    return datasets.load_dataset("json", data_files={k: str(p) for k, p in files.items()})


def _preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocess; on the cleaned local text it only drops leftover [..] spans
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _capitalise_last_sentence(ctx: str) -> str:
    # lm-eval capitalises ctx_b; the local file has ctx = ctx_a + " " + ctx_b, so upper-case the
    # first letter after the last sentence end (data README: a close approximation)
    ends = list(re.finditer(r"[.!?]\s+", ctx))
    i = ends[-1].end() if ends else 0
    return ctx[:i] + ctx[i : i + 1].upper() + ctx[i + 1 :]


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add lm-eval's ``query`` (``f"{activity_label}: {ctx}"``) and cleaned ``choices`` to each row."""

    def one(doc: dict) -> dict:
        query = f"{doc['activity_label']}: {_capitalise_last_sentence(doc['ctx'])}"
        return {"query": _preprocess(query), "choices": [_preprocess(e) for e in doc["endings"]]}

    return dataset.map(one)
