"""Dataset stage: adapters on tiny trees, the demo generator, bad-input policy, manifest format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.datasets import (
    MANIFEST_COLUMNS,
    Row,
    build_index,
    manifest_frame,
    parse_labels,
    read_classes,
    read_manifest,
)
from pipeline.datasets.coco import convert_coco_annotations
from pipeline.datasets.demo import generate_demo
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_mask, write_label_png


def _image(path: Path, width: int = 16, height: int = 12, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _mask(path: Path, labels: list[int], width: int = 16, height: int = 12) -> Path:
    """A mask with one vertical band per label (and background in the rest)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for k, label in enumerate(labels):
        mask[:, k * 3:(k + 1) * 3] = label
    write_label_png(path, mask)
    return path


def _params(kind: str, on_bad_input: str = "error", verify: bool = True, **sections) -> dict:
    dataset = {"kind": kind, "images_per_shard": 2, "verify_images": verify}
    dataset.update(sections)
    return {"dataset": dataset, "on_bad_input": on_bad_input, "seed": 0}


def _index(params: dict, out: Path) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    build_index(params, out, threads=2)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    return read_manifest(out / "manifest.csv"), read_classes(out / "classes.json"), skipped


# --- demo ------------------------------------------------------------------------------------

DEMO_SIZE = {"n_train": 8, "n_val": 4, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=0, **DEMO_SIZE)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_demo_is_deterministic_per_seed(demo_root, tmp_path):
    generate_demo(tmp_path / "same", seed=0, **DEMO_SIZE)
    generate_demo(tmp_path / "other", seed=1, **DEMO_SIZE)
    same, other, first = _files(tmp_path / "same"), _files(tmp_path / "other"), _files(demo_root)
    assert same == first
    assert len(first) == 2 * 12 + 1  # images + masks + meta.json, no leftovers
    images = [name for name in first if name.startswith("images/")]
    assert all(first[name] != other[name] for name in images)


def test_demo_classes_labels_and_object_counts(demo_root, tmp_path):
    manifest, classes, skipped = _index(_params("demo") | {"demo_root": str(demo_root)},
                                        tmp_path / "idx")
    assert classes["names"] == ["background", "disc", "square", "triangle", "cross"]
    assert classes["num_classes"] == 5 and classes["splits"] == {"train": 8, "val": 4}
    assert skipped.empty
    assert manifest["has_labels"].all()
    for split, rows in manifest.groupby("split"):
        present = set().union(*(parse_labels(s) for s in rows["labels"]))
        assert present == {1, 2, 3, 4}, split
    for row in manifest.itertuples():
        mask = load_mask(row.mask_path)
        assert parse_labels(row.labels) == sorted(set(np.unique(mask).tolist()) - {0})
        assert 1 <= len(parse_labels(row.labels)) <= 3
        assert (row.width, row.height) == (64, 48)
    assert max(len(parse_labels(s)) for s in manifest["labels"]) > 1  # some images hold several


def test_demo_classes_differ_in_colour(demo_root):
    """The mean colour of each class is far from every other class's (separable by colour)."""
    sums, counts = np.zeros((5, 3)), np.zeros(5)
    for mask_path in (demo_root / "masks" / "train").glob("*.png"):
        mask = load_mask(mask_path)
        rgb = np.asarray(Image.open(demo_root / "images" / "train" / mask_path.name), float)
        for cls in range(1, 5):
            sums[cls] += rgb[mask == cls].sum(0)
            counts[cls] += (mask == cls).sum()
    means = sums[1:] / counts[1:, None]
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 60


def test_demo_index_requires_meta(tmp_path):
    (tmp_path / "demo").mkdir()
    with pytest.raises(BadInputError, match="meta.json"):
        build_index(_params("demo") | {"demo_root": str(tmp_path / "demo")}, tmp_path / "o", 1)


# --- folder ----------------------------------------------------------------------------------


