"""Checkpoints resume RNG streams exactly and refuse what is not plain tensors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.errors import WeightsError


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state(), "epoch": 4})
    expected = draws()
    draws()  # move every stream on
    state = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(state["rng"])
    assert draws() == expected and state["epoch"] == 4


def test_pickled_callable_is_refused(tmp_path):
    torch.save({"hook": print}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(1000)})
    blob = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError, match="c.pt"):
        load_checkpoint(tmp_path / "c.pt")


def test_every_method_resumes_across_the_speed_only_train_keys():
    """A speed-only key reruns nothing (pipeline.stage_settings), so a checkpoint must not be
    thrown away when one changes (or appears, for checkpoints written before it existed)."""
    import importlib

    from pipeline.methods import METHODS
    from pipeline.stage_settings import SPEED_ONLY
    from pipeline.training.checkpoints import RESUMABLE_KEYS, settings_fingerprint

    for name in METHODS:
        method = importlib.import_module(f"pipeline.methods.{name}.method")
        resumable = getattr(method, "RESUMABLE_KEYS", RESUMABLE_KEYS)
        assert set(SPEED_ONLY["train"]) <= set(resumable), name
        params = {"backbone": {}, "mode": "weak", "seed": 0,
                  "train": {"method": name, "lr": 0.1, "views_on": "auto", "device": "cpu"}}
        faster = {**params, "train": {**params["train"], "views_on": "device", "device": "cuda"}}
        assert settings_fingerprint(params, [], 2, resumable) == settings_fingerprint(faster, [], 2, resumable)
