"""Open every page of a built book in headless Chromium and fail on what a reader would hit.

``python -m mxmoe.book_check HTML_DIR [--screenshots DIR] [--width 1280]``

Each page is loaded from disk (``file://``) and fails the check on:

- a console error or an uncaught script error;
- an image that does not load, or any file the page asks for that is missing;
- a link inside the book that does not resolve (a missing file, or a ``#fragment`` with no such id);
- any request that is not to a local file (the book must work offline; such requests are blocked);
- a horizontal scrollbar on the main column at the given width (1280 px): the page or the main
  column being wider than the window, or a box inside the column that scrolls sideways (a table
  wider than the column; ``--allow-inner-scroll`` reports those boxes without failing);
- noise in the rendered text (an absolute machine path, warning text, a traceback; see
  ``page_noise``, which the book build applies too).

A full-page screenshot of every page goes to ``--screenshots``. Chromium comes from ``--chromium``,
``$MXMOE_CHROMIUM`` or the PATH (Debian's ``chromium``), driven by Playwright. Exit status: 0 when every
page passes, 1 when one fails, 2 on bad input, 3 when Chromium or Playwright is missing.

The module is also the book's Sphinx extension (``extra_extensions: [mxmoe.book_check]`` in
book/_config.yml): it keeps sphinx-thebe's scripts off the pages, so they have nothing to fail on.
"""

from __future__ import annotations

import argparse
import html.parser
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOCAL_SCHEMES = ("file", "data", "blob", "about")
# Absolute paths in a page's text (output that the book build did not make repository-relative).
ABS_PATH = re.compile(
    r"""(?<![\w.~-])(?:/(?:root|home|tmp|work|usr|opt|var|private|Users|mnt|srv|scratch)/[^\s"'<>|,;)]*"""
    r"""|[A-Za-z]:\\[^\s"'<>|,;)]+)"""
)
NOISE = re.compile(
    r"\b\w*Warning:|\b\w*Warning\b(?=\s*\()|DeprecationWarning|Traceback \(most recent call last\)"
    r"|\bsite-packages/|\.venv/lib/"
)
# Chromium on a closed network: no background traffic, no sandbox (CI runs as root), no GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Boxes wider than they are shown: the document, the main column and anything inside the article
# that scrolls sideways (a code cell, an output, a table), skipping hidden ones (folded cells).
_OVERFLOW_JS = """() => {
  const out = [];
  const wide = (el) => el && el.scrollWidth > el.clientWidth + 1;
  const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                       (el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : '');
  const doc = document.scrollingElement || document.documentElement;
  if (wide(doc)) out.push(`page is ${doc.scrollWidth}px wide in a ${doc.clientWidth}px window`);
  const main = document.querySelector('main, #main-content, .bd-main, [role=main]');
  for (const el of [main, document.querySelector('.bd-article-container'), document.querySelector('article')]) {
    if (wide(el)) out.push(`main column ${name(el)} is ${el.scrollWidth}px wide, shown ${el.clientWidth}px`);
  }
  const root = document.querySelector('article') || main;
  if (root) for (const el of root.querySelectorAll('*')) {
    if (!el.checkVisibility({contentVisibilityAuto: true, visibilityProperty: true})) continue;   // not shown (a folded cell)
    const ox = getComputedStyle(el).overflowX;
    if ((ox === 'auto' || ox === 'scroll') && wide(el)) {
      const text = (el.innerText || '').trim().split('\\n')[0].slice(0, 60);
      out.push(`${name(el)} scrolls sideways (${el.scrollWidth}px in ${el.clientWidth}px): "${text}"`);
    }
  }
  return out;
}"""

_IMAGES_JS = """() => Array.from(document.images)
  .filter(i => !(i.complete && i.naturalWidth > 0))
  .map(i => i.currentSrc || i.src || i.outerHTML.slice(0, 120))"""

_LINKS_JS = """() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"""


def page_noise(text: str) -> list[str]:
    """What in a page's rendered text a reader should not see: absolute machine paths, warning text, tracebacks."""
    hits = [f"absolute path {m.group(0)[:100]}" for m in ABS_PATH.finditer(text)]
    hits += [f"noise {text[max(m.start() - 30, 0) : m.end() + 50].strip()!r}" for m in NOISE.finditer(text)]
    return list(dict.fromkeys(hits))


