"""Writing result and cache files safely: a reader never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: "str | Path", data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and rename, so readers never see
    half a file and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: "str | Path", text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``write_bytes_atomic``)."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: "str | Path", obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (``write_text_atomic``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cached_json(path: "str | Path", params: dict, compute) -> dict:
    """The JSON document at ``path`` when it was written for ``params``; else ``{"params": params, **compute()}``,
    written atomically first (a result computed once per set of inputs, measured again when they change)."""
    path = Path(path)
    hit = json.loads(path.read_text()) if path.exists() else None
    if hit and hit.get("params") == params:
        return hit
    doc = {"params": params, **compute()}
    write_json_atomic(path, doc)
    return doc
