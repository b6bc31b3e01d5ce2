from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tests run on CPU with a deterministic, small thread count (CI machines have 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture()
def default_config() -> dict:
    with open(REPO / "config.yaml", encoding="utf-8") as fh:
        return copy.deepcopy(yaml.safe_load(fh))
