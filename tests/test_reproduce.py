"""The notebook runner: stage skipping by stamp, failure reports, missing notebooks; the book helpers."""

from __future__ import annotations

import json

import nbformat
import pytest

from mxmoe import book, reproduce
from mxmoe.env import REPO_ROOT
from mxmoe.reproduce import NotebookFailed, Stage


def _write_nb(path, *sources, params="model = None\nprofile = None"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A notebooks folder, a results root, and a fake executor that records calls (no kernel)."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    root = tmp_path / "results"
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(root))
    calls = []

    def fake_run(nb_path, out_path, params, cwd, progress, log, heartbeat=60.0):
        calls.append((nb_path.stem, dict(params)))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(nb_path.read_text())
        hook = fake_run.hooks.get(nb_path.stem)
        if hook:
            hook()
        return 0.01

    fake_run.hooks = {}
    monkeypatch.setattr(reproduce, "run_stage", fake_run)
    return nbs, root, calls, fake_run


def _run(nbs, stages, **kw):
    return reproduce.reproduce("smoke", "m", nbs, stages=stages, log=lambda *_: None, **kw)


def test_unchanged_stages_skip_and_changes_rerun(env):
    nbs, root, calls, _ = env
    _write_nb(nbs / "00_a.ipynb", "x = 1")
    _write_nb(nbs / "01_b.ipynb", "y = 2")
    (root / "m").mkdir(parents=True)
    (root / "m" / "in.json").write_text('{"v": 1}')
    stages = (Stage("00_a"), Stage("01_b", ("{model}/in.json",)))

    got = _run(nbs, stages)
    assert [r.status for r in got] == ["ran", "ran"]
    assert (root / "m" / "notebooks" / "00_a.stamp.json").exists()
    got = _run(nbs, stages)
    assert [r.status for r in got] == ["skipped", "skipped"]

    (root / "m" / "in.json").write_text('{"v": 2}')  # an input changed: only the stage that reads it
    assert [r.status for r in _run(nbs, stages)] == ["skipped", "ran"]

    _write_nb(nbs / "00_a.ipynb", "x = 3")  # the notebook's source changed
    assert [r.status for r in _run(nbs, stages)] == ["ran", "skipped"]

    assert [r.status for r in _run(nbs, stages, extra={"layer": 2})] == ["ran", "ran"]  # a parameter changed
    assert [r.status for r in _run(nbs, stages, extra={"layer": 2})] == ["skipped", "skipped"]
    assert [r.status for r in _run(nbs, stages, extra={"layer": 2}, force=True)] == ["ran", "ran"]
    assert calls[-1] == ("01_b", {"model": "m", "profile": "smoke", "layer": 2})


def test_outputs_do_not_change_the_key(env, tmp_path):
    nbs, *_ = env
    p = _write_nb(nbs / "00_a.ipynb", "x = 1")
    before = reproduce.notebook_source_hash(p)
    nb = nbformat.read(str(p), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.cells[1].execution_count = 7
    nbformat.write(nb, str(p))
    assert reproduce.notebook_source_hash(p) == before


def test_stage_that_writes_what_it_reads_is_stable(env):
    nbs, root, _, fake = env
    _write_nb(nbs / "00_a.ipynb", "x = 1")
    stages = (Stage("00_a", ("{model}/cache.json",)),)
    fake.hooks["00_a"] = lambda: (root / "m" / "cache.json").write_text('{"cached": true}')
    assert [r.status for r in _run(nbs, stages)] == ["ran"]
    assert [r.status for r in _run(nbs, stages)] == ["skipped"]


def test_notebook_edited_during_its_run_runs_again(env):
    nbs, _, _, fake = env
    nb = _write_nb(nbs / "00_a.ipynb", "x = 1")
    stages = (Stage("00_a"),)
    fake.hooks["00_a"] = lambda: _write_nb(nb, "x = 2")  # the author saves an edit while the stage runs
    assert [r.status for r in _run(nbs, stages)] == ["ran"]
    fake.hooks.clear()
    assert [r.status for r in _run(nbs, stages)] == ["ran"]
    assert [r.status for r in _run(nbs, stages)] == ["skipped"]


def test_missing_notebooks_are_reported_not_fatal(env):
    nbs, *_ = env
    _write_nb(nbs / "00_a.ipynb", "x = 1")
    lines = []
    got = reproduce.reproduce("smoke", "m", nbs, stages=(Stage("00_a"), Stage("03_c")), log=lines.append)
    assert [(r.stem, r.status) for r in got] == [("00_a", "ran"), ("03_c", "missing")]
    assert any("missing: 03_c" in line for line in lines)


def test_stage_whose_upstream_notebook_is_missing_is_blocked(env):
    nbs, *_ = env
    _write_nb(nbs / "00_a.ipynb", "x = 1")
    _write_nb(nbs / "05_e.ipynb", "y = 1")
    lines = []
    got = reproduce.reproduce(
        "smoke", "m", nbs, stages=(Stage("00_a"), Stage("04_d"), Stage("05_e", needs=("04_d",))), log=lines.append
    )
    assert [(r.stem, r.status) for r in got] == [("00_a", "ran"), ("04_d", "missing"), ("05_e", "blocked")]
    assert any("05_e: not run, it needs 04_d" in line for line in lines)


def test_smoke_never_writes_into_committed_results(monkeypatch, tmp_path):
    monkeypatch.delenv("MXMOE_RESULTS_DIR", raising=False)
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path))
    assert reproduce.resolve_results_dir("smoke") == tmp_path / "smoke-results"
    assert reproduce.resolve_results_dir("quick") == REPO_ROOT / "results" / "quick"
    assert reproduce.resolve_results_dir("full") == REPO_ROOT / "results"
    assert reproduce.model_dirname("Qwen/Qwen1.5-MoE-A2.7B") == "Qwen--Qwen1.5-MoE-A2.7B"


