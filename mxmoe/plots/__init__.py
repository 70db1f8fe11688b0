"""Plots for every paper figure, one function each, with one style and provenance on every figure.

Notebooks and the book call these; each figure is saved as PNG plus a JSON sidecar with its
provenance (device, model, profile, measured / predicted / paper) and the parameters that made it.
Topic modules (``mxmoe.plots.accuracy``, ``.kernels``, ``.allocation``) hold the figure functions.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: notebooks under papermill, CI  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from mxmoe.files import write_json_atomic  # noqa: E402
from mxmoe.paths import results_dir  # noqa: E402

KINDS = ("measured", "predicted", "paper", "smoke")
WIDTH = 6.4  # inches of a one-column figure


def use_style() -> None:
    """The one style of every mxmoe figure (seaborn whitegrid, colour-blind palette, readable sizes)."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def figure(nrows: int = 1, ncols: int = 1, width: float = WIDTH, height: "float | None" = None, **kw):
    """(fig, axes) in the mxmoe style; height defaults to a 0.6 aspect per row."""
    use_style()
    height = height or 0.6 * width * nrows / max(ncols, 1) + 0.4
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)


def label_points(ax, xs, ys, labels, fontsize: int = 7) -> None:
    """Write ``labels`` beside the points (xs, ys) of ``ax``; a label that would overlap one already
    written moves down a line at a time (up to six), so close points stay readable."""
    ax.autoscale_view()  # fixes the axis limits the labels are placed against (no drawing of the figure)
    renderer = ax.figure.canvas.get_renderer()
    placed: list = []  # window extents of the labels so far
    for x, y, label in sorted(zip(xs, ys, labels), key=lambda p: -p[1]):
        for line in range(7):
            text = ax.annotate(label, (x, y), fontsize=fontsize, xytext=(3, 3 - 9 * line), textcoords="offset points")
            box = text.get_window_extent(renderer)
            if line == 6 or not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        placed.append(box)


def provenance(device: str, model: str, profile: str, kind: str) -> str:
    """One caption line: where the numbers came from (e.g. 'measured · NVIDIA H100 · smollm2-moe · quick')."""
    if kind not in KINDS:
        raise ValueError(f"provenance kind must be one of {KINDS}, got {kind!r}")
    return f"{kind} · {device} · {model} · profile {profile}"


def figures_dir(model: str) -> Path:
    """results/<model>/figures (results/kernels/figures for kernel figures: pass model='kernels')."""
    return results_dir() / model / "figures" if model != "kernels" else results_dir() / "kernels" / "figures"


def save(fig, model: str, name: str, meta: dict) -> None:
    """Save ``fig`` as <figures_dir(model)>/<name>.png with <name>.json beside it holding ``meta``.

    ``meta`` must say device, model, profile and kind (see ``provenance``); the provenance line is
    drawn on the figure so the PNG alone says where its numbers came from. In a notebook the PNG is
    displayed (so executed notebooks and the book show it) and the figure closed.
    """
    missing = {"device", "model", "profile", "kind"} - set(meta)
    if missing:
        raise ValueError(f"figure {name!r} meta lacks {sorted(missing)}: every figure says where its numbers came from")
    fig.text(
        0.99,
        1.0,
        provenance(meta["device"], meta["model"], meta["profile"], meta["kind"]),
        fontsize=7,
        color="0.4",
        ha="right",
        va="bottom",
    )
    out = figures_dir(model)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    tmp = out / f".{name}.tmp.png"
    fig.savefig(tmp)
    tmp.replace(png)
    write_json_atomic(out / f"{name}.json", meta)
    _show(png)
    plt.close(fig)


def _show(png: Path) -> None:
    """Display the saved PNG when running in a notebook (the Agg backend shows nothing by itself)."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=str(png)))
