"""Run the numbered notebooks (00 ... 06) through papermill, skipping stages that have not changed.

``python -m mxmoe.reproduce [--profile smoke|quick|full] [--model NAME]`` executes every notebook
of ``notebooks/`` that exists, in order, with ``model`` and ``profile`` injected into its
``parameters`` cell, and writes the executed copy to ``<results>/<model>/notebooks/<stem>.ipynb``.

* Skipping: each stage gets a stamp ``<stem>.stamp.json`` beside its executed notebook, keyed by a
  hash of the notebook's source (cells, not outputs), the parameters, and the result files it reads
  (``STAGES``). A stage whose key is unchanged and whose executed notebook exists is skipped. The key
  is taken after the run, so a stage that writes a file it also reads is stable on the next run.
* Failure: the first failing notebook stops the run with its name, the failing cell and the path of
  the saved partial notebook (exit code 1); its stamp is removed so the next run retries it.
* The smoke profile writes to ``$MXMOE_RESULTS_DIR`` (default ``<cache>/smoke-results``), never to
  the committed ``results/``.

``python -m mxmoe.reproduce book`` builds the Jupyter Book from the executed notebooks (see
:mod:`mxmoe.book`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mxmoe.env import REPO_ROOT, device_name
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.paths import default_model, kernel_results_dir, model_dirname, resolve_results_dir, results_dir
from mxmoe.profiles import default_profile, get_profile
from mxmoe.stages import STAGES, Stage

STAMP_VERSION = 1


class NotebookFailed(MxMoEError):
    """A notebook raised: names the notebook, the failing cell and the saved partial notebook."""

    def __init__(self, stem: str, cell: str, partial: Path, error: str):
        self.stem, self.cell, self.partial, self.error = stem, cell, partial, error
        super().__init__(f"notebook {stem} failed in {cell}: {error}\n  partial notebook saved at {partial}")


def notebook_source_hash(path: Path) -> str:
    """sha256 of a notebook's cell types and sources (outputs and metadata ignored)."""
    nb = json.loads(Path(path).read_text())
    h = hashlib.sha256()
    for cell in nb.get("cells", []):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        h.update(cell.get("cell_type", "").encode() + b"\0" + src.encode() + b"\0")
    return h.hexdigest()


def input_files(stage: Stage, root: Path, model: str, repo: Path = REPO_ROOT) -> list[Path]:
    """The files a stage reads that exist now, sorted."""
    out: set[Path] = set()
    for pattern in stage.reads:
        if pattern.startswith("@repo/"):
            base, pat = repo, pattern[len("@repo/") :]
        elif pattern.startswith("kernels/"):
            base, pat = kernel_results_dir(root), pattern[len("kernels/") :]
        else:
            base, pat = root, pattern.format(model=model_dirname(model))
        out.update(p for p in base.glob(pat) if p.is_file())
    return sorted(out)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _input_name(path: Path, root: Path, repo: Path = REPO_ROOT) -> str:
    """A path relative to the results root ('smollm2-moe/model.json') or the repository ('@repo/mxmoe/x.py'),
    so a clone in another folder computes the same keys."""
    path = Path(path)
    if path.is_relative_to(root):
        return str(path.relative_to(root))
    if path.is_relative_to(repo):
        return "@repo/" + str(path.relative_to(repo))
    return str(path)


def stage_key(nb_path: Path, params: dict, inputs: list[Path], root: "Path | None" = None) -> tuple[str, dict]:
    """(key, parts): the hash that decides whether a stage must re-run, and what went into it."""
    root = Path(root) if root is not None else results_dir()
    parts = {
        "version": STAMP_VERSION,
        "notebook": notebook_source_hash(nb_path),
        "parameters": params,
        "inputs": {_input_name(p, root): file_hash(p) for p in inputs},
    }
    return key_of(parts), parts


