"""The book's browser check on a deliberately broken site, and the build-time page hygiene it relies on."""

from __future__ import annotations

import json

import pytest

from mxmoe import book, book_check

GOOD = """<!doctype html><html><head><meta charset="utf-8"><title>good</title></head><body>
<main><article><h1 id="top">Good</h1><p>Everything here loads.</p>
<img src="pic.svg" alt="a picture"><a href="bad.html">bad</a> <a href="#top">top</a> <a href="https://arxiv.org/abs/2505.05799">paper</a>
<details><summary>code</summary><pre style="overflow-x:auto">{long}</pre></details>
</article></main></body></html>"""

BAD = """<!doctype html><html><head><meta charset="utf-8"><title>bad</title>
<script src="https://cdn.example.invalid/lib.js"></script></head><body>
<main><article><h1>Bad</h1>
<img src="missing.png" alt="gone">
<a href="nowhere.html">dangling file</a> <a href="index.html#no-such-anchor">dangling anchor</a>
<div style="overflow-x:auto"><table><tr><td style="white-space:nowrap">{long}</td></tr></table></div>
<p>saved to /home/someone/run/results/x.json</p>
<p>tqdm/auto.py:21: TqdmWarning: IProgress not found</p>
<script>console.error("broken on purpose");</script>
</article></main></body></html>"""

WIDE = (
    """<!doctype html><html><body><main><article><div style="width:3000px">wide</div></article></main></body></html>"""
)

SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def _site(tmp_path):
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(GOOD.format(long="x" * 400))
    (html / "bad.html").write_text(BAD.format(long="y" * 400))
    (html / "wide.html").write_text(WIDE)
    (html / "pic.svg").write_text(SVG)
    return html


def test_broken_link_finds_missing_files_and_anchors(tmp_path):
    html = _site(tmp_path)
    ok = (html / "index.html").as_uri()
    assert book_check.broken_link(ok + "#top", html) is None
    assert book_check.broken_link("https://example.org/x", html) is None  # leaves the book on purpose
    assert "missing file" in book_check.broken_link((html / "nope.html").as_uri(), html)
    assert "missing anchor" in book_check.broken_link(ok + "#nope", html)
    assert "leaves the book" in book_check.broken_link((tmp_path / "elsewhere.html").as_uri(), html)


def test_page_noise_names_paths_and_warnings():
    hits = book_check.page_noise(
        "wrote /root/run/results/a.json\n/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: "
        "TqdmWarning: IProgress\nTraceback (most recent call last):\nC:\\Users\\me\\x.json"
    )
    text = " ".join(hits)
    for needle in ("/root/run/results/a.json", "TqdmWarning", "Traceback", "C:\\Users", "site-packages"):
        assert needle in text
    assert book_check.page_noise("see results/smollm2-moe/eval/table1.json and https://example.org/usr/x") == []


def test_relative_paths_and_folded_cells(tmp_path):
    root = tmp_path / "res"
    assert book.relative_paths(f"saved {root}/m/fig.png", root) == "saved $MXMOE_RESULTS_DIR (res)/m/fig.png"
    assert book.relative_paths("saved /root/run/results/m/fig.png") == "saved results/m/fig.png"
    assert (
        book.relative_paths("/opt/v/lib/python3.12/site-packages/tqdm/auto.py:21") == "<site-packages>/tqdm/auto.py:21"
    )
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "source": "x",
                "outputs": [{"output_type": "stream", "name": "stdout", "text": ["at /root/run/results/a\n"]}],
            },
            {"cell_type": "code", "metadata": {}, "source": "y", "outputs": []},
            {"cell_type": "code", "metadata": {"tags": ["remove-input"]}, "source": "z", "outputs": []},
            {"cell_type": "markdown", "metadata": {}, "source": "# t"},
        ]
    }
    book.prepare_notebook(nb)
    assert [c["metadata"].get("tags") for c in nb["cells"]] == [["hide-input"], ["hide-cell"], ["remove-input"], None]
    assert nb["cells"][0]["outputs"][0]["text"] == ["at results/a\n"]


