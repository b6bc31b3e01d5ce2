"""A dataset mask follows its image's EXIF orientation, as the image does (COCO has rotated
photos): read together, image and mask agree pixel for pixel for orientations 1-8, in the index
(manifest sizes, mask checks), for COCO's converted masks, and in the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from pipeline.datasets import build_index, read_manifest
from pipeline.datasets.coco import convert_coco_annotations
from pipeline.evaluate import evaluate_masks
from pipeline.imageio import image_size, load_mask, load_rgb, voc_palette, write_label_png

# Stored class map, 48 wide x 32 tall, no symmetry: each flip or rotation gives another map.
STORED = np.array([[1, 2, 3], [4, 5, 0]], np.uint8).repeat(16, axis=0).repeat(16, axis=1)
PALETTE = voc_palette()[:6]
NAMES = ["background", "one", "two", "three", "four", "five"]


def write_photo(path: Path, classes: np.ndarray, orientation: int) -> Path:
    """The picture of class map ``classes`` (one colour per class) as the stored pixels, tagged
    with EXIF ``orientation``; JPEGs near-lossless, so colours stay nearest to their class's."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    options = {"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(PALETTE[classes]).save(path, exif=exif.tobytes(), **options)
    return path


def classes_seen(rgb: np.ndarray) -> np.ndarray:
    """Per pixel of a loaded image, the class whose colour is nearest."""
    distance = ((rgb[:, :, None, :].astype(int) - PALETTE[None, None].astype(int)) ** 2).sum(-1)
    return distance.argmin(-1).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_mask_read_with_its_image_agrees_with_the_image(tmp_path, orientation, suffix):
    image = write_photo(tmp_path / f"photo{suffix}", STORED, orientation)
    write_label_png(tmp_path / "mask.png", STORED)  # annotated on the stored pixels
    seen = classes_seen(load_rgb(image))

    mask = load_mask(tmp_path / "mask.png", image)

    np.testing.assert_array_equal(mask, seen)
    assert mask.shape[::-1] == image_size(image)
    if orientation != 1:  # the image really moved: the mask as stored would disagree
        assert not np.array_equal(load_mask(tmp_path / "mask.png"), seen)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_a_mask_already_at_the_displayed_size_is_taken_as_it_is(tmp_path, orientation):
    image = write_photo(tmp_path / "photo.png", STORED, orientation)
    upright = classes_seen(load_rgb(image))
    write_label_png(tmp_path / "mask.png", upright)
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.png", image), upright)


def test_a_square_image_mask_is_taken_as_stored(tmp_path):
    square = np.array([[1, 2, 3], [4, 5, 0], [0, 1, 2]], np.uint8).repeat(16, axis=0).repeat(16, axis=1)
    image = write_photo(tmp_path / "photo.png", square, 6)
    write_label_png(tmp_path / "mask.png", square)
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.png", image), classes_seen(load_rgb(image)))


@pytest.fixture()
def rotated_folder(tmp_path) -> Path:
    """A folder dataset (val split) of one photo per orientation 1-8, masks as stored."""
    for orientation in range(1, 9):
        write_photo(tmp_path / "images" / f"o{orientation}.png", STORED, orientation)
        write_label_png(tmp_path / "masks" / f"o{orientation}.png", STORED)
    return tmp_path


@pytest.mark.parametrize("verify", [True, False])
def test_index_and_a_perfect_prediction_of_rotated_images(rotated_folder, verify):
    root = rotated_folder
    folder = {"images": str(root / "images"), "masks": str(root / "masks"), "labels": None,
              "class_names": NAMES, "num_classes": None, "split": "val"}
    params = {"dataset": {"kind": "folder", "images_per_shard": 4, "verify_images": verify, "folder": folder},
              "on_bad_input": "error", "seed": 0}
    build_index(params, root / "idx", threads=1)
    manifest = read_manifest(root / "idx" / "manifest.csv").set_index("image_id")
    for orientation in range(1, 9):
        row = manifest.loc[f"o{orientation}"]
        assert (row["width"], row["height"]) == ((32, 48) if orientation >= 5 else (48, 32))
        assert row["labels"] == "1 2 3 4 5"
        # What a perfect model writes: the labels of the image as it is read (upright).
        write_label_png(root / "pred" / f"o{orientation}.png", classes_seen(load_rgb(row["image_path"])))

    summary = evaluate_masks(root / "pred", root / "idx" / "manifest.csv", root / "idx" / "classes.json", "val",
                             "weak", root / "eval.json", root / "eval.csv")

    assert summary["images"] == 8
    assert 100 * summary["miou"] == pytest.approx(100.0)


def test_coco_masks_drawn_at_the_stored_size_follow_a_rotated_photo(tmp_path):
    root = tmp_path / "coco"
    masks = {}
    for split in ("train", "val"):
        name = f"COCO_{split}2014_000000000001.jpg"
        # COCO's JSON gives the stored size and polygons on the stored pixels: class "one" top-left.
        annotations = root / "annotations" / f"instances_{split}2014.json"
        annotations.parent.mkdir(parents=True, exist_ok=True)
        annotations.write_text(json.dumps({
            "images": [{"id": 1, "file_name": name, "height": 32, "width": 48}],
            "categories": [{"id": 1, "name": "one"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 256.0,
                             "segmentation": [[0, 0, 16, 0, 16, 16, 0, 16]]}],
        }))
        masks[split] = tmp_path / f"masks_{split}"
        convert_coco_annotations(annotations, masks[split], threads=1)
        # The photo shows what was annotated, on its stored pixels, and is displayed rotated.
        write_photo(root / f"{split}2014" / name, load_mask(masks[split] / f"{Path(name).stem}.png"), 6)
    params = {"dataset": {"kind": "coco", "images_per_shard": 4, "verify_images": True,
                          "coco": {"root": str(root), "train_images": "train2014", "val_images": "val2014"}},
              "on_bad_input": "error", "seed": 0, "coco_masks": {k: str(v) for k, v in masks.items()}}

    build_index(params, tmp_path / "idx", threads=1)

    row = read_manifest(tmp_path / "idx" / "manifest.csv").set_index("image_id").loc["COCO_val2014_000000000001"]
    assert (row["width"], row["height"]) == (32, 48) and row["labels"] == "1"
    mask = load_mask(row["mask_path"], row["image_path"])
    np.testing.assert_array_equal(mask, classes_seen(load_rgb(row["image_path"])))
    # Orientation 6 turns the stored top-left corner into the displayed top-right one.
    assert mask[:12, -12:].all() and not mask[:, :16].any() and not mask[24:].any()
