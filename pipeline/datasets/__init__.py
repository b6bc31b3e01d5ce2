"""Dataset stage: turn a dataset on disk into ``manifest.csv``, ``classes.json``, ``skipped.csv``.

Adapters (demo, folder, voc, coco) only list entries; this module checks every file the same way:
ids must be safe and unique, images must decode (or, with ``verify_images: false``, have a
readable header), masks must match their image's size and hold only class ids or 255.
Masks are always fully decoded, whatever ``verify_images`` says: labels come from them and they
are small next to the images.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.atomic import write_csv, write_json, write_text
from pipeline.datasets.common import BACKGROUND, IGNORE_INDEX, Dataset, Entry, is_within
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import BadFileError, check_image_id, image_size, load_mask, load_rgb, printable_path

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "image_id", "image_path", "mask_path", "labels", "has_labels", "split", "width", "height",
    "shard",
]
SKIPPED_COLUMNS = ["image_id", "path", "reason"]
# Beside the manifest: one list per shard, the id -> shard assignment and the shard size it used.
SHARDS_DIR = "shards"
SHARD_ASSIGNMENT = "assignment.csv"
SHARD_LAYOUT = "layout.json"
# A shard list's extra column: the image file's size and mtime, so that an image replaced in place
# by one of the same size still changes its shard's list (and reruns that shard's jobs).
SIGNATURE_COLUMN = "signature"
_MANIFEST_DTYPES = {
    "image_id": str, "image_path": str, "mask_path": str, "labels": str, "has_labels": bool,
    "split": str, "width": np.int64, "height": np.int64, "shard": np.int64,
}


@dataclass(frozen=True)
class Row:
    """One checked image, as it goes into the manifest."""

    image_id: str
    image_path: Path
    mask_path: Path | None
    labels: tuple[int, ...] | None
    split: str
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    image_id: str
    path: str
    reason: str


# ---------------------------------------------------------------------------------------------
# Reading the artifacts (used by later stages)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest with stable dtypes: ids, paths and labels as str ('' never NaN)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: manifest not found")
    frame = pd.read_csv(path, dtype=_MANIFEST_DTYPES, keep_default_na=False, na_filter=False)
    if list(frame.columns) == MANIFEST_COLUMNS + [SIGNATURE_COLUMN]:  # a shard list
        frame = frame.drop(columns=SIGNATURE_COLUMN)
    if list(frame.columns) != MANIFEST_COLUMNS:
        raise BadInputError(f"{path}: columns {list(frame.columns)}, expected {MANIFEST_COLUMNS}")
    # Relative paths are relative to the manifest's folder (stored_paths).
    folder = path.parent.absolute()
    for column in _PATH_COLUMNS:
        frame[column] = [p if p == "" or os.path.isabs(p) else os.path.normpath(folder / p) for p in frame[column]]
    # Ids become file names in every later stage: a crafted row must not reach a writer.
    for line, image_id in enumerate(frame["image_id"], start=2):
        try:
            check_image_id(image_id)
        except BadInputError as exc:
            raise BadInputError(f"{path}: line {line}: {exc}") from None
    return frame


def read_classes(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: classes file not found") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from None


def parse_labels(text: str) -> list[int]:
    """'3 12' -> [3, 12]; '' -> []."""
    try:
        return [int(token) for token in text.split()]
    except ValueError:
        raise BadInputError(f"labels {text!r} are not space-separated integers") from None


def format_labels(labels: tuple[int, ...] | None) -> str:
    return "" if labels is None else " ".join(str(label) for label in sorted(labels))


# ---------------------------------------------------------------------------------------------
# Checking entries


def check_entry(entry: Entry, num_classes: int | None, verify: bool) -> Row:
    """Open the entry's files and return its manifest row; BadFileError names the bad file."""
    if verify:
        height, width = load_rgb(entry.image_path).shape[:2]
    else:
        width, height = image_size(entry.image_path)
    labels = entry.labels
    if entry.mask_path is not None:
        mask_labels = _mask_labels(entry, width, height, num_classes)
        labels = mask_labels if labels is None else labels
    return Row(entry.image_id, entry.image_path, entry.mask_path, labels, entry.split, width,
               height)


