import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data(monkeypatch):
    """Point MXMOE_DATA_DIR at ../shared/data (skip when this checkout has none beside it)."""
    root = Path(os.environ.get("MXMOE_DATA_DIR", SHARED_DATA))
    if not (root / "wikitext-2" / "wiki.test.raw").exists():
        pytest.skip("no ../shared/data beside this checkout")
    monkeypatch.setenv("MXMOE_DATA_DIR", str(root))
    return root
