"""Evaluation, calibration and training text: a local folder ($MXMOE_DATA_DIR) or the HF hub.

Layout and schemas of the local folder: the README.md of the folder $MXMOE_DATA_DIR names. Every loader tries the local
file first; when MXMOE_DATA_DIR is unset it falls back to Hugging Face ``datasets``; when neither
works it raises one :class:`DataUnavailable` naming both sources and the variable to set.

Texts:  ``wikitext2`` (splits test/train/valid; train and valid are byte prefixes locally),
        ``c4`` (validation documents), ``gutenberg`` and ``sotu`` (training corpora, local only).
Tasks:  arc_easy, arc_challenge, piqa, winogrande, lambada_openai, lambada_standard, hellaswag,
        boolq — rows in the local files' schema whichever source they come from.
"""

from __future__ import annotations

import json
import lzma
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from mxmoe.errors import DataUnavailable

ENV_VAR = "MXMOE_DATA_DIR"

_LOCAL_TEXT = {
    ("wikitext2", "test"): "wikitext-2/wiki.test.raw",
    ("wikitext2", "train"): "wikitext-2/wiki.train.prefix.raw",
    ("wikitext2", "valid"): "wikitext-2/wiki.valid.prefix.raw",
    ("c4", "validation"): "c4/c4_validation_2k.jsonl",
    ("gutenberg", "train"): "corpus/gutenberg.txt.xz",
    ("sotu", "train"): "corpus/sotu.txt.xz",
}
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "lambada_standard", "hellaswag", "boolq")


