"""Which kernel this is: a fingerprint of the sources that decide the grouped GEMM's speed.

Every benchmark run records it (``mxmoe.bench.roofline.provenance``) and every cost table carries the
fingerprint of the runs it was built from, so a table measured on another kernel is flagged where it
is loaded (``mxmoe.perfmodel.CostTable.kernel_note``) instead of silently steering allocations with
the costs of code that no longer runs.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

# The kernel, its tile choices, its launch wrapper, the activation quantizer and the packed layout.
SOURCES = ("triton_kernel.py", "configs.py", "group_gemm.py", "act_quant.py", "pack.py")


def _code(source: str) -> str:
    """The code of ``source`` without docstrings, comments or whitespace: comments, formatting and docs do not
    count, and the result is the same on every Python version (a syntax-tree dump is not: its fields change
    between versions, so a table measured under one Python would look foreign under another)."""
    lines = source.encode().splitlines(keepends=True)  # ast offsets count UTF-8 bytes
    spans = []  # ((line, byte col), (line, byte col)) to leave out
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            doc = body[0]
            if isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                spans.append(((doc.lineno, doc.col_offset), (doc.end_lineno, doc.end_col_offset)))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            (row, col), text = tok.start, tok.line
            start = len(text[:col].encode())
            spans.append(((row, start), (row, start + len(tok.string.encode()))))
    keep = bytearray()
    for row, line in enumerate(lines, start=1):
        mask = bytearray(line)
        for (r0, c0), (r1, c1) in spans:
            if r0 <= row <= r1:
                lo = c0 if row == r0 else 0
                hi = c1 if row == r1 else len(line)
                mask[lo:hi] = b" " * (hi - lo)
        keep += mask
    return re.sub(r"\s+", "", keep.decode())


@lru_cache(maxsize=1)
def kernel_fingerprint() -> str:
    """First 12 hex digits of the sha256 over the code of the kernel's source files (``SOURCES``, in that
    order; comments, formatting and docstrings left out, so only a change of code changes it)."""
    h = hashlib.sha256()
    folder = Path(__file__).parent
    for name in SOURCES:
        h.update(name.encode() + b"\0" + _code((folder / name).read_text()).encode() + b"\0")
    return h.hexdigest()[:12]
