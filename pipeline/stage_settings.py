"""What reruns a stage: its result settings as a file, the dataset's files as a fingerprint, and
one run at a time per results folder.

Snakemake records a rule's ``params`` only when they are plain values (a function's are recorded
empty), keeps its rerun records in the working directory, and reruns on any change of them,
speed-only keys included. So the workflow writes each stage's *result* settings to
``<results>/settings/<stage>.json`` (rewritten only when the content changes) and takes that file
as an input: a changed value makes the file newer than the stage's outputs, which reruns exactly
that stage and, through its outputs, what follows, whatever the working directory. Keys that only
change speed or logging (:data:`SPEED_ONLY`) go to ``<stage>.runtime.json``, which the stage reads
but which is no input. The stage merges both (``python -m pipeline <stage> --params FILE
--params FILE``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.errors import ConfigError

# Keys of a config section that change how fast a stage runs (or what it logs), never its result.
SPEED_ONLY = {
    "features": ("batch_size", "num_workers", "device"),
    "spectral": ("batch_size", "device"),
    "segment_features": ("batch_size",),
    "train": ("num_workers", "keep_checkpoints", "device", "views_on", "compile"),
    "predict": ("batch_size", "num_workers", "device"),
    "deeplab": ("log_every", "checkpoint_every", "num_workers", "device"),
    "affinity": ("num_workers", "device"),  # AffinityNet random walk
}

LOCK_NAME = ".snakemake-run.lock"


def split_section(name: str, section: dict) -> tuple[dict, dict]:
    """(result keys, speed-only keys) of config section ``name``."""
    speed = SPEED_ONLY.get(name, ())
    return ({k: v for k, v in section.items() if k not in speed},
            {k: v for k, v in section.items() if k in speed})


def settings_text(obj) -> str:
    """The canonical JSON text of a settings object (sorted keys: equal settings, equal bytes)."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def read_text_or_none(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_if_changed(path: str | os.PathLike, obj) -> bool:
    """Write ``obj`` as canonical JSON unless the file already holds exactly that (its mtime is
    then kept, so nothing that depends on it reruns). Returns whether it wrote."""
    path = Path(path)
    text = settings_text(obj)
    if read_text_or_none(path) == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
    return True


def merge_params(parts: list[dict]) -> dict:
    """Deep merge, later parts winning: the stage's settings, its runtime keys, job facts."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_params([merged[key], value])
            else:
                merged[key] = value
    return merged


def files_fingerprint(roots: list[str | os.PathLike]) -> dict:
    """Count and digest of (relative path, size, mtime) of every file under ``roots`` (a file
    root counts as itself; a missing root as absent): any added, removed, replaced or edited
    file changes the digest. Symlinked folders are followed once (loops are cut)."""
    digest = hashlib.sha256()
    count = 0
    for root in map(Path, roots):
        digest.update(f"root {os.fsencode(root)!r}\n".encode())
        if root.is_file():
            stat = root.stat()
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
            count += 1
            continue
        seen: set[tuple[int, int]] = set()
        for folder, subdirs, files in os.walk(root, followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:
                subdirs[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            subdirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                except OSError:  # broken link: the index reports it
                    stat = None
                relative = os.fsencode(os.path.relpath(path, root))
                digest.update(relative + (f" {stat.st_size} {stat.st_mtime_ns}\n" if stat else " broken\n").encode())
                count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def dataset_roots(dataset: dict) -> list[str]:
    """The folders and files a dataset is read from (the demo's is made by the workflow)."""
    kind = dataset["kind"]
    if kind == "folder":
        folder = dataset.get("folder") or {}
        return [folder[key] for key in ("images", "masks", "labels", "split_list") if folder.get(key)]
    if kind == "voc":
        voc = dataset["voc"]
        return [voc["root"]] + [path for path in (voc.get("sbd_masks"), voc.get("trainaug_list")) if path]
    if kind == "coco":
        coco = dataset["coco"]
        return [os.path.join(coco["root"], coco[key]) for key in ("train_images", "val_images")]
    return []


_HELD: dict[Path, int] = {}


def hold_results_lock(results: str | os.PathLike, working_dir: str | os.PathLike) -> None:
    """Take this process's exclusive lock on the results folder for its lifetime (the kernel drops
    it when the process ends, however it ends). ConfigError naming the other run when held."""
    folder = Path(results).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"results folder {folder} is in use by another snakemake run ({other}); wait for it to end "
            "(two runs on one results folder would overwrite each other's files)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, working directory {working_dir}".encode(), 0)
    _HELD[folder] = fd

