"""Zero-shot accuracy with lm-eval, the model passed in-process.

With $MXMOE_DATA_DIR set, the tasks are the YAMLs in ``mxmoe/tasks/`` (``mxmoe_<task>``), which
read the local JSONL files and build lm-eval's prompts (the data folder's README.md says where they
differ slightly: ARC's few five-option items, HellaSwag's capitalisation). Without it, the stock
lm-eval tasks of the same names are used and read the Hugging Face hub. The reported metric is
``acc_norm`` where lm-eval reports it (ARC, HellaSwag, PIQA) and ``acc`` otherwise.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from mxmoe.data import TASKS, data_dir
from mxmoe.errors import DataUnavailable, MxMoEError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
METRIC = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "lambada_openai": "acc",
    "lambada_standard": "acc",
    "boolq": "acc",
}


class UnknownTask(MxMoEError):
    """A zero-shot task name that mxmoe does not evaluate."""


def check_args(tasks, limit) -> list[str]:
    """The task list as a list; UnknownTask / MxMoEError for unknown names, no tasks or a limit < 1."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise MxMoEError(f"no zero-shot task given; choose from {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in METRIC]
    if unknown:
        raise UnknownTask(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MxMoEError(f"limit must be a positive number of examples per task or None (all), got {limit!r}")
    return tasks


def _load(tasks: list[str]):
    from lm_eval.tasks import TaskManager

    local = data_dir() is not None
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False) if local else TaskManager()
    names = {t: f"mxmoe_{t}" if local else t for t in tasks}
    try:
        loaded = manager.load(list(names.values()))["tasks"]
    except MxMoEError:
        raise
    except Exception as e:  # hub unreachable, datasets missing: one readable message
        raise DataUnavailable(
            f"could not load the zero-shot tasks {', '.join(tasks)} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}); set MXMOE_DATA_DIR to a local copy"
        ) from None
    return manager, {t: loaded[name] for t, name in names.items()}


def load_tasks(tasks) -> dict:
    """{task: lm-eval Task}: the repo's YAMLs on local data, else the stock hub tasks."""
    return _load(check_args(tasks, None))[1]


def evaluate_tasks(model, tokenizer, tasks=TASKS, limit: int | None = None, batch_size: "int | None" = None) -> dict:
    """Zero-shot accuracy of an in-process HF causal LM on each task, through lm-eval.

    ``limit``: the first ``limit`` examples of each task (None: all); ``batch_size``: requests per
    forward (default 16: a batch of 64 long BoolQ passages needs ~20 GB for its fp32 log-probabilities on a
    GPU, more than several processes sharing one card have). Returns
    ``{task: {"metric": "acc_norm" | "acc", "value": float, "n": examples scored}}``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = check_args(tasks, limit)
    if tokenizer is None:
        raise MxMoEError("zero-shot evaluation needs a tokenizer (random tiny zoo models have none)")
    manager, loaded = _load(tasks)
    batch_size = batch_size or 16
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=list(loaded.values()),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
    )
    result = {}
    for t, task in loaded.items():
        name = task.task_name
        value = out["results"][name][f"{METRIC[t]},none"]
        result[t] = {"metric": METRIC[t], "value": float(value), "n": int(out["n-samples"][name]["effective"])}
    return result


def record(model_name: str, results: dict, limit: int | None, seconds: float, device: str) -> dict:
    """The JSON record of one evaluate_tasks run: results with model, source, limit, device, date, time."""
    import lm_eval

    return {
        "model": model_name,
        "data": "local files under $MXMOE_DATA_DIR"
        if data_dir() is not None
        else "Hugging Face hub (stock lm-eval tasks)",
        "lm_eval": lm_eval.__version__,
        "num_fewshot": 0,
        "limit": limit,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "results": results,
    }