def data_dir() -> Path | None:
    """The local data folder from $MXMOE_DATA_DIR, or None when the variable is unset."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else None


def _unavailable(what: str, local: str, hub_error: Exception | None) -> DataUnavailable:
    root = data_dir()
    local_state = f"{ENV_VAR} is not set" if root is None else f"{root / local} does not exist"
    hub_state = "not tried" if hub_error is None else f"failed ({type(hub_error).__name__}: {str(hub_error)[:160]})"
    return DataUnavailable(
        f"{what} is not available: the local copy ({local_state}) and the Hugging Face hub ({hub_state}) "
        f"both failed. Set {ENV_VAR} to the project data folder (its README.md gives the layout), "
        f"or install `datasets` and connect to the hub."
    )


def _from_local_or_hub(
    what: str, local: str, read_local: Callable[[Path], object], read_hub: Callable[[], object] | None
):
    root = data_dir()
    if root is not None:
        if (root / local).exists():
            return read_local(root / local)
        raise _unavailable(what, local, None)
    if read_hub is None:
        raise _unavailable(what + " (local-only data)", local, None)
    try:
        return read_hub()
    except Exception as e:  # network, missing package, missing dataset: all mean "not reachable"
        raise _unavailable(what, local, e) from None


def _hub(path: str, name: str | None = None, split: str = "test", **kw):
    import datasets  # optional dependency, only for the hub fallback

    return datasets.load_dataset(path, name, split=split, **kw)


@lru_cache(maxsize=8)
def load_text(name: str, split: str = "test") -> str:
    """One text as a single string: WikiText splits joined GPTQ-style with "\\n\\n"; C4 and corpora by document."""
    key = (name, split)
    if key not in _LOCAL_TEXT:
        raise ValueError(f"unknown text {name!r} split {split!r}; known: {sorted(_LOCAL_TEXT)}")
    local = _LOCAL_TEXT[key]
    what = f"{name} ({split})"
    if name == "wikitext2":

        def read_local(p: Path) -> str:
            lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
            return "\n\n".join(line if line.strip() else "" for line in lines)

        def read_hub() -> str:
            hf_split = {"valid": "validation"}.get(split, split)
            return "\n\n".join(_hub("wikitext", "wikitext-2-raw-v1", hf_split)["text"])

        return _from_local_or_hub(what, local, read_local, read_hub)
    if name == "c4":

        def read_local(p: Path) -> str:
            with open(p, encoding="utf-8") as f:
                return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())

        def read_hub() -> str:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
            return "\n\n".join(_hub("allenai/c4", None, "validation", data_files=files)["text"][:2000])

        return _from_local_or_hub(what, local, read_local, read_hub)
    # training corpora: xz-compressed, local only
    return _from_local_or_hub(what, local, lambda p: lzma.open(p, "rt", encoding="utf-8").read(), None)


def _winogrande_row(r: dict) -> dict:
    cut = r["sentence"].index("_")
    return {
        "context_options": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
        "continuation": r["sentence"][cut + 1 :].strip(),
        "label": int(r["answer"]) - 1,
    }


def _arc_row(r: dict) -> dict:
    """An ARC row (either set) in the schema of the local task files."""
    return {
        "question": r["question"],
        "choices": r["choices"]["text"],
        "label_index": r["choices"]["label"].index(r["answerKey"]),
    }


_TASK_HUB = {
    "arc_easy": (("allenai/ai2_arc", "ARC-Easy", "test"), _arc_row),
    "arc_challenge": (("allenai/ai2_arc", "ARC-Challenge", "test"), _arc_row),
    "piqa": (("baber/piqa", None, "validation"), lambda r: {k: r[k] for k in ("goal", "sol1", "sol2", "label")}),
    "winogrande": (("allenai/winogrande", "winogrande_xl", "validation"), _winogrande_row),
    "lambada_openai": (("EleutherAI/lambada_openai", "default", "test"), lambda r: {"text": r["text"]}),
    "lambada_standard": (("cimec/lambada", None, "test"), lambda r: {"text": r["text"]}),
    "hellaswag": (
        ("Rowan/hellaswag", None, "validation"),
        lambda r: {
            "activity_label": r["activity_label"],
            "ctx": r["ctx"],
            "endings": r["endings"],
            "label": int(r["label"]),
        },
    ),
    "boolq": (
        ("aps/super_glue", "boolq", "validation"),
        lambda r: {"passage": r["passage"], "question": r["question"], "label": int(r["label"])},
    ),
}


@lru_cache(maxsize=16)
def _load_task_cached(name: str) -> tuple:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    (path, config, split), convert = _TASK_HUB[name]

    def read_local(p: Path):
        with open(p, encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())

    def read_hub():
        return tuple(convert(r) for r in _hub(path, config, split))

    return _from_local_or_hub(f"zero-shot task {name}", f"tasks/{name}.jsonl", read_local, read_hub)


def load_task(name: str, limit: int | None = None) -> list[dict]:
    """Rows of a zero-shot task in the local files. schema (the data folder.s README.md), first ``limit`` rows."""
    rows = _load_task_cached(name)
    return list(rows if limit is None else rows[:limit])


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids [N] of one long text (no special tokens), tokenized in chunks of whole lines to bound memory."""
    ids: list[int] = []
    chunk, size = [], 0
    for piece in text.splitlines(keepends=True):
        chunk.append(piece)
        size += len(piece)
        if size > 1_000_000:
            ids += tokenizer("".join(chunk), add_special_tokens=False)["input_ids"]
            chunk, size = [], 0
    if chunk:
        ids += tokenizer("".join(chunk), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokenizer, source: str = "wikitext2", n: int = 128, seqlen: int = 2048, seed: int = 0, split: str | None = None
) -> torch.Tensor:
    """``n`` random token windows [n, seqlen] from a text, the same for the same (source, n, seqlen, seed).

    ``source`` is 'wikitext2' (train split), 'c4', 'gutenberg' or 'sotu'. Never use test or task data.
    """
    if n <= 0 or seqlen <= 0:
        raise ValueError(f"calibration windows need n > 0 and seqlen > 0, got n={n}, seqlen={seqlen}")
    split = split or {"c4": "validation"}.get(source, "train")
    if (source, split) == ("wikitext2", "test"):
        raise ValueError("refusing to calibrate on the WikiText-2 test split: use source='wikitext2' (train) or 'c4'")
    text = load_text(source, split)
    gen = torch.Generator().manual_seed(seed)
    if len(text) > _WHOLE_TEXT_CHARS:  # large corpora: tokenize only a slice around each window
        return torch.stack([_window_from_slice(tokenizer, text, seqlen, gen) for _ in range(n)])
    ids = tokenize_text(tokenizer, text)
    if ids.numel() <= seqlen:
        raise ValueError(f"{source} ({split}) has {ids.numel()} tokens, fewer than one window of {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)  # [n]
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # [n, seqlen]


_WHOLE_TEXT_CHARS = 4_000_000


def _window_from_slice(tokenizer, text: str, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    """One window [seqlen] from a random character slice of a large text (first, partial token dropped)."""
    span = seqlen * 16  # characters; ~4 per token leaves ample room
    for _ in range(100):
        start = int(torch.randint(0, len(text) - span, (1,), generator=gen))
        ids = tokenizer(text[start : start + span], add_special_tokens=False)["input_ids"][1:]
        if len(ids) >= seqlen:
            return torch.tensor(ids[:seqlen], dtype=torch.long)
    raise ValueError(f"could not find {seqlen} tokens in slices of {span} characters: is the text mostly whitespace?")