def key_of(parts: dict) -> str:
    """The stamp key of a stage's parts (``stage_key``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def key_after_run(before: dict, after: dict) -> "tuple[str, dict]":
    """The stamp of a stage that just ran: the notebook and the repository's files as they were when it
    started (an edit made during the run re-runs it next time), the result files as they are now (its own
    writes included, so a stage that writes a file it also reads is stable)."""
    repo = {k: v for k, v in before["inputs"].items() if k.startswith("@repo/")}
    results = {k: v for k, v in after["inputs"].items() if not k.startswith("@repo/")}
    parts = {**after, "notebook": before["notebook"], "inputs": {**results, **repo}}
    return key_of(parts), parts


@dataclass
class StageResult:
    stem: str
    status: str  # "ran" | "skipped" | "missing" | "blocked" (a stage it needs has no notebook yet)
    seconds: float = 0.0
    output: "Path | None" = None


def _heartbeat(stem: str, t0: float, stop: threading.Event, every: float, log) -> None:
    while not stop.wait(every):
        log(f"    ... {stem} still running, {time.time() - t0:.0f} s")


def _cell_label(err) -> str:
    """'cell 5 (execution count 4): <first line of source>' from a PapermillExecutionError."""
    first = (getattr(err, "source", "") or "").strip().splitlines()
    src = first[0][:100] if first else ""
    return f"cell {err.cell_index} (execution count {err.exec_count}): {src!r}"


def run_stage(
    nb_path: Path, out_path: Path, params: dict, cwd: Path, progress: bool, log, heartbeat: float = 60.0
) -> float:
    """Execute one notebook with papermill; raise NotebookFailed naming the failing cell. Returns seconds."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stop = threading.Event()
    beat = None
    if not progress and heartbeat > 0:
        beat = threading.Thread(target=_heartbeat, args=(nb_path.stem, t0, stop, heartbeat, log), daemon=True)
        beat.start()
    try:
        pm.execute_notebook(
            str(nb_path),
            str(out_path),
            parameters=params,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=progress,
            log_output=False,
        )
    except PapermillExecutionError as e:
        raise NotebookFailed(nb_path.stem, _cell_label(e), out_path, f"{e.ename}: {e.evalue}") from None
    except Exception as e:  # kernel died, bad notebook JSON, ...
        raise NotebookFailed(
            nb_path.stem, "(before or between cells)", out_path, f"{type(e).__name__}: {str(e).strip()[:500]}"
        ) from None
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=1)
    clean_executed(out_path, REPO_ROOT)
    return time.time() - t0