def _folder_tree(root: Path) -> dict:
    images, masks = root / "images", root / "masks"
    _image(images / "a.jpg")
    _image(images / "sub" / "b.PNG")
    _image(images / "sub" / "deep" / "c.webp")
    _image(images / "d.TIFF")
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden.jpg").write_bytes(b"AppleDouble junk")  # hidden: never opened
    _mask(masks / "a.png", [1, 2])
    _mask(masks / "sub" / "b.png", [3, 255])
    labels = root / "labels.csv"
    labels.write_text("image_id,labels\na,1 2\nsub/deep/c,0 3\n")
    return {"images": str(images), "masks": str(masks), "labels": str(labels),
            "class_names": ["background", "x", "y", "z"], "num_classes": None, "split": "train"}


def test_folder_adapter_finds_nested_mixed_images_masks_and_labels(tmp_path):
    folder = _folder_tree(tmp_path)
    manifest, classes, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    rows = manifest.set_index("image_id")
    assert sorted(rows.index) == ["a", "d", "sub/b", "sub/deep/c"]
    assert rows.loc["a", "labels"] == "1 2" and rows.loc["a", "mask_path"].endswith("masks/a.png")
    assert rows.loc["sub/b", "labels"] == "3"  # from the mask: 255 is not a class
    assert rows.loc["sub/deep/c", "labels"] == "3" and rows.loc["sub/deep/c", "mask_path"] == ""
    assert not rows.loc["d", "has_labels"] and rows.loc["d", "labels"] == ""
    assert rows.loc["a", "has_labels"]
    assert (manifest["split"] == "train").all()
    assert all(Path(p).is_absolute() for p in manifest["image_path"])
    assert classes["num_classes"] == 4 and classes["names"][0] == "background"


def test_folder_masks_require_class_names(tmp_path):
    folder = _folder_tree(tmp_path) | {"class_names": None}
    with pytest.raises(ConfigError, match="dataset.folder.class_names"):
        build_index(_params("folder", folder=folder), tmp_path / "idx", 1)


def test_folder_without_annotations_is_unsupervised(tmp_path):
    _image(tmp_path / "imgs" / "x.png")
    folder = {"images": str(tmp_path / "imgs"), "masks": None, "labels": None,
              "class_names": None, "num_classes": None, "split": "val"}
    manifest, classes, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    assert classes["num_classes"] is None and classes["splits"] == {"val": 1}
    assert manifest.loc[0, "has_labels"] == False  # noqa: E712 - numpy bool
    assert manifest.loc[0, "mask_path"] == ""


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "readme.txt").write_text("no images here")
    folder = {"images": str(tmp_path / "imgs"), "split": "train"}
    with pytest.raises(BadInputError, match=r"no images found in .*imgs \(accepted: .*\.jpg.*; 1 other files\)"):
        build_index(_params("folder", folder=folder), tmp_path / "idx", 1)


def test_non_image_files_are_ignored_and_listed(tmp_path):
    folder = _folder_tree(tmp_path)
    manifest, _, skipped = _index(_params("folder", folder=folder), tmp_path / "idx")
    assert len(manifest) == 4
    assert list(skipped["path"]) == [str(Path(folder["images"]) / "notes.txt")]
    assert "not an image file (suffix '.txt'" in skipped.loc[0, "reason"]


def _split_tree(root: Path) -> str:
    for name in ("train/a.png", "train/sub/b.png", "val/c.png", "val/d.png", "test/e.png", "other/f.png",
                 "g.png", "training/h.png"):
        _image(root / name)
    return str(root)


def test_folder_auto_split_takes_top_level_split_folders(tmp_path):
    folder = {"images": _split_tree(tmp_path / "imgs"), "split": "auto"}
    manifest, classes, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    splits = dict(zip(manifest["image_id"], manifest["split"]))
    assert splits == {"train/a": "train", "train/sub/b": "train", "val/c": "val", "val/d": "val",
                      "test/e": "test", "other/f": "train", "g": "train", "training/h": "train"}
    assert classes["splits"] == {"test": 1, "train": 5, "val": 2}


