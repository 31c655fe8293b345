import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def reference_dir() -> Path:
    return Path(os.environ.get("VGEN_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference():
    """Path to the golden data produced by running the original VGen code."""
    path = reference_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"golden reference data not found at {path} (set VGEN_REFERENCE_DIR)")
    return path


def load_reference_json(name: str) -> dict:
    return json.loads((reference_dir() / name).read_text())
