"""The manifest: each paper figure and table -> the notebook, result files and figures that reproduce it."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from mxmoe.claims.rules import _load, _rel
from mxmoe.env import REPO_ROOT
from mxmoe.paths import kernel_results_dir, results_dir
from mxmoe.stages import paper_items

_FIG_ALIASES = {"fig": ("fig", "figure"), "table": ("table", "tab")}


def _figure_files(root: Path, model: str, item: str) -> list[Path]:
    kind, num = re.match(r"(fig|table)(\w+)", item).groups()
    pat = re.compile(rf"(^|[^a-z0-9])({'|'.join(_FIG_ALIASES[kind])})_?{num}([^0-9a-z]|[a-z]?[_.-]|$)", re.I)
    out = []
    for d in (root / model / "figures", root / "kernels" / "figures"):
        if d.is_dir():
            out += [p for p in sorted(d.iterdir()) if p.suffix in (".png", ".svg", ".pdf") and pat.search(p.name)]
    if item == "fig3":
        out.append(REPO_ROOT / "book" / "figures" / "pipeline.svg")
    return out


def _provenance(files: list[Path]) -> dict:
    """device / profile from the files' own metadata (first that says)."""
    dev, prof = set(), set()
    for f in files:
        if f.suffix != ".json" or not f.exists():
            continue
        try:
            d = _load(f)
        except (ValueError, OSError):
            continue
        if not isinstance(d, dict):
            continue
        for src in (d, d.get("params", {}), d.get("provenance", {})):
            if isinstance(src, dict):
                if isinstance(src.get("device"), str):
                    dev.add(src["device"])
                if isinstance(src.get("profile"), (str, dict)):
                    prof.add(src["profile"] if isinstance(src["profile"], str) else src["profile"].get("name", "?"))
    return {"device": sorted(dev), "profile": sorted(prof)}


def build_manifest(model: str = "smollm2-moe", root: "Path | None" = None) -> dict:
    """Each paper item (fig1a ... table7) -> its notebook, result files, figures, device, profile and status."""
    root = Path(root or results_dir())
    items = {}
    for item, (nb, globs, what) in paper_items().items():
        files: set[Path] = set()
        primary: set[Path] = set()
        for i, g in enumerate(globs):
            if g.startswith("@repo/"):
                files.update(Path(p) for p in glob.glob(str(REPO_ROOT / g[6:]), recursive=True))
            elif g.startswith("kernels/"):
                files.update(Path(p) for p in glob.glob(str(kernel_results_dir(root) / g[8:]), recursive=True))
            else:
                files.update(Path(p) for p in glob.glob(str(root / g.format(model=model)), recursive=True))
            if i == 0:
                primary = {f for f in files if f.is_file()}
        files = {f for f in files if f.is_file() and "/figures/" not in str(f) and "/notebooks/" not in str(f)}
        figs = _figure_files(root, model, item)
        sidecars = [f.with_suffix(".json") for f in figs if f.with_suffix(".json").exists()]
        notebook = nb if nb == "intro" else f"notebooks/{nb}.ipynb"
        items[item] = {
            "what": what,
            "notebook": notebook,
            "executed": None if nb == "intro" else _rel(root / model / "notebooks" / f"{nb}.ipynb", root),
            "results": sorted(_rel(f, root) for f in files),
            "figures": sorted(_rel(f, root) for f in figs if f.exists()),
            **_provenance(sorted(files) + sidecars),
            "status": "present" if primary else "partial" if files else "missing",
        }
    return {"model": model, "results_root": _rel(root, root).rstrip("/.") or "results", "items": items}
