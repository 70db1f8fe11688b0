"""Build the Jupyter Book from the executed notebooks (nothing is executed here).

``mxmoe book [--profile P] [--model M] [--stage DIR] [--out DIR] [--strict]``:

1. copies the executed notebooks ``<results>/<model>/notebooks/NN_*.ipynb`` into ``<src>/chapters/``
   (``<src>`` is ``book/``, or a copy of it in ``--stage DIR`` so a CI build leaves book/ alone), folding
   code cells (``hide-input``) and writing machine paths in outputs relative to the repository;
2. writes ``<src>/runs.md``: device, profile, time and software of every run behind the book;
3. runs ``jupyter-book build`` (``--strict``: ``-W -n --keep-going``) into ``--out`` (default book/_build);
4. scans the HTML for scripts or stylesheets fetched from the network and reports them, and for noise
   in the rendered text (absolute paths, warnings, tracebacks): ``--strict`` fails on it;
5. ``--publish``: also ``<out>/_build/mxmoe-book.zip`` (the HTML, offline) and ``<out>/_build/mxmoe-book.pdf``.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from mxmoe.bench.runs import COUNTED
from mxmoe.book_check import find_chromium, page_noise
from mxmoe.env import COST_TABLES, REPO_ROOT
from mxmoe.paths import default_model, kernel_results_dir, model_dirname, resolve_results_dir
from mxmoe.profiles import default_profile
from mxmoe.stages import STAGES

BOOK = REPO_ROOT / "book"
SOFTWARE = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "lm-eval",
    "pulp",
    "papermill",
    "jupyter-book",
    "myst-nb",
    "sphinx-book-theme",
)


def executed_notebooks(root: Path, model: str) -> list[Path]:

    d = root / model_dirname(model) / "notebooks"
    return [d / f"{s.stem}.ipynb" for s in STAGES if (d / f"{s.stem}.ipynb").exists()]


def book_profile() -> str:
    """The run a book shows by default: the full (GPU) run when its executed notebooks exist, else this machine's default."""
    return "full" if executed_notebooks(resolve_results_dir("full"), default_model("full")) else default_profile()


def stage_source(src: "Path | None") -> Path:
    """``book/`` itself, or a fresh copy of its sources in ``src`` (chapters and builds left out)."""
    if src is None or Path(src).resolve() == BOOK.resolve():
        return BOOK
    src = Path(src)
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(BOOK, src, ignore=shutil.ignore_patterns("_build", "chapters", ".gitignore"))
    return src


# A code cell with one of these tags already says how it is shown; "show-input" keeps its code unfolded.
DISPLAY_TAGS = {"remove-cell", "remove-input", "remove-output", "hide-cell", "hide-input", "hide-output", "show-input"}
# Any absolute folder that ends in results/ (a run on another machine, a temp smoke folder) reads as results/.
_ANY_RESULTS = re.compile(r"(?<![\w.~-])(?:/[\w.+@-]+)*/results(?=[/\s'\"]|$)")
_SITE_PACKAGES = re.compile(r"(?<![\w.~-])(?:/[\w.+@-]+)+/site-packages/")


def relative_paths(text: str, root: "Path | None" = None) -> str:
    """``text`` with machine paths made relative: the results ``root`` and any ``…/results`` folder -> ``results``,
    the repository root -> nothing, a ``…/site-packages/`` folder -> ``<site-packages>/``."""
    if root is not None:
        text = text.replace(str(Path(root).resolve()), _display(root).rstrip("/"))
    text = text.replace(str(REPO_ROOT) + "/", "")
    text = _ANY_RESULTS.sub("results", text)
    return _SITE_PACKAGES.sub("<site-packages>/", text)


def _map_text(value, fn):
    if isinstance(value, list):
        return [fn(v) if isinstance(v, str) else v for v in value]
    return fn(value) if isinstance(value, str) else value