def clean_executed(executed: Path, root: Path) -> None:
    """Keep an executed notebook free of machine detail: papermill's input and output paths relative to
    ``root``, and no stderr stream (progress bars, library warnings that name the environment's paths)."""
    nb = json.loads(executed.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        path = Path(meta.get(key) or "")
        if path.is_absolute() and path.is_relative_to(root):
            meta[key] = str(path.relative_to(root))
    for cell in nb.get("cells", []):
        if cell.get("outputs"):
            cell["outputs"] = [
                o for o in cell["outputs"] if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
            ]
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def reproduce(
    profile: "str | None" = None,
    model: "str | None" = None,
    notebooks_dir: "Path | None" = None,
    only: "list[str] | None" = None,
    force: bool = False,
    extra: "dict | None" = None,
    stages=None,
    progress: "bool | None" = None,
    log=print,
    heartbeat: float = 60.0,
) -> list[StageResult]:
    """Run the stages in order; return what happened to each. Raises NotebookFailed on the first failure."""
    stages = STAGES if stages is None else stages
    profile = profile or default_profile()
    get_profile(profile)  # validates the name
    model = model or default_model(profile)
    nb_dir = Path(notebooks_dir or REPO_ROOT / "notebooks")
    root = resolve_results_dir(profile)
    os.environ["MXMOE_RESULTS_DIR"] = str(root)  # the kernels inherit it: every stage writes to the same root
    out_dir = root / model_dirname(model) / "notebooks"
    params = {"model": model, "profile": profile, **(extra or {})}
    progress = sys.stderr.isatty() if progress is None else progress

    wanted = [s for s in stages if not only or s.stem in only or s.stem[:2] in only]
    exists = {s.stem for s in stages if (nb_dir / f"{s.stem}.ipynb").exists()}
    missing = [s.stem for s in wanted if s.stem not in exists]
    blocked = {s.stem: [n for n in s.needs if n not in exists] for s in wanted if s.stem in exists}
    blocked = {k: v for k, v in blocked.items() if v}
    present = [s for s in wanted if s.stem in exists and s.stem not in blocked]
    log(f"mxmoe reproduce: profile {profile}, model {model}, results {root}")
    log(
        f"  notebooks: {len(present)} of {len(wanted)} to run" + (f"; missing: {', '.join(missing)}" if missing else "")
    )
    for stem, needs in blocked.items():
        log(f"  {stem}: not run, it needs {', '.join(needs)}, which has no notebook yet")

    results: list[StageResult] = []
    t_all = time.time()
    for i, stage in enumerate(present, 1):
        nb_path = nb_dir / f"{stage.stem}.ipynb"
        out_path = out_dir / f"{stage.stem}.ipynb"
        stamp_path = out_dir / f"{stage.stem}.stamp.json"
        key, before = stage_key(nb_path, params, input_files(stage, root, model), root)
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        tag = f"[{i}/{len(present)}] {stage.stem}"
        if not force and out_path.exists() and stamp.get("key") == key:
            log(f"{tag}: unchanged, skipped (ran {stamp.get('finished', '?')} in {stamp.get('seconds', 0):.1f} s)")
            results.append(StageResult(stage.stem, "skipped", 0.0, out_path))
            continue
        log(f"{tag}: running ... (total so far {time.time() - t_all:.0f} s)")
        stamp_path.unlink(missing_ok=True)
        seconds = run_stage(nb_path, out_path, params, nb_dir, progress, log, heartbeat)
        key, parts = key_after_run(before, stage_key(nb_path, params, input_files(stage, root, model), root)[1])
        write_json_atomic(
            stamp_path,
            {
                "key": key,
                "stage": stage.stem,
                "parameters": params,
                "seconds": round(seconds, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "device": device_name(),
                "inputs": parts["inputs"],
            },
        )
        log(f"{tag}: done in {seconds:.1f} s -> {out_path}")
        results.append(StageResult(stage.stem, "ran", seconds, out_path))
    results += [StageResult(m, "missing") for m in missing] + [StageResult(b, "blocked") for b in blocked]
    ran = sum(r.status == "ran" for r in results)
    log(
        f"mxmoe reproduce: {ran} ran, {sum(r.status == 'skipped' for r in results)} skipped, "
        f"{len(missing)} missing, {len(blocked)} blocked, {time.time() - t_all:.1f} s"
    )
    return results


def _parse_extra(pairs: list[list[str]]) -> dict:
    out = {}
    for k, v in pairs or []:
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(prog="mxmoe reproduce", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    for name in ("run", None):
        q = sub.add_parser("run", help="run the notebooks (the default)") if name else p
        q.add_argument(
            "--profile",
            choices=("smoke", "quick", "full"),
            default=None,
            help="default: full with a CUDA GPU, else quick",
        )
        q.add_argument("--model", default=None, help="zoo name, HF id or local folder (default: the profile's)")
        q.add_argument("--notebooks", type=Path, default=None, help="folder of the notebooks (default notebooks/)")
        q.add_argument("--only", nargs="*", default=None, help="stems or numbers, e.g. 00 06")
        q.add_argument("--force", action="store_true", help="re-run even unchanged stages")
        q.add_argument(
            "-p",
            "--param",
            nargs=2,
            action="append",
            metavar=("NAME", "VALUE"),
            help="extra notebook parameter (value parsed as JSON when it can be)",
        )
        q.add_argument("--book", action="store_true", help="build the book afterwards")
    b = sub.add_parser("book", help="copy the executed notebooks into the book and build it")
    b.add_argument("--profile", choices=("smoke", "quick", "full"), default=None)
    b.add_argument("--model", default=None)
    b.add_argument("--out", type=Path, default=None, help="build folder (default book/_build)")
    b.add_argument("--strict", action="store_true", help="warnings are errors (-W -n --keep-going)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "book":
            from mxmoe import book

            return book.main(_book_argv(args))
        reproduce(args.profile, args.model, args.notebooks, args.only, args.force, _parse_extra(args.param))
        if args.book:
            from mxmoe import book

            return book.main(_book_argv(args))
    except NotebookFailed as e:
        print(
            f"mxmoe reproduce: FAILED\n  notebook: {e.stem}\n  cell: {e.cell}\n  error: {e.error}\n"
            f"  partial notebook: {e.partial}",
            file=sys.stderr,
        )
        return 1
    except MxMoEError as e:
        print(f"mxmoe reproduce: {e}", file=sys.stderr)
        return 2
    return 0


def _book_argv(args) -> list[str]:
    out = []
    if args.profile:
        out += ["--profile", args.profile]
    if args.model:
        out += ["--model", args.model]
    if getattr(args, "out", None):
        out += ["--out", str(args.out)]
    if getattr(args, "strict", False):
        out += ["--strict"]
    return out


if __name__ == "__main__":
    sys.exit(main())