def test_folder_split_name_puts_every_image_in_it(tmp_path):
    folder = {"images": _split_tree(tmp_path / "imgs"), "split": "train"}
    manifest, _, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    assert set(manifest["split"]) == {"train"}


def test_folder_split_list_overrides_per_image(tmp_path):
    listing = tmp_path / "splits.csv"
    listing.write_text("image_id,split\ng,val\ntrain/a,holdout\nmissing,val\n")
    folder = {"images": _split_tree(tmp_path / "imgs"), "split": "auto", "split_list": str(listing)}
    manifest, _, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    splits = dict(zip(manifest["image_id"], manifest["split"]))
    assert splits["g"] == "val" and splits["train/a"] == "holdout" and splits["val/c"] == "val"
    listing.write_text("image_id,split\ng,val/x\n")
    with pytest.raises(BadInputError, match=r"splits.csv: line 2: split 'val/x'"):
        build_index(_params("folder", folder=folder), tmp_path / "idx2", 1)


def test_a_dataset_without_the_required_split_stops_at_the_index(tmp_path):
    _image(tmp_path / "imgs" / "val" / "x.png")
    params = _params("folder", folder={"images": str(tmp_path / "imgs"), "split": "auto"})
    with pytest.raises(BadInputError, match=r"no image in split 'train' \(splits: val\); training needs it"):
        build_index({**params, "required_split": "train"}, tmp_path / "idx", 1)
    assert not (tmp_path / "idx" / "manifest.csv").exists()


# --- VOC -------------------------------------------------------------------------------------


def _voc_tree(root: Path, aug_format: str) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    ids = [f"2007_00000{i}" for i in range(1, 6)]
    for k, image_id in enumerate(ids):
        _image(voc / "JPEGImages" / f"{image_id}.jpg", value=k)
        _mask(voc / "SegmentationClass" / f"{image_id}.png", [k + 1, 255])
        _mask(voc / "SegmentationClassAug" / f"{image_id}.png", [k + 11])  # differs on purpose
    (lists / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[3:]) + "\n\n")
    aug_ids = ids[:3]
    if aug_format == "paths":
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in aug_ids]
    else:
        lines = aug_ids
    (lists / "trainaug.txt").write_text("\n".join(lines) + "\n")
    return voc


def _voc_section(train_split: str) -> dict:
    # Relative paths, as in config.yaml: taken from the working directory.
    voc = "VOCdevkit/VOC2012"
    return {"root": voc, "sbd_masks": f"{voc}/SegmentationClassAug",
            "trainaug_list": f"{voc}/ImageSets/Segmentation/trainaug.txt",
            "train_split": train_split, "val_split": "val"}


@pytest.mark.parametrize("aug_format", ["paths", "ids"])
def test_voc_trainaug_uses_sbd_masks(tmp_path, monkeypatch, aug_format):
    _voc_tree(tmp_path, aug_format)
    monkeypatch.chdir(tmp_path)
    manifest, classes, _ = _index(_params("voc", voc=_voc_section("trainaug")), tmp_path / "idx")
    assert len(classes["names"]) == 21 and classes["names"][15] == "person"
    assert classes["source_splits"] == {"train": "trainaug", "val": "val"}
    assert manifest["split"].tolist() == ["train"] * 3 + ["val"] * 2
    train = manifest[manifest["split"] == "train"]
    assert train["labels"].tolist() == ["11", "12", "13"]
    assert all("SegmentationClassAug" in p for p in train["mask_path"])
    val = manifest[manifest["split"] == "val"]
    assert val["labels"].tolist() == ["4", "5"]  # 255 border ignored
    assert all(p.startswith(str(tmp_path)) for p in manifest["image_path"])
    # Inside the working folder the file stores them relative to itself (a moved folder still works).
    stored = pd.read_csv(tmp_path / "idx" / "manifest.csv", dtype=str)["image_path"]
    assert all(p.startswith("../VOCdevkit/VOC2012/") for p in stored)


