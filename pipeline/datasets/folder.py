"""Any folder of images, searched recursively, with optional masks and an optional labels CSV.

image_id is the image's path relative to the folder, posix, without extension, so ``a.jpg`` and
``a.png`` side by side are a duplicate id (reported as bad input). Hidden files and folders
(``.name``) are not searched: they hold editor/OS debris such as macOS ``._x.jpg`` forks and
``.ipynb_checkpoints`` copies. An image without a mask file keeps an empty mask_path (partially
annotated folders are allowed; the count is logged).

Splits (``dataset.folder.split``): ``auto`` puts the images under a top-level ``train/``, ``val/``
or ``test/`` sub-folder in that split and every other image in ``train``, so a plain folder is
one split, trained on and predicted whole; any other value is one split for every image.
``split_list`` (CSV ``image_id,split``) then overrides image by image. Ids keep the sub-folder
(``val/dog``), so a mask is found at the same relative path under ``masks``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.datasets.common import BACKGROUND, Dataset, Entry, absolute, config_path, existing_dir, is_within
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import check_image_id

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SECTION = "dataset.folder"
AUTO_SPLIT = "auto"
SPLIT_FOLDERS = ("train", "val", "test")
DEFAULT_SPLIT = "train"


def find_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files, [(path, why it is not indexed)]) under root, sorted; an image is any case of
    IMAGE_SUFFIXES. Hidden files and folders are skipped. Symbolic links to folders are followed
    like those to files, each real folder searched once: a link back up the tree (a loop) or a
    second way into a folder already searched is listed, not searched again."""
    images, ignored = [], []
    searched = {_folder_key(root): root}

    def unreadable(exc: OSError) -> None:
        ignored.append((Path(exc.filename), f"unreadable folder ({exc.strerror})"))

    for folder, subdirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        kept = []
        for name in sorted(d for d in subdirs if not d.startswith(".")):
            path = Path(folder) / name
            key = _folder_key(path)
            first = searched.setdefault(key, path)
            if first is path:
                kept.append(name)
            elif is_within(folder, first):
                ignored.append((path, f"symbolic link loop (back to {first}): not searched again"))
            else:
                ignored.append((path, f"same folder as {first}, already searched: not searched again"))
        subdirs[:] = kept
        for name in sorted(files):
            if not name.startswith("."):
                path = Path(folder) / name
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(path)
                else:
                    ignored.append((path, not_an_image(path)))
    return images, ignored


