"""Which kernel this is: a fingerprint of the sources that decide the grouped GEMM's speed.

Every benchmark run records it (``mxmoe.bench.roofline.provenance``) and every cost table carries the
fingerprint of the runs it was built from, so a table measured on another kernel is flagged where it
is loaded (``mxmoe.perfmodel.CostTable.kernel_note``) instead of silently steering allocations with
the costs of code that no longer runs.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

# The kernel, its tile choices, its launch wrapper, the activation quantizer and the packed layout.
SOURCES = ("triton_kernel.py", "configs.py", "group_gemm.py", "act_quant.py", "pack.py")


@lru_cache(maxsize=1)
def kernel_fingerprint() -> str:
    """First 12 hex digits of the sha256 over the kernel's source files (``SOURCES``), in that order."""
    h = hashlib.sha256()
    folder = Path(__file__).parent
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return h.hexdigest()[:12]
