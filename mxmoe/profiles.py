"""Run profiles: how big every stage runs (smoke for CI, quick for a CPU, full for a GPU).

A notebook's ``parameters`` cell names a profile and may override single values; everything else
comes from here, so one profile means the same sizes in every notebook and in ``make reproduce``.
``smoke`` uses a tiny random-weight MoE and random token ids: it checks the plumbing in seconds
and its numbers mean nothing (every result it writes says ``profile: smoke``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from mxmoe.errors import MxMoEError


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. ``None`` windows means the whole split."""

    name: str
    model: str
    calib_windows: int  # calibration windows (WikiText-2 train) for sensitivity and GPTQ
    calib_seqlen: int
    eval_windows: "int | None"  # WikiText-2 test windows for perplexity (None: the whole split)
    eval_seqlen: int
    routing_windows: int  # windows per corpus for routing profiles
    zeroshot_limit: "int | None"  # examples per lm-eval task (None: all)
    description: str

    def as_dict(self) -> dict:
        """JSON-ready parameters, stored with every result this profile produced."""
        return asdict(self)


PROFILES = {
    "smoke": Profile("smoke", "tiny-qwen2-moe", calib_windows=2, calib_seqlen=64, eval_windows=2, eval_seqlen=64,
                     routing_windows=2, zeroshot_limit=2,
                     description="CI plumbing check: tiny random MoE, random token ids; numbers mean nothing"),
    "quick": Profile("quick", "smollm2-moe", calib_windows=8, calib_seqlen=512, eval_windows=4, eval_seqlen=1024,
                     routing_windows=8, zeroshot_limit=10,
                     description="2-core CPU: 8x512 calibration windows, 4x1024 WikiText-2 test windows, "
                                 "10 examples per task (accuracies are +-15 points: a run check, not a result)"),
    # whole task sets take ~6 min per model on an H100 (lm-eval through the launch-bound fake-quant
    # forward): Table 1's seven models would not fit one session's device time, so 500 per task (±2.2 points)
    "full": Profile("full", "smollm2-moe", calib_windows=128, calib_seqlen=512, eval_windows=None, eval_seqlen=1024,
                    routing_windows=64, zeroshot_limit=500,
                    description="one GPU: 128x512 calibration windows, the whole WikiText-2 test split, 500 examples per zero-shot task"),
}


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
    from mxmoe.data import calibration_windows

    if tok is None:
        return random_windows(model.config.vocab_size, profile.calib_windows, profile.calib_seqlen, seed)
    return calibration_windows(tok, source, profile.calib_windows, profile.calib_seqlen, seed)


def evaluation(model, tok, profile: Profile) -> torch.Tensor:
    """WikiText-2 test windows [n, seqlen] for perplexity, or random ids (seed 1) when ``tok`` is None."""
    from mxmoe.evaluate import eval_windows

    if tok is None:
        return random_windows(model.config.vocab_size, profile.eval_windows or 2, profile.eval_seqlen, seed=1)
    return eval_windows(tok, profile.eval_seqlen, profile.eval_windows)