def _mask_labels(entry: Entry, width: int, height: int, num_classes: int | None) -> tuple[int, ...]:
    assert entry.mask_path is not None and num_classes is not None  # adapters guarantee both
    mask = load_mask(entry.mask_path, entry.image_path)
    if mask.shape != (height, width):
        raise BadFileError(
            entry.mask_path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but image {entry.image_path.name} is "
            f"{width}x{height}",
        )
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    stray = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
    if stray:
        raise BadFileError(
            entry.mask_path,
            f"mask values {stray} outside the classes 0..{num_classes - 1} (255 = ignore)",
        )
    return tuple(int(v) for v in present if v != BACKGROUND and v != IGNORE_INDEX)


def _id_problems(entries: list[Entry]) -> dict[int, BadFileError]:
    """Unsafe and duplicate ids, by entry position; every holder of a duplicate id is bad."""
    problems: dict[int, BadFileError] = {}
    first_holder: dict[str, int] = {}
    for position, entry in enumerate(entries):
        try:
            check_image_id(entry.image_id)
        except BadInputError as exc:
            problems[position] = BadFileError(entry.image_path, str(exc))
            continue
        if entry.image_id in first_holder:
            other = first_holder[entry.image_id]
            for bad, twin in ((other, position), (position, other)):
                problems[bad] = BadFileError(
                    entries[bad].image_path,
                    f"duplicate image id {entry.image_id!r} (also {entries[twin].image_path})",
                )
        else:
            first_holder[entry.image_id] = position
    return problems


class BadInputPolicy:
    """``error``: raise at the first bad file. ``skip``: warn, remember it for skipped.csv."""

    def __init__(self, mode: str) -> None:
        if mode not in ("error", "skip"):
            raise ConfigError(f"on_bad_input must be 'error' or 'skip', not {mode!r}")
        self.mode = mode
        self.skipped: list[Skipped] = []

    def report(self, entry: Entry, exc: BadFileError) -> None:
        if self.mode == "error":
            raise exc
        log.warning("skipping image %r: %s", entry.image_id, exc)
        self.skipped.append(Skipped(printable_path(entry.image_id), exc.path, exc.reason))


def check_entries(
    dataset: Dataset, verify: bool, policy: BadInputPolicy, threads: int
) -> list[Row]:
    entries = dataset.entries
    id_problems = _id_problems(entries)
    to_open = [entry for position, entry in enumerate(entries) if position not in id_problems]

    def check(entry: Entry) -> Row | BadFileError:
        try:
            return check_entry(entry, dataset.num_classes, verify)
        except BadFileError as exc:
            return exc

    for position in sorted(id_problems):
        policy.report(entries[position], id_problems[position])
    rows: list[Row] = []
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        # Warnings about skipped files go above the progress bar instead of through it.
        with logging_redirect_tqdm(), tqdm(pool.map(check, to_open), total=len(to_open),
                                           desc=f"index {dataset.kind}", unit="img",
                                           file=sys.stderr) as progress:
            for entry, result in zip(to_open, progress):
                if isinstance(result, BadFileError):
                    policy.report(entry, result)
                else:
                    rows.append(result)
    finally:
        # On the first error, do not wait for the rest of a large dataset to be decoded.
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Building the artifacts


def assign_shards(image_ids: list[str], images_per_shard: int, previous: dict[str, int]) -> list[int]:
    """Shard of each id (in the given order). Ids of the previous index keep their shard; new ids
    fill the highest shard while it has room, then new shards, so adding images touches only the
    shards they land in, and removing images leaves the other shards as they were. Without a
    previous index, shards are consecutive runs of ``images_per_shard`` ids."""
    kept = {image_id: previous[image_id] for image_id in image_ids if image_id in previous}
    sizes = Counter(kept.values())
    current = max(previous.values(), default=0)
    shards = []
    for image_id in image_ids:
        if image_id in kept:
            shards.append(kept[image_id])
            continue
        while sizes[current] >= images_per_shard:
            current += 1
        shards.append(current)
        sizes[current] += 1
    return shards


