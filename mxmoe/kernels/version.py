"""Which kernel this is: a fingerprint of the sources that decide the grouped GEMM's speed.

Every benchmark run records it (``mxmoe.bench.roofline.provenance``) and every cost table carries the
fingerprint of the runs it was built from, so a table measured on another kernel is flagged where it
is loaded (``mxmoe.perfmodel.CostTable.kernel_note``) instead of silently steering allocations with
the costs of code that no longer runs.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

# The kernel, its tile choices, its launch wrapper, the activation quantizer and the packed layout.
SOURCES = ("triton_kernel.py", "configs.py", "group_gemm.py", "act_quant.py", "pack.py")


def _code(source: str) -> str:
    """The syntax tree of ``source`` without docstrings: comments, formatting and docs do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


@lru_cache(maxsize=1)
def kernel_fingerprint() -> str:
    """First 12 hex digits of the sha256 over the code of the kernel's source files (``SOURCES``, in that
    order; comments, formatting and docstrings left out, so only a change of code changes it)."""
    h = hashlib.sha256()
    folder = Path(__file__).parent
    for name in SOURCES:
        h.update(name.encode() + b"\0" + _code((folder / name).read_text()).encode() + b"\0")
    return h.hexdigest()[:12]
