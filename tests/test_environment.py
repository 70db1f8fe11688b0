"""environment.yml (conda) and requirements.txt (pip) pin the same packages at the same versions."""

from __future__ import annotations

import re

from mxmoe.env import REPO_ROOT

PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)")


def pins(text: str) -> dict[str, str]:
    """{package: version} of every ``name==version`` line (a requirements line or a YAML list item)."""
    out = {}
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_pins_parse_both_formats():
    assert pins("torch==2.13.0  # why\n# x==1\n      - pulp==3.3.2\n  - -e .\n") == {"torch": "2.13.0", "pulp": "3.3.2"}


def test_environment_yml_lists_the_requirements_pins():
    req = pins((REPO_ROOT / "requirements.txt").read_text())
    env = pins((REPO_ROOT / "environment.yml").read_text())
    assert len(req) >= 10
    missing = sorted(set(req) - set(env))
    extra = sorted(set(env) - set(req))
    differ = sorted(f"{k}: {req[k]} vs {env[k]}" for k in set(req) & set(env) if req[k] != env[k])
    assert not (missing or extra or differ), (
        f"environment.yml lacks {missing}, has extra {extra}, "
        f"versions differ {differ}: make it list requirements.txt's pins"
    )