def manifest_frame(rows: list[Row], images_per_shard: int, previous: dict[str, int] | None = None) -> pd.DataFrame:
    """Rows sorted train-first then by split name and id; shards by :func:`assign_shards`."""
    ordered = sorted(rows, key=lambda r: (r.split != "train", r.split, r.image_id))
    frame = pd.DataFrame(
        {
            "image_id": [r.image_id for r in ordered],
            "image_path": [str(r.image_path) for r in ordered],
            "mask_path": ["" if r.mask_path is None else str(r.mask_path) for r in ordered],
            "labels": [format_labels(r.labels) for r in ordered],
            "has_labels": [r.labels is not None for r in ordered],
            "split": [r.split for r in ordered],
            "width": [r.width for r in ordered],
            "height": [r.height for r in ordered],
            "shard": assign_shards([r.image_id for r in ordered], images_per_shard, previous or {}),
        },
        columns=MANIFEST_COLUMNS,
    )
    return frame.astype(_MANIFEST_DTYPES)


_PATH_COLUMNS = ("image_path", "mask_path")


def stored_paths(frame: pd.DataFrame, manifest_dir: Path) -> pd.DataFrame:
    """The manifest's file paths as written: relative to the manifest's folder for files inside
    the working folder (where the run and its images live together), so that a working folder
    moved or copied elsewhere still finds its images; absolute for files outside it (a dataset
    elsewhere does not move with the working folder). :func:`read_manifest` makes them absolute."""
    cwd, folder = os.getcwd(), os.path.abspath(manifest_dir)
    if not is_within(folder, cwd):
        return frame

    def stored(path: str) -> str:
        absolute = os.path.abspath(path)
        return os.path.relpath(absolute, folder) if path and is_within(absolute, cwd) else path

    return frame.assign(**{column: [stored(p) for p in frame[column]] for column in _PATH_COLUMNS})


def classes_info(dataset: Dataset, manifest: pd.DataFrame) -> dict:
    split_counts = manifest["split"].value_counts()
    return {
        "names": dataset.class_names,
        "num_classes": dataset.num_classes,
        "background": BACKGROUND,
        "ignore_index": IGNORE_INDEX,
        "kind": dataset.kind,
        "splits": {split: int(split_counts[split]) for split in sorted(split_counts.index)},
        "num_shards": int(manifest["shard"].nunique()),
        **dataset.extra,
    }



def load_dataset(params: dict) -> Dataset:
    """Dispatch to the adapter of ``params['dataset']['kind']``."""
    cfg = params["dataset"]
    kind = cfg.get("kind")
    if kind == "demo":
        from pipeline.datasets.demo import index_demo

        return index_demo(_required_param(params, "demo_root"))
    if kind == "folder":
        from pipeline.datasets.folder import index_folder

        return index_folder(cfg.get("folder") or {})
    if kind == "voc":
        from pipeline.datasets.voc import index_voc

        return index_voc(cfg.get("voc") or {})
    if kind == "coco":
        from pipeline.datasets.coco import index_coco

        return index_coco(cfg.get("coco") or {}, _required_param(params, "coco_masks"))
    raise ConfigError(f"dataset.kind must be demo, folder, voc or coco, not {kind!r}")


def _required_param(params: dict, key: str):
    if params.get(key) in (None, ""):
        raise ConfigError(f"index params lack {key!r} (set by the workflow rule)")
    return params[key]