def test_voc_train_uses_segmentation_class(tmp_path, monkeypatch):
    _voc_tree(tmp_path, "ids")
    monkeypatch.chdir(tmp_path)
    manifest, _, _ = _index(_params("voc", voc=_voc_section("train")), tmp_path / "idx")
    train = manifest[manifest["split"] == "train"]
    assert train["labels"].tolist() == ["1", "2", "3"]
    assert all("/SegmentationClass/" in p for p in train["mask_path"])


def test_voc_missing_list_names_it(tmp_path, monkeypatch):
    voc = _voc_tree(tmp_path, "ids")
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match="trainaug.txt"):
        build_index(_params("voc", voc=_voc_section("trainaug")), tmp_path / "idx", 1)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_voc_missing_image_file(tmp_path, monkeypatch, policy):
    voc = _voc_tree(tmp_path, "ids")
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    monkeypatch.chdir(tmp_path)
    params = _params("voc", policy, voc=_voc_section("trainaug"))
    if policy == "error":
        with pytest.raises(BadInputError, match="2007_000002.jpg: missing file"):
            build_index(params, tmp_path / "idx", 1)
        return
    manifest, _, skipped = _index(params, tmp_path / "idx")
    assert "2007_000002" not in set(manifest["image_id"]) and len(manifest) == 4
    assert skipped["image_id"].tolist() == ["2007_000002"]
    assert skipped.loc[0, "path"].endswith("2007_000002.jpg")
    assert skipped.loc[0, "reason"] == "missing file"


# --- COCO ------------------------------------------------------------------------------------


