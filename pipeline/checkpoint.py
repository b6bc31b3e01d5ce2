"""Training checkpoints shared by every trainer: atomic, safe to load, exact to resume.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``; RNG states are stored as tensors / lists for that reason.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.errors import WeightsError


def rng_state() -> dict:
    """Every RNG a training step may draw from, in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(part) if isinstance(part, tuple) else part for part in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` atomically: a killed job leaves the previous checkpoint, never half a file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (or any plain-tensor file) safely.

    ``weights_only=True`` refuses pickled code; a refused, truncated or missing file is a
    :class:`WeightsError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        raise WeightsError(f"{path}: unreadable or unsafe checkpoint ({load_error_reason(exc)})") from None


def model_file_kind(payload) -> str:
    """What a loaded ``.pt`` file is, for the message when a stage is given another stage's file
    (a PC2M model to ``predict-deeplab``, a training checkpoint instead of ``model.pt``, ...)."""
    if not isinstance(payload, dict):
        return "not a model file of this pipeline"
    if str(payload.get("format", "")).startswith("pc2m-model") or "classifier.weight" in payload:
        return "a PC2M model (model/model.pt, read by `predict`)"
    arch = payload.get("arch")
    if isinstance(arch, dict) and "method" in arch and "model" in payload:
        return f"a {arch['method']} model (model/model.pt, read by `predict`)"
    if "optimizer" in payload:
        return "a training checkpoint, not a trained model.pt"
    if set(payload) == {"arch", "model"}:
        return "a DeepLab model (deeplab/model.pt, read by `predict-deeplab`)"
    return "not a model file of this pipeline"


def load_error_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed. For a refused pickle, the
    offending global, not torch's advice to retry with weights_only=False (which would run it)."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        match = re.search(r"(?:WeightsUnpickler error: |Trying to load )([^\n]+)", text)
        what = match.group(1).strip().rstrip(".") if match else "it holds pickled objects"
        return f"refused, not a plain tensor file: {what}"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
