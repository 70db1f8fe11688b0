"""Where mxmoe keeps caches and results, and how it writes them safely."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Cache for built models and tokenized data: $MXMOE_CACHE_DIR, else ~/.cache/mxmoe."""
    return Path(os.environ.get("MXMOE_CACHE_DIR", Path.home() / ".cache" / "mxmoe"))


def results_dir() -> Path:
    """Root of stage outputs: $MXMOE_RESULTS_DIR, else results/ in the repository."""
    return Path(os.environ.get("MXMOE_RESULTS_DIR", REPO_ROOT / "results"))


def write_json_atomic(path: "str | Path", obj) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
