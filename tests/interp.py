"""Code run in a child process under Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported, so the kernel tests start a fresh Python for it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(argv: list, timeout: int = 600) -> str:
    """stdout of ``python *argv`` run from the repository root with TRITON_INTERPRET=1 and the repository and
    tests/ importable; fails the calling test with the end of stderr when the child exits non-zero."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
