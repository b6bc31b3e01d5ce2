"""Per-epoch training checkpoints with exact resume: ``checkpoints/epoch-NNNN.pt`` (NNNN = epochs
completed) written atomically after every epoch, ``checkpoints/last.pt`` pointed at it. A
checkpoint holds everything the next epoch depends on (weights, optimiser, the method's own state,
history, the global RNG states), all as tensors and plain values, loadable with
``torch.load(..., weights_only=True)``; its fingerprint (recipe + training data) must match the
run that resumes it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.checkpoint import load_error_reason
from pipeline.errors import BadInputError
from pipeline.training.data import LabelledImage

CHECKPOINT_FORMAT = "training-checkpoint/2"
# Settings that may change when a run is resumed (they do not change the result); a method whose
# schedule spans the whole run (a poly rate) leaves ``epochs`` out (its ``RESUMABLE_KEYS``).
RESUMABLE_KEYS = ("epochs", "num_workers", "device", "keep_checkpoints", "views_on", "compile")
# Those of a method whose schedule spans the whole run: every one but ``epochs``.
WHOLE_RUN_RESUMABLE_KEYS = tuple(key for key in RESUMABLE_KEYS if key != "epochs")


def settings_fingerprint(params: dict, images: list[LabelledImage] | None = None,
                          num_classes: int | None = None, resumable: tuple[str, ...] = RESUMABLE_KEYS) -> str:
    """What a checkpoint must match to be resumed: the recipe and the training data (image ids
    and their labels: new pseudo-labels must not resume a model trained on the old ones)."""
    train = {k: v for k, v in params["train"].items() if k not in resumable}
    record = {"backbone": params["backbone"], "train": train, "mode": params["mode"], "seed": params["seed"]}
    if images is not None:
        data = json.dumps({"num_classes": num_classes, "images": [[i.image_id, list(i.labels)] for i in images]})
        record["data"] = hashlib.sha256(data.encode()).hexdigest()
    return json.dumps(record, sort_keys=True, default=str)


def rng_state() -> dict:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> None:
    """epoch-NNNN.pt written atomically, then last.pt pointed at it (hard link, atomic rename)."""
    folder = out_dir / "checkpoints"
    path = folder / f"epoch-{state['epochs_done']:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / "last.pt") as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the file is not a usable checkpoint
        raise BadInputError(f"{path}: unreadable checkpoint ({load_error_reason(exc)}); delete it to restart") from None