def _uncompressed_rle(binary: np.ndarray) -> dict:
    """COCO's iscrowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = binary.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": list(binary.shape)}


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _coco_json(path: Path, split: str) -> list[str]:
    height, width = 20, 30
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[0:10, 0:8] = 1  # top-left corner; overlaps the big square at x 4..7, y 4..9
    compressed = np.zeros((height, width), dtype=np.uint8)
    compressed[15:19, 25:29] = 1
    rle = mask_utils.encode(np.asfortranarray(compressed))
    rle["counts"] = rle["counts"].decode("ascii")
    names = [f"COCO_{split}2014_{i:012d}.jpg" for i in (1, 2)]
    coco = {
        "images": [{"id": 1, "file_name": names[0], "height": height, "width": width},
                   {"id": 2, "file_name": names[1], "height": height, "width": width}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"},
                       {"id": 7, "name": "train"}],
        "annotations": [
            # small square listed first, so only area ordering keeps it on top of the big one
            {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 16.0,
             "segmentation": _square(8, 8, 12, 12)},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 256.0,
             "segmentation": _square(4, 4, 20, 16)},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 80.0,
             "segmentation": _uncompressed_rle(crowd)},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16.0,
             "segmentation": rle},
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return names


def test_coco_conversion_pixels(tmp_path):
    names = _coco_json(tmp_path / "ann.json", "train")
    convert_coco_annotations(tmp_path / "ann.json", tmp_path / "masks", threads=2)
    categories = json.loads((tmp_path / "masks" / "categories.json").read_text())
    assert categories["names"] == ["background", "person", "car", "train"]
    assert categories["file_names"] == names
    mask = load_mask(tmp_path / "masks" / f"{Path(names[0]).stem}.png")
    assert mask.shape == (20, 30)
    assert mask[10, 10] == 3  # small 'train' square (category 7 -> class 3) on top
    assert mask[14, 17] == 2  # big 'car' square (category 3 -> class 2)
    assert mask[2, 2] == 255  # crowd only: ignored
    assert mask[7, 6] == 2  # crowd under an instance: the instance's class
    assert mask[16, 26] == 1  # compressed RLE 'person' (category 1 -> class 1)
    assert mask[18, 2] == 0 and mask[2, 28] == 0
    empty = load_mask(tmp_path / "masks" / f"{Path(names[1]).stem}.png")
    assert empty.shape == (20, 30) and not empty.any()  # no annotations: all background


def test_coco_index(tmp_path):
    root = tmp_path / "coco"
    masks = {}
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}2014.json"
        for name in _coco_json(ann, split):
            _image(root / f"{split}2014" / name, width=30, height=20)
        masks[split] = str(tmp_path / f"masks_{split}")
        convert_coco_annotations(ann, Path(masks[split]), threads=1)
    section = {"root": str(root), "train_images": "train2014", "val_images": "val2014"}
    manifest, classes, _ = _index(_params("coco", coco=section) | {"coco_masks": masks},
                                  tmp_path / "idx")
    assert classes["num_classes"] == 4 and classes["splits"] == {"train": 2, "val": 2}
    rows = manifest.set_index("image_id")
    assert rows.loc["COCO_train2014_000000000001", "labels"] == "1 2 3"
    assert rows.loc["COCO_val2014_000000000002", "labels"] == ""
    assert rows.loc["COCO_val2014_000000000002", "has_labels"]  # known: no foreground


def test_coco_index_requires_converted_masks(tmp_path):
    (tmp_path / "coco").mkdir()
    masks = {"train": str(tmp_path / "m1"), "val": str(tmp_path / "m2")}
    params = _params("coco", coco={"root": str(tmp_path / "coco")}) | {"coco_masks": masks}
    with pytest.raises(BadInputError, match="categories.json"):
        build_index(params, tmp_path / "idx", 1)


# --- bad input policy ------------------------------------------------------------------------


def _good_folder(root: Path) -> dict:
    for name in ("a", "b", "c"):
        _image(root / "images" / f"{name}.png")
        _mask(root / "masks" / f"{name}.png", [1])
    return {"images": str(root / "images"), "masks": str(root / "masks"), "labels": None,
            "class_names": ["background", "thing", "stuff"], "split": "train"}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break(root: Path, problem: str) -> tuple[str, str]:
    """Damage image 'b' (or add a bad file); return (bad image id, name of the bad file)."""
    images, masks = root / "images", root / "masks"
    if problem == "corrupt":
        (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        return "b", "b.png"
    if problem == "truncated_png":
        _image(images / "b.png", width=64, height=64)
        _mask(masks / "b.png", [1], width=64, height=64)
        _truncate(images / "b.png")
        return "b", "b.png"
    if problem == "truncated_jpeg":
        (images / "b.png").unlink()
        _image(images / "b.jpg", width=64, height=64)
        _truncate(images / "b.jpg")
        return "b", "b.jpg"
    if problem == "empty":
        (images / "b.png").write_bytes(b"")
        return "b", "b.png"
    if problem == "mask_size":
        _mask(masks / "b.png", [1], width=10, height=12)
        return "b", "b.png"
    if problem == "stray_mask_values":
        _mask(masks / "b.png", [1, 9])
        return "b", "b.png"
    if problem == "duplicate_id":
        _image(images / "b.jpg")
        return "b", "b.jpg"
    if problem == "unsafe_id":
        _image(images / "bad\\name.png")
        return "bad\\name", "bad\\name.png"
    raise AssertionError(problem)


PROBLEMS = ["corrupt", "truncated_png", "truncated_jpeg", "empty", "mask_size",
            "stray_mask_values", "duplicate_id", "unsafe_id"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_input_error_names_the_file(tmp_path, problem):
    folder = _good_folder(tmp_path)
    _, bad_name = _break(tmp_path, problem)
    with pytest.raises(BadInputError) as caught:
        build_index(_params("folder", folder=folder), tmp_path / "idx", 2)
    assert bad_name in str(caught.value)
    assert not (tmp_path / "idx" / "manifest.csv").exists()


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_input_skip_drops_and_lists_it(tmp_path, problem):
    folder = _good_folder(tmp_path)
    bad_id, bad_name = _break(tmp_path, problem)
    manifest, _, skipped = _index(_params("folder", "skip", folder=folder), tmp_path / "idx")
    assert bad_id not in set(manifest["image_id"])
    assert {"a", "c"} <= set(manifest["image_id"])
    assert bad_id in set(skipped["image_id"])
    assert any(path.endswith(bad_name) for path in skipped["path"])
    assert all(skipped["reason"] != "")
    if problem == "duplicate_id":  # both holders of the id are dropped: neither is "the" b
        assert sorted(Path(p).name for p in skipped["path"]) == ["b.jpg", "b.png"]


def test_header_only_mode_does_not_decode_images(tmp_path):
    folder = _good_folder(tmp_path)
    _break(tmp_path, "truncated_png")
    manifest, _, skipped = _index(_params("folder", verify=False, folder=folder),
                                  tmp_path / "idx")
    assert "b" in set(manifest["image_id"]) and skipped.empty
    # ...but the header must still be readable.
    _break(tmp_path, "corrupt")
    with pytest.raises(BadInputError, match="b.png"):
        build_index(_params("folder", verify=False, folder=folder), tmp_path / "idx2", 1)


def test_all_images_skipped_is_an_error(tmp_path):
    _image(tmp_path / "images" / "x.png")
    (tmp_path / "images" / "x.png").write_bytes(b"")
    folder = {"images": str(tmp_path / "images"), "split": "train"}
    with pytest.raises(BadInputError, match="all 1 images were skipped"):
        build_index(_params("folder", "skip", folder=folder), tmp_path / "idx", 1)
    assert (tmp_path / "idx" / "skipped.csv").read_text().count("\n") == 2


def test_unknown_policy_is_a_config_error(tmp_path):
    folder = _good_folder(tmp_path)
    with pytest.raises(ConfigError, match="on_bad_input"):
        build_index(_params("folder", "ignore", folder=folder), tmp_path / "idx", 1)


# --- manifest --------------------------------------------------------------------------------


def _row(image_id: str, split: str) -> Row:
    return Row(image_id, Path(f"/d/{image_id}.png"), None, None, split, 4, 3)


def test_shards_run_over_train_first_then_other_splits_alphabetically():
    rows = [_row(i, s) for i, s in [("v2", "val"), ("t1", "train"), ("x1", "test"),
                                      ("v1", "val"), ("t0", "train"), ("t2", "train")]]
    frame = manifest_frame(rows, images_per_shard=4)
    assert frame["image_id"].tolist() == ["t0", "t1", "t2", "x1", "v1", "v2"]
    assert frame["split"].tolist() == ["train"] * 3 + ["test"] + ["val"] * 2
    assert frame["shard"].tolist() == [0, 0, 0, 0, 1, 1]


def test_manifest_round_trip_keeps_dtypes(tmp_path):
    # Ids that pandas would happily turn into numbers, NaN or booleans.
    names = ["001", "1e5", "nan", "True", "NA"]
    for k, name in enumerate(names):
        _image(tmp_path / "images" / f"{name}.png", value=k)
    folder = {"images": str(tmp_path / "images"), "split": "train"}
    manifest, classes, _ = _index(_params("folder", folder=folder), tmp_path / "idx")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["image_id"]) == sorted(names)
    assert all(isinstance(v, str) for v in manifest["image_id"])
    assert manifest["labels"].tolist() == [""] * 5 and manifest["mask_path"].tolist() == [""] * 5
    assert manifest["has_labels"].dtype == bool
    assert manifest["shard"].tolist() == [0, 0, 1, 1, 2]
    assert manifest["width"].dtype == np.int64 and manifest["height"].tolist() == [12] * 5
    assert classes["num_shards"] == 3
    with open(tmp_path / "idx" / "manifest.csv") as handle:
        assert handle.readline().strip() == ",".join(MANIFEST_COLUMNS)


def test_parse_labels():
    assert parse_labels("") == [] and parse_labels("3 12") == [3, 12]
    with pytest.raises(BadInputError):
        parse_labels("3 cat")