def _folder_key(path: Path) -> tuple[int, int]:
    """The real folder behind ``path`` (symbolic links followed)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino



def not_an_image(path: Path) -> str:
    accepted = ", ".join(sorted(IMAGE_SUFFIXES))
    return f"not an image file (suffix {path.suffix or 'none'!r}; accepted: {accepted}): ignored"


def image_id_of(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def class_names_from_config(cfg: dict, needed: bool) -> list[str] | None:
    """Background-first names from class_names, or generic ones from num_classes (incl. bg)."""
    names, count = cfg.get("class_names"), cfg.get("num_classes")
    if names is not None:
        if count is not None and count != len(names):
            raise ConfigError(
                f"{SECTION}.num_classes is {count} but {SECTION}.class_names has {len(names)}"
            )
        if len(names) < 2:
            raise ConfigError(f"{SECTION}.class_names needs background and at least one class")
        return [str(name) for name in names]
    if count is not None:
        if count < 2:
            raise ConfigError(f"{SECTION}.num_classes must be >= 2 (background included)")
        return ["background"] + [f"class_{i}" for i in range(1, count)]
    if needed:
        raise ConfigError(
            f"{SECTION}.class_names (or {SECTION}.num_classes) is required with masks or labels"
        )
    return None


def read_id_table(path: Path, column: str, what: str) -> list[tuple[int, str, str]]:
    """(line, image_id, value of ``column``) of a CSV with columns image_id,<column>; each id
    listed once. BadInputError naming the file (and line) otherwise."""
    if not path.is_file():
        raise BadInputError(f"{path}: {what} not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: unreadable {what} ({exc})") from None
    if not {"image_id", column} <= set(table.columns):
        raise BadInputError(f"{path}: needs columns image_id,{column}, has {list(table.columns)}")
    rows, seen = [], set()
    for line, (image_id, value) in enumerate(zip(table["image_id"], table[column]), start=2):
        if image_id in seen:
            raise BadInputError(f"{path}: line {line}: image id {image_id!r} listed twice")
        seen.add(image_id)
        rows.append((line, image_id, value))
    return rows


def read_labels_csv(path: Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    """{image_id: sorted foreground ids}; 0 (background) is accepted and dropped."""
    labels: dict[str, tuple[int, ...]] = {}
    for line, image_id, text in read_id_table(path, "labels", "labels CSV"):
        try:
            check_image_id(image_id)
        except BadInputError as exc:
            raise BadInputError(f"{path}: line {line}: {exc}") from None
        try:
            ids = {int(token) for token in text.split()}
        except ValueError:
            raise BadInputError(f"{path}: line {line}: labels {text!r} are not integers") from None
        out_of_range = sorted(i for i in ids if not 0 <= i < num_classes)
        if out_of_range:
            raise BadInputError(f"{path}: line {line}: class ids {out_of_range} outside 0..{num_classes - 1}")
        labels[image_id] = tuple(sorted(ids - {BACKGROUND}))
    return labels


def split_of(image_id: str, setting: str) -> str:
    """The split of an image id under ``dataset.folder.split`` (see the module docstring)."""
    if setting != AUTO_SPLIT:
        return setting
    top, sep, _ = image_id.partition("/")
    return top if sep and top in SPLIT_FOLDERS else DEFAULT_SPLIT


def read_split_list(path: Path) -> dict[str, str]:
    """{image_id: split} from a CSV with columns image_id,split."""
    splits: dict[str, str] = {}
    for line, image_id, split in read_id_table(path, "split", "split list"):
        if not split.replace("_", "").isalnum() or not split.isascii():
            raise BadInputError(f"{path}: line {line}: split {split!r} is not a name of letters, digits, _")
        splits[image_id] = split
    return splits


def index_folder(cfg: dict) -> Dataset:
    root = existing_dir(config_path(cfg, "images", SECTION), f"{SECTION}.images")
    masks_root = None if cfg.get("masks") in (None, "") else absolute(cfg["masks"])
    labels_path = None if cfg.get("labels") in (None, "") else absolute(cfg["labels"])
    names = class_names_from_config(cfg, needed=masks_root is not None or labels_path is not None)
    if masks_root is not None:
        existing_dir(masks_root, f"{SECTION}.masks")
    labels = {} if labels_path is None else read_labels_csv(labels_path, len(names or []))
    setting = str(cfg.get("split") or AUTO_SPLIT)
    split_list_path = None if cfg.get("split_list") in (None, "") else absolute(cfg["split_list"])
    listed = {} if split_list_path is None else read_split_list(split_list_path)

    images, ignored = find_files(root)
    if ignored:
        log.warning("ignored %d files or folders (listed in skipped.csv), e.g. %s: %s", len(ignored), *ignored[0])
    if not images:
        raise BadInputError(
            f"no images found in {root} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))}; "
            f"{len(ignored)} other files)"
        )
    entries = []
    for path in images:
        image_id = image_id_of(path, root)
        mask = None if masks_root is None else masks_root / f"{image_id}.png"
        entries.append(Entry(
            image_id=image_id,
            image_path=path,
            split=listed.get(image_id) or split_of(image_id, setting),
            mask_path=mask if mask is not None and mask.is_file() else None,
            labels=labels.get(image_id),
        ))
    if labels_path is not None:
        _check_labels_match(labels_path, labels, entries)
    _log_coverage(entries, masks_root, labels_path, labels)
    if split_list_path is not None:
        unknown = len(set(listed) - {entry.image_id for entry in entries})
        if unknown:
            log.warning("%d rows of %s name no image found", unknown, split_list_path)
    return Dataset("folder", names, entries, ignored=[(str(path), reason) for path, reason in ignored])


def _check_labels_match(path: Path, labels: dict[str, tuple[int, ...]], entries: list[Entry]) -> None:
    """A labels file none of whose ids is an image id is a naming mistake (typically ids written
    with their extension), not a dataset without labels: say so before anything trains on it."""
    if set(labels) & {entry.image_id for entry in entries}:
        return
    listed = f"ids such as {next(iter(labels))!r}" if labels else "no rows"
    raise BadInputError(
        f"{path}: no image_id matches an image found: the file has {listed}, the images have ids such as "
        f"{entries[0].image_id!r} (path relative to {SECTION}.images, without extension)"
    )


def _log_coverage(entries: list[Entry], masks_root: Path | None, labels_path: Path | None,
                  labels: dict[str, tuple[int, ...]]) -> None:
    if masks_root is not None:
        missing = sum(entry.mask_path is None for entry in entries)
        if missing:
            log.warning("%d of %d images have no mask in %s", missing, len(entries), masks_root)
    if labels_path is not None:
        unlabelled = sum(entry.image_id not in labels for entry in entries)
        unknown = len(set(labels) - {entry.image_id for entry in entries})
        if unlabelled:
            log.warning("%d images have no row in %s", unlabelled, labels_path)
        if unknown:
            log.warning("%d rows of %s name no image found", unknown, labels_path)
