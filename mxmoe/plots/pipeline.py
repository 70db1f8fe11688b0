"""The pipeline diagram of the book's introduction (our counterpart of the paper's Figure 3), drawn with matplotlib.

``python -m mxmoe.plots.pipeline [OUT_DIR]`` writes pipeline.svg and pipeline.png (default book/figures).
The SVG stores text as paths: no font is fetched when the page is viewed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from mxmoe.env import REPO_ROOT  # noqa: E402
from mxmoe.stages import STAGES  # noqa: E402

# (key, x, y, title, detail, colour) — boxes in data coordinates of a 16 x 9 canvas
# box positions and colours; each numbered stage's title and text come from mxmoe.stages.STAGES
LAYOUT = {
    "00_model": ("model", 0.3, 5.7, "#e8e8e8"),
    "01_sensitivity": ("sens", 5.0, 7.0, "#cfe2f3"),
    "02_activation_frequency": ("route", 5.0, 4.4, "#cfe2f3"),
    "03_kernels": ("kern", 5.0, 1.6, "#fce5cd"),
    "04_allocation": ("ilp", 9.7, 7.0, "#d9ead3"),
    "05_end_to_end": ("e2e", 14.4, 4.4, "#d9ead3"),
    "06_claims": ("claims", 14.4, 7.0, "#ead1dc"),
}
BOXES = [
    (key, x, y, s.title, s.summary, colour)
    for s in STAGES
    if s.stem in LAYOUT  # the method's stages
    for key, x, y, colour in [LAYOUT[s.stem]]
]
BOXES.insert(
    4,
    (
        "perf",
        9.7,
        4.4,
        "performance model",
        "T[expert, block, scheme] at the\nrouted token counts (02 + 03)",
        "#fce5cd",
    ),
)
W, H = 4.2, 1.8
ARROWS = [
    ("model", "sens"),
    ("model", "route"),
    ("sens", "ilp"),
    ("route", "perf"),
    ("kern", "perf"),
    ("perf", "ilp"),
    ("ilp", "e2e"),
    ("kern", "e2e"),
    ("e2e", "claims"),
]
BENT = {("kern", "e2e"): "angle,angleA=0,angleB=90,rad=0"}


def draw(width: float = 12.0):
    """(fig, ax) with the pipeline drawn: stages as boxes, data flowing one way."""
    fig, ax = plt.subplots(figsize=(width, width * 8.8 / 19))
    ax.set_xlim(0, 19)
    ax.set_ylim(1.2, 10.0)
    ax.axis("off")
    pos = {}
    for key, x, y, title, detail, colour in BOXES:
        ax.add_patch(
            FancyBboxPatch((x, y), W, H, boxstyle="round,pad=0.06,rounding_size=0.15", fc=colour, ec="0.35", lw=1.0)
        )
        ax.text(x + W / 2, y + H - 0.32, title, ha="center", va="center", fontsize=10.5, fontweight="bold")
        ax.text(
            x + W / 2, y + H / 2 - 0.28, detail, ha="center", va="center", fontsize=8, color="0.15", linespacing=1.3
        )
        pos[key] = (x, y)
    for a, b in ARROWS:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        ca, cb = (xa + W / 2, ya + H / 2), (xb + W / 2, yb + H / 2)
        # leave a box from the side that faces the other box
        if (a, b) in BENT:  # right side of a, then up into the bottom of b
            start, end = (xa + W, ca[1]), (cb[0], yb)
        elif abs(xb - xa) > 0.5:
            start = (xa + W, ca[1]) if xb > xa else (xa, ca[1])
            end = (xb, cb[1]) if xb > xa else (xb + W, cb[1])
        else:
            start = (ca[0], ya if yb < ya else ya + H)
            end = (cb[0], yb + H if yb < ya else yb)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=14,
                lw=1.2,
                color="0.3",
                connectionstyle=BENT.get((a, b), "arc3,rad=0.0"),
                shrinkA=2,
                shrinkB=2,
            )
        )
    ax.text(
        0.3,
        9.9,
        "MxMoE pipeline as reproduced here: every stage reads only files written by earlier stages",
        fontsize=10,
        color="0.25",
        va="top",
    )
    ax.text(
        0.3,
        3.4,
        "stage outputs (JSON):\nresults/<model>/…\nresults/kernels/…\nkernels/<gpu>.json",
        fontsize=8,
        color="0.4",
        va="top",
        family="monospace",
    )
    return fig, ax


def save(out_dir: "str | Path" = REPO_ROOT / "book" / "figures") -> list[Path]:
    """Write pipeline.svg (text as paths) and pipeline.png into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, _ = draw()
    paths = []
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "mxmoe"}):  # deterministic ids, no font files
        for ext in ("svg", "png"):
            p = out_dir / f"pipeline.{ext}"
            fig.savefig(p, bbox_inches="tight", dpi=150, metadata={"Date": None} if ext == "svg" else None)
            paths.append(p)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    for p in save(*sys.argv[1:2]):
        print(p)