def test_failing_notebook_names_cell_and_partial_notebook(tmp_path, monkeypatch, capsys):
    """A real papermill run of a deliberately broken throwaway notebook."""
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path / "results"))
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_nb(nbs / "00_ok.ipynb", "ok = True")
    _write_nb(nbs / "01_broken.ipynb", "a = 1", "raise ValueError('deliberately broken')", "never = True")
    stages = (Stage("00_ok"), Stage("01_broken"), Stage("02_after"))
    with pytest.raises(NotebookFailed) as e:
        reproduce.reproduce("smoke", "m", nbs, stages=stages, log=lambda *_: None, heartbeat=0)
    err = e.value
    assert err.stem == "01_broken"
    assert "raise ValueError" in err.cell and "ValueError: deliberately broken" in err.error
    assert err.partial == tmp_path / "results" / "m" / "notebooks" / "01_broken.ipynb" and err.partial.exists()
    assert not (err.partial.parent / "01_broken.stamp.json").exists()
    assert (err.partial.parent / "00_ok.stamp.json").exists()
    saved = json.loads(err.partial.read_text())
    assert any(o.get("ename") == "ValueError" for c in saved["cells"] for o in c.get("outputs", []))

    # the CLI prints the same three facts and exits 1
    monkeypatch.setattr(reproduce, "STAGES", stages)
    rc = reproduce.main(["--profile", "smoke", "--model", "m", "--notebooks", str(nbs)])
    out = capsys.readouterr().err
    assert rc == 1
    assert "notebook: 01_broken" in out and "deliberately broken" in out and str(err.partial) in out

    # a failed notebook must not become a book chapter
    with pytest.raises(RuntimeError, match="partial notebook"):
        book.copy_chapters(tmp_path / "booksrc", [err.partial])


def test_book_helpers(tmp_path):
    html = tmp_path / "html"
    html.mkdir()
    (html / "a.html").write_text('<script src="_static/x.js"></script><link href="https://cdn.example.org/x.css">')
    (html / "b.html").write_text('<script src="../_static/y.js"></script>')
    assert list(book.remote_fetches(html)) == ["a.html"]

    root = tmp_path / "results"
    (root / "m" / "notebooks").mkdir(parents=True)
    (root / "m" / "notebooks" / "00_model.stamp.json").write_text(
        json.dumps(
            {"parameters": {"profile": "smoke", "model": "m"}, "device": "CPU", "seconds": 1.5, "finished": "now"}
        )
    )
    (root / "m" / "model.json").write_text(json.dumps({"device": "CPU (test)"}))
    page = book.write_runs_page(tmp_path, root, "m").read_text()
    assert "| 00_model | smoke | m | CPU | 1.5 | now |" in page
    assert "m/model.json | CPU (test)" in page


def test_key_does_not_depend_on_where_results_live(tmp_path):
    nb = _write_nb(tmp_path / "00_a.ipynb", "x = 1")
    keys = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "m").mkdir(parents=True)
        (root / "m" / "in.json").write_text("{}")
        files = reproduce.input_files(Stage("00_a", ("{model}/in.json", "@repo/mxmoe/plan.py")), root, "m")
        assert len(files) == 2
        keys.append(reproduce.stage_key(nb, {"model": "m"}, files, root)[0])
    assert keys[0] == keys[1]


def test_pipeline_diagram_is_self_contained(tmp_path):
    from mxmoe.plots import pipeline

    svg, png = pipeline.save(tmp_path)
    text = svg.read_text()
    assert png.stat().st_size > 10_000
    assert "@font-face" not in text and "<text" not in text  # glyphs drawn as paths: no font to fetch
    assert "<!-- 04 allocation -->" in text  # matplotlib keeps each label as a comment beside its outline


def test_healed_files_landing_rerun_the_model_stage(tmp_path):
    from mxmoe.stages import STAGES

    repo, root = tmp_path / "repo", tmp_path / "results"
    (repo / "mxmoe" / "models").mkdir(parents=True)
    (repo / "mxmoe" / "models" / "zoo.py").write_text("")
    before = reproduce.input_files(STAGES[0], root, "smollm2-moe", repo=repo)
    healed = repo / "mxmoe" / "models" / "healed" / "smollm2-moe-v2"
    healed.mkdir(parents=True)
    (healed / "heal.json").write_text("{}")
    after = reproduce.input_files(STAGES[0], root, "smollm2-moe", repo=repo)
    assert STAGES[0].stem == "00_model" and set(after) - set(before) == {healed / "heal.json"}


def test_allocation_stage_reads_the_kernel_sources_its_cost_tables_are_held_to():
    """Stage 04 re-runs when the fingerprinted kernel changes, and not for other files of mxmoe/kernels
    (a docstring of the Gluon prototype leaves the allocations as they are)."""
    from mxmoe.kernels.version import SOURCES
    from mxmoe.paths import REPO_ROOT
    from mxmoe.stages import KERNEL_SOURCES, stage

    assert KERNEL_SOURCES == SOURCES
    files = {p.name for p in reproduce.input_files(stage("04_allocation"), REPO_ROOT / "results", "smollm2-moe")}
    assert set(SOURCES) <= files and "gluon_kernel.py" not in files


def test_disk_use_of_book_sources_leaves_out_the_build(tmp_path):
    """The Runs page's "book sources" size counts the sources, not the build output that changes with every build."""
    from mxmoe.book import _du

    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / "page.html").write_bytes(b"x" * 2**20)
    (tmp_path / "intro.md").write_bytes(b"x" * 2**19)
    assert _du(tmp_path) == "1.5 MiB" and _du(tmp_path, skip=("_build",)) == "0.5 MiB"
