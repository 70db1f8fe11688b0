"""Run profiles: how big every stage runs (smoke for CI, quick for a CPU, full for a GPU; sizes in ``mxmoe.plan``).

A notebook's ``parameters`` cell names a profile and may override single values; everything else
comes from here, so one profile means the same sizes in every notebook and in ``make reproduce``.
``smoke`` uses a tiny random-weight MoE and random token ids: it checks the plumbing in seconds
and its numbers mean nothing (every result it writes says ``profile: smoke``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mxmoe.data import calibration_windows
from mxmoe.errors import MxMoEError
from mxmoe.metrics import eval_windows
from mxmoe.plan import PROFILES, Profile


def default_profile() -> str:
    """'full' where a CUDA GPU is present, else 'quick'."""
    return "full" if torch.cuda.is_available() else "quick"


def get_profile(name: "str | None" = None, **overrides) -> Profile:
    """The named profile (default: ``default_profile()``) with single fields replaced, e.g. ``eval_windows=2``.

    Overrides that are ``None`` are ignored, so a notebook can pass its parameters through unchanged.
    """
    name = name or default_profile()
    if name not in PROFILES:
        raise MxMoEError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    fields = set(Profile.__dataclass_fields__) - {"name", "description"}
    unknown = set(overrides) - fields
    if unknown:
        raise MxMoEError(f"unknown profile field(s) {sorted(unknown)}; fields are {sorted(fields)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


def random_windows(vocab_size: int, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Seeded random token ids [n, seqlen] for models without a tokenizer (the smoke profile only)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, seqlen), generator=gen)


def calibration(model, tok, profile: Profile, source: str = "wikitext2", seed: int = 0) -> torch.Tensor:
    """Calibration windows [n, seqlen] of ``source`` (train split), or random ids when ``tok`` is None."""
    if tok is None:
        return random_windows(model.config.vocab_size, profile.calib_windows, profile.calib_seqlen, seed)
    return calibration_windows(tok, source, profile.calib_windows, profile.calib_seqlen, seed)


def evaluation(model, tok, profile: Profile) -> torch.Tensor:
    """WikiText-2 test windows [n, seqlen] for perplexity, or random ids (seed 1) when ``tok`` is None."""
    if tok is None:
        return random_windows(model.config.vocab_size, profile.eval_windows or 2, profile.eval_seqlen, seed=1)
    return eval_windows(tok, profile.eval_seqlen, profile.eval_windows)