@dataclass
class PageReport:
    """What went wrong on one page (``problems`` empty: it passed) and where its screenshot is."""

    page: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    screenshot: "Path | None" = None
    seconds: float = 0.0


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id", "name") and v:
                self.ids.add(v)


def page_ids(path: Path, _cache: dict = {}) -> set[str]:  # noqa: B006 - a per-process cache on purpose
    """The ``id`` and ``name`` attributes of an HTML file (the targets a ``#fragment`` can point at)."""
    key = str(path)
    if key not in _cache:
        p = _Ids()
        p.feed(path.read_text(errors="replace"))
        _cache[key] = p.ids
    return _cache[key]


def broken_link(href: str, html_dir: Path) -> "str | None":
    """Why a link found in the book does not resolve inside ``html_dir`` (None: it does, or it leaves the book on purpose).

    Only ``file:`` links are the book's own; ``http(s):`` and ``mailto:`` links point elsewhere by design
    and are not followed (they are not requests, and the network check covers what a page loads).
    """
    u = urlsplit(href)
    if u.scheme != "file":
        return None
    path = Path(unquote(u.path))
    root = html_dir.resolve()
    if not path.resolve().is_relative_to(root):
        return f"link leaves the book: {path}"
    if path.is_dir():
        path = path / "index.html"
    if not path.exists():
        return f"link to a missing file: {path.relative_to(root) if path.is_relative_to(root) else path}"
    frag = unquote(u.fragment)
    if frag and path.suffix == ".html" and frag not in page_ids(path):
        return f"link to a missing anchor: {path.relative_to(root)}#{frag}"
    return None


def find_chromium(explicit: "str | None" = None) -> "str | None":
    """Path of the Chromium to drive: ``explicit``, else ``$MXMOE_CHROMIUM``, else chromium / chromium-browser / google-chrome on the PATH."""
    for cand in (explicit, os.environ.get("MXMOE_CHROMIUM")):
        if cand:
            return cand if Path(cand).exists() else shutil.which(cand)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


_REDIRECT = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.I)


def redirect_target(path: Path) -> "str | None":
    """The target of a page that only redirects (a meta refresh and nothing to read), else None."""
    text = path.read_text(errors="replace")
    m = _REDIRECT.search(text)
    return m.group(1) if m and len(text) < 500 else None