def prepare_notebook(data: dict, root: "Path | None" = None) -> dict:
    """A chapter from an executed notebook (in place): code folded, output paths relative (see ``relative_paths``).

    A code cell without a display tag gets ``hide-input`` (its outputs lead, the code is one click away), or
    ``hide-cell`` when it has no output. Text outputs (streams, text/plain, html, markdown, tracebacks) have
    their machine paths rewritten; stderr streams are left for the book config (``nb_output_stderr``) to drop.
    """
    fix = lambda t: relative_paths(t, root)  # noqa: E731
    for cell in data.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if not DISPLAY_TAGS & set(tags):
            tags.append("hide-input" if cell.get("outputs") else "hide-cell")
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = _map_text(out["text"], fix)
            if "traceback" in out:
                out["traceback"] = _map_text(out["traceback"], fix)
            for mime, val in (out.get("data") or {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = _map_text(val, fix)
    return data


def copy_chapters(src: Path, notebooks: list[Path], root: "Path | None" = None) -> list[Path]:
    """Replace ``src/chapters`` with the executed notebooks, made chapters by ``prepare_notebook``; return the copies."""
    chapters = src / "chapters"
    if chapters.exists():
        shutil.rmtree(chapters)
    chapters.mkdir(parents=True)
    out = []
    for nb in notebooks:
        data = json.loads(nb.read_text())
        # papermill marks a failed run with an error banner; such a notebook must not become a chapter silently
        if any("papermill-error-cell-tag" in c.get("metadata", {}).get("tags", []) for c in data.get("cells", [])):
            raise RuntimeError(f"{nb} is a partial notebook from a failed run; re-run its stage first")
        dst = chapters / nb.name
        dst.write_text(json.dumps(prepare_notebook(data, root), indent=1, ensure_ascii=False) + "\n")
        shutil.copystat(nb, dst)
        out.append(dst)
    return out


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    for pkg in SOFTWARE:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none yet_\n"
    cols = list(rows[0])
    esc = lambda v: str("—" if v in (None, "") else v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _du(path: Path, skip: "tuple[str, ...]" = ()) -> str:
    """Size of the files under ``path``, leaving out the top-level folders named in ``skip``."""
    if not path.exists():
        return "—"
    files = (p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in skip)
    return f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MiB"


def kernel_file_roles() -> dict:
    """What each committed kernel result is for: {file name: role} for the benchmark runs that count
    (``mxmoe.bench.runs.COUNTED``) and the runs each cost table was built from."""
    roles = {name: f"counted, rank {i + 1}" for i, name in enumerate(COUNTED)}
    for table in sorted(COST_TABLES.glob("*.json")):
        for src in json.loads(table.read_text()).get("sources", []):
            name = Path(src).name
            roles[name] = f"{roles[name]}; " if name in roles else ""
            roles[name] += f"source of {table.name}"
    return roles


def _result_provenance(root: Path, model: str) -> list[dict]:
    """device / date / software recorded inside the result files (first level of their JSON), and what each
    kernel result is for."""
    roles = kernel_file_roles()
    rows = []
    files = sorted((root / model_dirname(model)).glob("*.json")) + sorted(
        (root / model_dirname(model)).glob("*/*.json")
    )
    files += sorted(kernel_results_dir(root).glob("*.json"))
    for f in files:
        if "/figures/" in str(f) or "/notebooks/" in str(f):
            continue
        try:
            d = json.loads(f.read_text())
        except (ValueError, OSError):
            continue
        if not isinstance(d, dict):
            continue
        prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else {}
        params = d.get("params") if isinstance(d.get("params"), dict) else {}
        dev = prov.get("device") or d.get("device") or params.get("device") or d.get("label")
        sw = ", ".join(f"{k} {prov[k]}" for k in ("torch", "triton", "cuda") if k in prov)
        date = prov.get("date_utc") or d.get("date") or params.get("date")
        profile = d.get("profile") or params.get("profile")
        if isinstance(profile, dict):
            profile = profile.get("name")
        rows.append(
            {
                "result file": str(f.relative_to(root) if f.is_relative_to(root) else f.relative_to(REPO_ROOT)),
                "device": dev,
                "profile": profile,
                "software": sw,
                "date": date,
                "role": roles.get(f.name, ""),
            }
        )
    return rows


def _evaluation_devices(runs: Path) -> list[dict]:
    """Rows per (device, profile) of the cached evaluations under ``runs``, with their summed seconds."""
    counts: dict = {}
    for f in sorted(runs.glob("*.json")):
        d = json.loads(f.read_text())
        key = (d.get("device", "?"), d.get("profile", "?"))
        n, sec = counts.get(key, (0, 0.0))
        counts[key] = (n + 1, sec + (d.get("seconds") or 0.0))
    return [
        {"device": dev, "profile": prof, "evaluations": n, "compute (s, summed)": round(sec)}
        for (dev, prof), (n, sec) in counts.items()
    ] or [{"device": "none yet"}]


def write_runs_page(src: Path, root: Path, model: str) -> Path:
    """``src/runs.md``: every stage run (from the stamps), every result file's provenance, disk use, versions."""
    nb_dir = root / model_dirname(model) / "notebooks"
    stages = []
    for s in STAGES:
        stamp = nb_dir / f"{s.stem}.stamp.json"
        if stamp.exists():
            st = json.loads(stamp.read_text())
            stages.append(
                {
                    "notebook": s.stem,
                    "profile": st["parameters"].get("profile"),
                    "model": st["parameters"].get("model"),
                    "device": st.get("device"),
                    "wall time (s)": st.get("seconds"),
                    "finished (UTC)": st.get("finished"),
                }
            )
        else:
            stages.append(
                {
                    "notebook": s.stem,
                    "profile": None,
                    "model": None,
                    "device": None,
                    "wall time (s)": None,
                    "finished (UTC)": "not run" if not (nb_dir / f"{s.stem}.ipynb").exists() else "no stamp",
                }
            )
    total = sum(r["wall time (s)"] or 0 for r in stages)
    ver = _versions()
    text = f"""# Runs

Generated by `mxmoe book` from
`{_display(root)}` (model `{model}`). Do not edit by hand.

## Notebook runs

One row per stage, taken from the stamp that `mxmoe reproduce` wrote beside each
executed notebook. Total wall time of the stages listed: {total:.0f} s.

{_md_table(stages)}
## Result files and where they were measured

What each result file says about its own origin (device, profile, software, date). Kernel results
come from a GPU machine. The others come from the machine named in their `device` field.

{_md_table(_result_provenance(root, model))}
## Evaluations and where they ran

Every quantized-and-evaluated model is one cached row under `eval/runs/` (computed by a notebook or by
`mxmoe prewarm`, and read by the notebooks): a stage's wall time above can be short
because its evaluations ran earlier, elsewhere. Rows per device and profile:

{_md_table(_evaluation_devices(root / model_dirname(model) / "eval" / "runs"))}
## Software of the book build

{_md_table([{"package": k, "version": v} for k, v in ver.items()])}
## Disk use

{
        _md_table(
            [
                {
                    "results (this model)": _du(root / model_dirname(model)),
                    "results/kernels": _du(kernel_results_dir(root)),
                    "book sources": _du(src, skip=("_build",)),
                }
            ]
        )
    }"""
    out = src / "runs.md"
    out.write_text(text)
    return out


def _display(root: Path) -> str:
    try:
        return str(root.resolve().relative_to(REPO_ROOT)) + "/"
    except ValueError:
        return "$MXMOE_RESULTS_DIR (" + root.name + ")"


REMOTE = re.compile(r"""<(?:script|link|img|iframe)[^>]+(?:src|href)=["'](https?:)?//[^"']+["']""", re.I)


def remote_fetches(html_dir: Path) -> dict[str, list[str]]:
    """{page: [tags]} of scripts, stylesheets, images and frames loaded from another host."""
    found = {}
    for page in sorted(html_dir.rglob("*.html")):
        hits = [
            m.group(0)[:160]
            for m in REMOTE.finditer(page.read_text(errors="replace"))
            if 'rel="canonical"' not in m.group(0)
        ]
        if hits:
            found[str(page.relative_to(html_dir))] = hits
    return found


class _ArticleText(html.parser.HTMLParser):
    """The text of a Sphinx page's ``<article>`` (the main column), without scripts and styles."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self.depth += 1
        elif tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self.depth -= 1
        elif tag in ("script", "style"):
            self.skip -= 1

    def handle_data(self, data):
        if self.depth > 0 and self.skip == 0:
            self.parts.append(data)


def rendered_noise(html_dir: Path) -> dict[str, list[str]]:
    """{page: [noise]} over the built pages' main column (see ``page_noise``); pages without noise are left out."""
    found = {}
    for page in sorted(Path(html_dir).rglob("*.html")):
        if "_static" in page.parts or "_sources" in page.parts:
            continue
        parser = _ArticleText()
        parser.feed(page.read_text(errors="replace"))
        hits = page_noise("".join(parser.parts))
        if hits:
            found[str(page.relative_to(html_dir))] = hits
    return found


def _jupyter_book() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    # the script beside this interpreter, else the same package through this interpreter (no PATH lookup)
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


def write_zip(html_dir: Path, dest: Path) -> Path:
    """``dest``: a zip of the built HTML under one folder ``mxmoe-book/`` (open ``mxmoe-book/index.html``; works offline).

    Entries are sorted and carry a fixed date, so the same pages give the same archive. Source maps
    (``*.map``, only read by a browser's developer tools) and Sphinx's ``.buildinfo`` are left out.
    """
    import zipfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in sorted(p for p in html_dir.rglob("*") if p.is_file() and p.suffix not in (".map", ".buildinfo")):
            info = zipfile.ZipInfo(f"mxmoe-book/{f.relative_to(html_dir).as_posix()}", date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, f.read_bytes())
    tmp.replace(dest)
    return dest


PDF_FOOTER = (
    '<div style="font-size:8px;width:100%;text-align:center;color:#555">'
    '<span class="pageNumber"></span> / <span class="totalPages"></span></div>'
)


def print_pdf(page: Path, dest: Path, chromium: str) -> Path:
    """``dest``: ``page`` (the single-page HTML build) printed to an A4 PDF by headless Chromium, offline.

    The book's print CSS (``book/_static/mxmoe.css``) leaves out folded code and the sidebars; any request
    to the network is blocked, so the PDF shows exactly what the offline HTML shows.
    """
    from urllib.parse import urlsplit

    from playwright.sync_api import sync_playwright

    from mxmoe.book_check import CHROMIUM_ARGS, LOCAL_SCHEMES

    dest.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        ctx = browser.new_context()
        ctx.route(lambda url: urlsplit(url).scheme not in LOCAL_SCHEMES, lambda r: r.abort("blockedbyclient"))
        tab = ctx.new_page()
        tab.goto(page.resolve().as_uri(), wait_until="load", timeout=60_000)
        tab.emulate_media(media="print")
        tab.pdf(
            path=str(dest),
            format="A4",
            print_background=True,
            display_header_footer=True,
            header_template="<span></span>",
            footer_template=PDF_FOOTER,
            margin={"top": "14mm", "bottom": "16mm", "left": "12mm", "right": "12mm"},
        )
        browser.close()
    return dest


def publish(src: Path, out: Path, strict: bool, log=print) -> int:
    """The book as files to attach to a paper: ``<out>/_build/mxmoe-book.zip`` (the HTML) and ``mxmoe-book.pdf``
    (the single-page HTML build printed by Chromium; see ``print_pdf``). Exit status 0 when both were written."""
    t0 = time.time()
    build_dir = Path(out) / "_build"
    zipped = write_zip(build_dir / "html", build_dir / "mxmoe-book.zip")
    log(f"mxmoe book: {zipped} ({zipped.stat().st_size / 2**20:.1f} MiB, {time.time() - t0:.1f} s)")
    chromium = find_chromium()
    if not chromium:
        log("mxmoe book: no PDF: Chromium not found (apt-get install -y chromium, or set MXMOE_CHROMIUM)")
        return 1
    t0 = time.time()
    rc = build(src, out, strict, log=log, builder="singlehtml")
    page = build_dir / "singlehtml" / "intro.html"
    if rc != 0 or not page.exists():
        log(f"mxmoe book: no PDF: the single-page build failed (exit {rc})")
        return rc or 1
    pdf = print_pdf(page, build_dir / "mxmoe-book.pdf", chromium)
    log(
        f"mxmoe book: {pdf} ({pdf.stat().st_size / 2**20:.1f} MiB, {time.time() - t0:.1f} s with its single-page build)"
    )
    return 0


def build(src: Path, out: Path, strict: bool, log=print, builder: str = "html") -> int:
    """Run ``jupyter-book build`` of ``src`` into ``out/_build/<builder>`` (``strict``: ``-W -n --keep-going``); its exit status."""
    cmd = _jupyter_book() + ["build", str(src), "--path-output", str(out), "--builder", builder]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    rc = subprocess.call(cmd)
    log(f"jupyter-book build: exit {rc} in {time.time() - t0:.1f} s")
    return rc


def main(argv: "list[str] | None" = None) -> int:

    p = argparse.ArgumentParser(prog="mxmoe book", description=__doc__.split("\n")[0])
    p.add_argument(
        "--profile",
        choices=("smoke", "quick", "full"),
        default=None,
        help="which run's notebooks (decides the results folder and default model)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--stage", type=Path, default=None, help="assemble the book sources here instead of in book/")
    p.add_argument("--out", type=Path, default=None, help="build folder (default: <book sources>/_build)")
    p.add_argument("--strict", action="store_true", help="warnings are errors: -W -n --keep-going")
    p.add_argument(
        "--publish",
        action="store_true",
        help="also write <out>/_build/mxmoe-book.zip (the HTML) and mxmoe-book.pdf (needs Chromium)",
    )
    args = p.parse_args(argv)
    profile = args.profile or book_profile()
    model = args.model or default_model(profile)
    root = resolve_results_dir(profile)
    t0 = time.time()
    src = stage_source(args.stage)
    notebooks = executed_notebooks(root, model)
    try:
        copy_chapters(src, notebooks, root)
    except RuntimeError as e:
        print(f"mxmoe book: {e}", file=sys.stderr)
        return 1
    write_runs_page(src, root, model)
    print(f"mxmoe book: {len(notebooks)} executed notebooks from {root} -> {src / 'chapters'}")
    out = args.out or src
    rc = build(src, out, args.strict)
    html_dir = Path(out) / "_build" / "html"
    if rc == 0 and html_dir.exists():
        remote = remote_fetches(html_dir)
        if remote:
            print(f"mxmoe book: {len(remote)} pages load something from the network at view time:")
            for page, tags in list(remote.items())[:10]:
                print(f"  {page}: {tags[0]}")
        else:
            print("mxmoe book: no page loads scripts, stylesheets or images from the network")
        noise = rendered_noise(html_dir)
        for page, hits in noise.items():
            print(f"mxmoe book: {page}: {len(hits)} noise in the rendered text: " + "; ".join(hits[:3]))
        if noise and args.strict:
            print(
                f"mxmoe book: {len(noise)} pages show absolute paths, warnings or tracebacks (--strict fails on them)"
            )
            rc = 1
        if rc == 0 and args.publish:
            rc = publish(src, out, args.strict)
        print(f"mxmoe book: {html_dir / 'index.html'} ({time.time() - t0:.1f} s in all)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
