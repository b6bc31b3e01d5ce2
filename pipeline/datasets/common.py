"""What every dataset adapter hands to the indexer: entries to check, and the class names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import BadInputError, ConfigError

BACKGROUND = 0
IGNORE_INDEX = 255


@dataclass(frozen=True)
class Entry:
    """One image as an adapter found it, before any file is opened."""

    image_id: str
    image_path: Path
    split: str
    mask_path: Path | None = None
    # Foreground class ids from a labels file; None means "derive from the mask, if any".
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Dataset:
    kind: str
    # Background first; None when nothing tells the classes (unsupervised folder of images).
    class_names: list[str] | None
    entries: list[Entry]
    # Adapter-specific facts recorded in classes.json (e.g. which VOC lists were used).
    extra: dict = field(default_factory=dict)
    # (path, reason) of files found but not indexed (e.g. not images): listed in skipped.csv.
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def absolute(path: str | os.PathLike) -> Path:
    """Absolute path, relative ones taken from the working directory (symlinks kept as given)."""
    return Path(os.path.abspath(os.fspath(path)))


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both absolute; compared as written, so
    resolve symbolic links first where they matter)."""
    return os.path.commonpath([os.fspath(path), os.fspath(folder)]) == os.fspath(folder)



def config_path(cfg: dict, key: str, section: str) -> Path:
    """The path under ``cfg[key]``; ConfigError naming ``section.key`` when it is unset."""
    value = cfg.get(key)
    if value in (None, ""):
        raise ConfigError(f"{section}.{key} is not set")
    return absolute(value)


def existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise BadInputError(f"{path}: {what} folder not found")
    return path


def require_entries(entries: list[Entry], where: str) -> list[Entry]:
    if not entries:
        raise BadInputError(f"no images found in {where}")
    return entries