def book_pages(html_dir: Path) -> list[Path]:
    """Every page a reader can open: the HTML files of the book (the _static and _sources folders left out)."""
    return sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def check_pages(
    html_dir: Path,
    shots: "Path | None",
    chromium: str,
    width: int = 1280,
    height: int = 900,
    pages: "list[Path] | None" = None,
    allow_inner_scroll: bool = False,
    log=print,
) -> list[PageReport]:
    """Load every page of ``html_dir`` in headless Chromium; return one report per page (see the module doc).

    ``allow_inner_scroll``: a box inside the main column that scrolls sideways is a warning, not a problem.
    """
    from playwright.sync_api import sync_playwright

    html_dir = html_dir.resolve()
    pages = pages if pages is not None else book_pages(html_dir)
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    reports = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
        blocked: list[str] = []

        def route(r):
            blocked.append(r.request.url)
            r.abort("blockedbyclient")

        ctx.route(lambda url: urlsplit(url).scheme not in LOCAL_SCHEMES, route)
        for path in pages:
            t0 = time.time()
            rel = str(path.relative_to(html_dir))
            rep = PageReport(rel)
            target = redirect_target(path)
            if target is not None:  # a bare redirect stub (the book's index.html): its target must exist
                why = broken_link((path.parent / target).resolve().as_uri(), html_dir)
                rep.problems += [why] if why else []
                reports.append(rep)
                log(f"  {'FAIL' if rep.problems else 'ok  '} {rel} (redirect to {target})")
                continue
            blocked.clear()
            page = ctx.new_page()
            seen: list[str] = []
            page.on(
                "console",
                lambda m, rep=rep: rep.problems.append(f"console error: {m.text[:200]}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e, rep=rep: rep.problems.append(f"script error: {str(e)[:200]}"))
            page.on("request", lambda r: seen.append(r.url))
            page.on("websocket", lambda ws: seen.append(ws.url))
            page.on(
                "requestfailed",
                lambda r, rep=rep: (
                    rep.problems.append(f"failed to load {r.url[:160]} ({r.failure})")
                    if urlsplit(r.url).scheme == "file"
                    else None
                ),
            )
            try:
                page.goto(path.as_uri(), wait_until="load", timeout=30_000)
                page.wait_for_timeout(150)  # late scripts (theme, search index) report their errors
                rep.problems += [f"image did not load: {src[:160]}" for src in page.evaluate(_IMAGES_JS)]
                for href in sorted(set(page.evaluate(_LINKS_JS))):
                    why = broken_link(href, html_dir)
                    if why:
                        rep.problems.append(why)
                for wide in page.evaluate(_OVERFLOW_JS):
                    inner = "scrolls sideways" in wide
                    (rep.warnings if inner and allow_inner_scroll else rep.problems).append(wide)
                rep.problems += [
                    f"rendered text: {n}"
                    for n in page_noise(page.inner_text("article") if page.query_selector("article") else "")
                ]
                if shots:
                    rep.screenshot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
                    page.screenshot(path=str(rep.screenshot), full_page=True)
            except Exception as e:  # a page that cannot even load is one failure, not a crash of the check
                rep.problems.append(f"could not check the page: {str(e).splitlines()[0][:200]}")
            net = sorted({u for u in seen + blocked if urlsplit(u).scheme not in LOCAL_SCHEMES})
            rep.problems += [f"network request (blocked): {u[:160]}" for u in net]
            page.close()
            rep.seconds = time.time() - t0
            reports.append(rep)
            log(f"  {'ok  ' if not rep.problems else 'FAIL'} {rel} ({rep.seconds:.1f} s)")
            for prob in rep.problems[:12]:
                log(f"       {prob}")
            for warn in rep.warnings[:6]:
                log(f"       (allowed) {warn}")
            if len(rep.problems) > 12:
                log(f"       ... and {len(rep.problems) - 12} more")
        browser.close()
    return reports


def _drop_thebe(app, pagename, templatename, context, doctree):
    """Leave sphinx-thebe's scripts out of a page: this book has no live code, Jupyter Book adds them twice
    (a console error: ``THEBE_JS_URL`` declared twice) and they name a CDN."""

    def thebe(js) -> bool:
        body = getattr(js, "attributes", {}).get("body", "") if not isinstance(js, str) else ""
        return "sphinx-thebe.js" in str(getattr(js, "filename", js) or "") or "THEBE_JS_URL" in body

    if "script_files" in context:
        context["script_files"] = [js for js in context["script_files"] if not thebe(js)]


def setup(app):
    """Sphinx extension of the book (``extra_extensions: [mxmoe.book_check]`` in book/_config.yml)."""
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: "list[str] | None" = None) -> int:
    """Command line: check a built book's HTML folder; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m mxmoe.book_check", description=__doc__.split("\n")[0])
    p.add_argument("html_dir", type=Path, help="the book's HTML folder (…/_build/html)")
    p.add_argument("--screenshots", type=Path, default=None, help="write a full-page PNG of every page here")
    p.add_argument("--width", type=int, default=1280, help="window width in px (default 1280)")
    p.add_argument(
        "--chromium", default=None, help="Chromium executable (default: $MXMOE_CHROMIUM, else chromium on the PATH)"
    )
    p.add_argument(
        "--allow-inner-scroll",
        action="store_true",
        help="report boxes inside the main column that scroll sideways (wide tables) without failing",
    )
    args = p.parse_args(argv)
    if not (args.html_dir / "index.html").is_file():
        print(
            f"mxmoe book_check: {args.html_dir} has no index.html: give the built book's HTML folder (…/_build/html)",
            file=sys.stderr,
        )
        return 2
    chromium = find_chromium(args.chromium)
    if not chromium:
        print(
            "mxmoe book_check: no Chromium found: install it (apt-get install -y chromium) or pass --chromium PATH",
            file=sys.stderr,
        )
        return 3
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        print("mxmoe book_check: Playwright is not installed: pip install -r requirements.txt", file=sys.stderr)
        return 3
    t0 = time.time()
    print(f"mxmoe book_check: {args.html_dir} in {chromium} at {args.width} px")
    reports = check_pages(
        args.html_dir, args.screenshots, chromium, width=args.width, allow_inner_scroll=args.allow_inner_scroll
    )
    bad = [r for r in reports if r.problems]
    where = f"; screenshots in {args.screenshots}" if args.screenshots else ""
    print(
        f"mxmoe book_check: {len(reports) - len(bad)} of {len(reports)} pages pass in {time.time() - t0:.1f} s{where}"
    )
    return 1 if bad or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
