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


@pytest.fixture()
def full_disk_at_the_third_mask(monkeypatch):
    """``patch(module)``: ``module.write_label_png`` fails with ENOSPC at its third call (the
    earlier ones write); returns the list of paths it was called with."""

    def patch(module) -> list:
        writes, real = [], module.write_label_png

        def failing(path, mask):
            writes.append(path)
            if len(writes) == 3:
                raise OSError(28, "No space left on device")
            real(path, mask)

        monkeypatch.setattr(module, "write_label_png", failing)
        return writes

    return patch
