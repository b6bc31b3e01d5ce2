"""Training methods, one package each, selected by ``train.method``.

Each ``pipeline.methods.<name>.method`` module provides:

- ``check_settings(train: dict) -> None``: ConfigError for a bad ``train`` section, before any work;
- ``prepare(context: TrainContext) -> MethodRun``: the run the shared trainer drives
  (``pipeline.training``);
- ``load_predictor(payload: dict, backbone: dict, device) -> Predictor``: the trained network
  of a model.pt written by that method, for the shared prediction stage (``pipeline.predict``);
- optionally ``RESUMABLE_KEYS``: the ``train`` keys that may change when a run is resumed
  (default ``pipeline.training.checkpoints.RESUMABLE_KEYS``).

model.pt records the method in ``payload["arch"]["method"]``; prediction dispatches on it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS = ("pc2m", "vitpcm", "rcm_mam", "cam", "csrm")


def load_method(name: str) -> ModuleType:
    """The method module of ``name`` (imported on demand: a job imports only its own method)."""
    if name not in METHODS:
        from pipeline.errors import ConfigError

        raise ConfigError(f"train.method: {name!r} is not one of {', '.join(METHODS)}")
    return importlib.import_module(f"pipeline.methods.{name}.method")