def test_copy_chapters_writes_prepared_notebooks(tmp_path):
    nb = tmp_path / "00_x.ipynb"
    nb.write_text(
        json.dumps(
            {
                "cells": [{"cell_type": "code", "metadata": {}, "source": "1", "outputs": []}],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )
    (out,) = book.copy_chapters(tmp_path / "src", [nb])
    assert json.loads(out.read_text())["cells"][0]["metadata"]["tags"] == ["hide-cell"]


def test_main_rejects_a_folder_without_a_book(tmp_path, capsys):
    assert book_check.main([str(tmp_path)]) == 2
    assert "no index.html" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chromium():
    exe = book_check.find_chromium()
    pytest.importorskip("playwright.sync_api", reason="Playwright not installed: pip install -r requirements.txt")
    if not exe:
        pytest.skip("no Chromium: apt-get install -y chromium (.ci/run does it when root)")
    return exe


def test_browser_check_fails_a_broken_page_and_passes_a_good_one(tmp_path, chromium):
    html = _site(tmp_path)
    shots = tmp_path / "shots"
    reports = {r.page: r for r in book_check.check_pages(html, shots, chromium, log=lambda *_: None)}
    assert reports["index.html"].problems == []  # folded wide code and an outside link are fine
    bad = " | ".join(reports["bad.html"].problems)
    for needle in (
        "console error: broken on purpose",
        "image did not load",
        "missing.png",
        "missing file: nowhere.html",
        "missing anchor: index.html#no-such-anchor",
        "network request (blocked): https://cdn.example.invalid/lib.js",
        "scrolls sideways",
        "absolute path /home/someone/run/results/x.json",
        "TqdmWarning",
    ):
        assert needle in bad, needle
    assert any("page is 3" in p for p in reports["wide.html"].problems)
    assert sorted(p.name for p in shots.glob("*.png")) == ["bad.png", "index.png", "wide.png"]
    assert book_check.main([str(html)]) == 1
    lenient = book_check.check_pages(
        html, None, chromium, pages=[html / "bad.html"], allow_inner_scroll=True, log=lambda *_: None
    )[0]
    assert any("scrolls sideways" in w for w in lenient.warnings)
    assert not any("scrolls sideways" in p for p in lenient.problems) and lenient.problems  # the rest still fails


def test_zip_is_offline_html_and_the_same_twice(tmp_path):
    import zipfile

    html = _site(tmp_path)
    (html / "_static").mkdir()
    (html / "_static" / "theme.js.map").write_text("{}")
    a = book.write_zip(html, tmp_path / "a.zip")
    b = book.write_zip(html, tmp_path / "b.zip")
    assert a.read_bytes() == b.read_bytes()
    names = zipfile.ZipFile(a).namelist()
    assert "mxmoe-book/index.html" in names and not any(n.endswith(".map") for n in names)


def test_pdf_prints_a_page_offline(tmp_path, chromium):
    html = _site(tmp_path)
    pdf = book.print_pdf(html / "index.html", tmp_path / "out.pdf", chromium)
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_a_redirect_stub_is_checked_by_its_target(tmp_path, chromium):
    stub = '<meta http-equiv="Refresh" content="0; url={}" />'
    (tmp_path / "intro.html").write_text("<html><body><article>hello</article></body></html>")
    (tmp_path / "index.html").write_text(stub.format("intro.html"))
    (tmp_path / "old.html").write_text(stub.format("gone.html"))
    assert book_check.redirect_target(tmp_path / "index.html") == "intro.html"
    assert book_check.redirect_target(tmp_path / "intro.html") is None
    reports = {r.page: r for r in book_check.check_pages(tmp_path, None, chromium, log=lambda *_: None)}
    assert not reports["index.html"].problems
    assert reports["old.html"].problems and "gone.html" in reports["old.html"].problems[0]
