"""The claims map: every claim of the paper we check, its paper value, our value and a verdict.

``build_claims(model)`` reads the committed result files (never recomputes anything) and returns rows
``{"id", "item", "claim", "paper", "ours", "unit", "tolerance", "verdict", "source", "note"}``;
``verdict`` is one of ``reproduced`` / ``direction`` / ``not-reproduced`` / ``not-run``. A claim whose
result file is absent is ``not-run`` with the reason in ``note``, so the map fills in as the stages
land. ``build_manifest(model)`` maps each paper item (fig1a ... table7) to the notebook, result files
and figure files that reproduce it. ``write(model)`` writes results/claims.json and results/manifest.json (``mxmoe claims``).
The rules live in ``mxmoe.claims.rules``, the manifest in ``mxmoe.claims.manifest``.

"""

from __future__ import annotations

import argparse
from pathlib import Path

from mxmoe.claims.manifest import build_manifest
from mxmoe.claims.rules import DEVIATIONS, VERDICTS, _load, build_claims
from mxmoe.files import write_json_atomic
from mxmoe.paths import results_dir

__all__ = ["VERDICTS", "build_claims", "build_manifest", "counts", "write"]


def write(model: str = "smollm2-moe", root: "Path | None" = None) -> tuple[Path, Path]:
    """Write <root>/claims.json and <root>/manifest.json; return their paths."""
    root = Path(root or results_dir())
    claims = build_claims(model, root)
    c = write_json_atomic(
        root / "claims.json",
        {"model": model, "claims": claims, "deviations": [{"topic": t, "text": x} for t, x in DEVIATIONS]},
    )
    m = write_json_atomic(root / "manifest.json", build_manifest(model, root))
    return c, m


def counts(claims: list[dict]) -> dict:
    """{verdict: number of claims with it}."""
    return {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}


def main(argv=None) -> int:
    """``mxmoe claims [--model NAME]``: write claims.json and manifest.json into the results root."""
    p = argparse.ArgumentParser(prog="mxmoe claims", description="write results/claims.json and manifest.json")
    p.add_argument("--model", default="smollm2-moe")
    args = p.parse_args(argv)
    c, m = write(args.model)
    rows = _load(c)["claims"]
    print(f"{c}: {len(rows)} claims, {counts(rows)}\n{m}")
    return 0
