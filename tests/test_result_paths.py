"""Committed result files (results/, cost_tables/*.json) name no machine: no absolute path (/root, /home, /tmp, /work, /usr, C:\\...) and no
virtual environment, so a fresh clone's files read the same wherever they were written."""

from __future__ import annotations

import re
import subprocess

import pytest

from mxmoe.env import REPO_ROOT

ABSOLUTE = re.compile(
    r"(?<![\w.~<>-])/(?:root|home|tmp|work|usr|opt|var|private|Users|mnt|srv|scratch|data|nfs|gpfs|lustre)/[^\s\"'<>|,;)\\]*"
    r"|(?<![\w.-])[A-Za-z]:(?:\\{1,2}[\w .-]+){2,}"  # C:\Users\me (or C:\\Users\\me inside JSON)
    r"|(?<![\w.-])(?:\.?venv|site-packages)/[^\s\"'<>|,;)\\]*"
)  # a virtual environment, even a relative one


def absolute_paths(text: str) -> list[str]:
    """The machine paths in ``text`` (see ``ABSOLUTE``), each once, in order."""
    return list(dict.fromkeys(m.group(0)[:120] for m in ABSOLUTE.finditer(text)))


TABLE_DIRS = ("cost_tables", "kernels")  # per-GPU cost tables at the top level (kernels/ in older layouts)


def committed_result_files() -> list[str]:
    """Tracked text files under results/ and the top-level cost tables (``cost_tables/*.json``), repository-relative."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "results", *TABLE_DIRS], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the committed files are unknown")
    return [
        f
        for f in out.split("\0")
        if f.startswith("results/") or (f.split("/")[0] in TABLE_DIRS and f.count("/") == 1 and f.endswith(".json"))
    ]


def test_the_pattern_finds_machine_paths_and_spares_relative_ones():
    text = (
        '"out": "/root/out", wrote /tmp/x.json, at /work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21, '
        r'"C:\\Users\\me\\run", .venv/lib/python3.11, see results/kernels/a.json, https://example.org/usr/x, '
        r'<site-packages>/torch/profiler.py, "Note:\n"'
    )
    assert absolute_paths(text) == [
        "/root/out",
        "/tmp/x.json",
        "/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21",
        r"C:\\Users\\me\\run",
        ".venv/lib/python3.11",
    ]


def test_committed_results_name_no_machine_paths():
    files = committed_result_files()
    assert files, "no committed result files found"
    bad = {}
    for rel in files:
        path = REPO_ROOT / rel
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a figure or another binary file
            continue
        hits = absolute_paths(text)
        if hits:
            bad[rel] = hits
    lines = [f"{f}: {', '.join(h[:3])}" for f, h in sorted(bad.items())]
    assert not bad, (
        f"{len(bad)} committed result files name machine paths; write them relative to the repository:\n"
        + "\n".join(lines)
    )