def build_index(params: dict, out_dir: Path, threads: int) -> None:
    """Write manifest.csv, classes.json and skipped.csv for the configured dataset into out_dir."""
    cfg = params["dataset"]
    images_per_shard = int(cfg.get("images_per_shard", 16))
    if images_per_shard < 1:
        raise ConfigError(f"dataset.images_per_shard must be >= 1, not {images_per_shard}")
    policy = BadInputPolicy(params.get("on_bad_input", "error"))
    dataset = load_dataset(params)
    rows = check_entries(dataset, bool(cfg.get("verify_images", True)), policy, threads)

    out_dir = Path(out_dir)
    ignored = [Skipped("", path, reason) for path, reason in dataset.ignored]
    skipped = pd.DataFrame([vars(s) for s in ignored + policy.skipped], columns=SKIPPED_COLUMNS)
    write_csv(out_dir / "skipped.csv", skipped)
    if not rows:
        raise BadInputError(
            f"dataset {dataset.kind!r}: all {len(dataset.entries)} images were skipped as bad "
            f"input (see {out_dir / 'skipped.csv'})"
        )
    required = params.get("required_split")
    if required and not any(row.split == required for row in rows):
        found = sorted({row.split for row in rows})
        raise BadInputError(
            f"dataset {dataset.kind!r} has no image in split {required!r} (splits: {', '.join(found)}); "
            "training needs it: put the images under a train/ sub-folder, or set dataset.folder.split "
            "or dataset.folder.split_list"
        )
    if params.get("require_labels") and not any(row.labels is not None for row in rows if row.split == required):
        raise BadInputError(
            f"config key mode is weak, which trains on image-level labels, but no image of split {required!r} has "
            "any: set dataset.folder.labels (a CSV image_id,labels) or dataset.folder.masks, or use mode: unsupervised"
        )
    manifest = manifest_frame(rows, images_per_shard, previous_shards(out_dir / SHARDS_DIR, images_per_shard))
    write_json(out_dir / "classes.json", classes_info(dataset, manifest))
    changed = write_shard_lists(out_dir / SHARDS_DIR, manifest, images_per_shard)
    write_csv(out_dir / "manifest.csv", stored_paths(manifest, out_dir))
    log.info(
        "indexed %d images (%s) into %d shards (%d changed); %d skipped",
        len(manifest), ", ".join(f"{k}: {v}" for k, v in manifest["split"].value_counts().items()),
        manifest["shard"].nunique(), changed, len(skipped),
    )


# ---------------------------------------------------------------------------------------------
# Shard lists: what a per-shard job reads, rewritten only when its rows change


def shard_list_path(shards_dir: Path, shard: int) -> Path:
    return Path(shards_dir) / f"shard-{shard:05d}.csv"


def previous_shards(shards_dir: Path, images_per_shard: int) -> dict[str, int]:
    """{image_id: shard} of the previous index (none when there is none or the shard size changed)."""
    layout = Path(shards_dir) / SHARD_LAYOUT
    try:
        if json.loads(layout.read_text(encoding="utf-8")).get("images_per_shard") != images_per_shard:
            return {}
        frame = pd.read_csv(Path(shards_dir) / SHARD_ASSIGNMENT, dtype={"image_id": str, "shard": np.int64},
                            keep_default_na=False, na_filter=False)
    except (OSError, ValueError, KeyError):
        return {}
    return dict(zip(frame["image_id"], frame["shard"].astype(int), strict=True))


def file_signature(path: str) -> str:
    stat = Path(path).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def write_shard_lists(shards_dir: Path, manifest: pd.DataFrame, images_per_shard: int) -> int:
    """``shards_dir/shard-NNNNN.csv`` (the manifest's rows of one shard) for every shard, each
    written only when its bytes change, so the jobs of untouched shards do not rerun; lists of
    shards that no longer exist are removed. Returns how many lists were written."""
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    wanted = set()
    changed = 0
    for shard, rows in manifest.groupby("shard", sort=True):
        path = shard_list_path(shards_dir, int(shard))
        wanted.add(path.name)
        signed = rows.assign(**{SIGNATURE_COLUMN: [file_signature(p) for p in rows["image_path"]]})
        text = stored_paths(signed, shards_dir).to_csv(index=False)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
            changed += 1
    for stale in shards_dir.glob("shard-*.csv"):
        if stale.name not in wanted:
            stale.unlink()
    write_csv(shards_dir / SHARD_ASSIGNMENT, manifest[["image_id", "shard"]])
    write_json(shards_dir / SHARD_LAYOUT, {"images_per_shard": images_per_shard})
    return changed
