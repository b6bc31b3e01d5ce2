"""A corpus of bad (and odd but valid) inputs, each through the real command line.

Every case ends either in correct output, or in exit code 2 with ONE line on stderr that starts
with ``error:`` and names the offending file or config key: no traceback, no hang (timeouts), and
nothing computed earlier is lost (a failing stage leaves an existing output untouched).

Fixtures are made on the fly. Stages that import torch cost a few seconds each, so the cases
that must succeed share one folder dataset (non-ASCII and space-containing names, a PNG named
.jpg, a 1 x 1 image). Paths with spaces, non-ASCII characters and shell syntax through the
Snakemake rules themselves are covered by tests/test_security.py.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import load_schema, validate_config
from pipeline.datasets import MANIFEST_COLUMNS, read_manifest
from pipeline.errors import ConfigError
from workflow_runs import REPO, SNAKEMAKE, assert_one_line_error, with_values

TIMEOUT = 300
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
TINY_BACKBONE = {**CONFIG["backbone"], "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}}

# Runs a stage in-process under `python -c` and reports the peak RSS (bytes) on the last line.
_PEAK_RSS = (
    "import resource, sys\n"
    "from pipeline.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


# ---------------------------------------------------------------------------------------------
# Helpers


def cli(*args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def write_image(path: Path, size=(40, 32), colour=(200, 40, 40), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = (rng.random((size[1], size[0], 3)) * 60 + np.array(colour) * 0.7).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return path


def write_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    return path


def index_params(folder: dict, on_bad_input: str = "error") -> str:
    dataset = {**CONFIG["dataset"], "kind": "folder",
               "folder": {**CONFIG["dataset"]["folder"], **{k: str(v) if isinstance(v, Path) else v
                                                             for k, v in folder.items()}}}
    return json.dumps({"dataset": dataset, "on_bad_input": on_bad_input, "seed": 0})


def index(folder: dict, out_dir: Path, on_bad_input: str = "error") -> subprocess.CompletedProcess:
    return cli("index", "--params", index_params(folder, on_bad_input), "--out-dir", out_dir)


def features_params(**backbone) -> str:
    return json.dumps({"backbone": {**TINY_BACKBONE, **backbone},
                       "features": {**CONFIG["features"], "num_workers": 0}, "seed": 0})


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"mask_path": "", "labels": "", "has_labels": False, "split": "train", "shard": 0,
                             **row})
    return path


def truncated_copy(blob: bytes, path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(blob[: int(len(blob) * keep)])
    return path


# ---------------------------------------------------------------------------------------------
# Index stage: one folder dataset per case (no torch: each run takes about a second)


def _corrupt(root: Path) -> Path:
    return _write_bytes(root / "broken.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def _truncated_jpeg(root: Path) -> Path:
    path = write_image(root / "cut.jpg", size=(64, 48))
    path.write_bytes(path.read_bytes()[:-400])
    return path


def _truncated_png(root: Path) -> Path:
    path = write_image(root / "cut.png", size=(64, 48))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _zero_bytes(root: Path) -> Path:
    return _write_bytes(root / "empty.png", b"")


def _text_as_jpg(root: Path) -> Path:
    return _write_bytes(root / "notes.jpg", b"this is not an image, just text\n")


def _header_only(root: Path) -> Path:
    return _write_bytes(root / "header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


BAD_IMAGES = {
    "corrupt-png": _corrupt,
    "truncated-jpeg": _truncated_jpeg,
    "truncated-png": _truncated_png,
    "zero-byte": _zero_bytes,
    "text-named-jpg": _text_as_jpg,
    "jpeg-header-only": _header_only,
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_stops_the_index_naming_it(case, tmp_path):
    images = tmp_path / "images"
    write_image(images / "good.png")
    bad = BAD_IMAGES[case](images)
    out = tmp_path / "dataset"
    assert_one_line_error(index({"images": images}, out), bad)
    assert not (out / "manifest.csv").exists()


def test_bad_image_is_skipped_and_listed_with_on_bad_input_skip(tmp_path):
    images = tmp_path / "images"
    write_image(images / "good.png")
    bad = _truncated_jpeg(images)
    out = tmp_path / "dataset"
    assert_ok(index({"images": images}, out, on_bad_input="skip"))
    assert read_manifest(out / "manifest.csv")["image_id"].tolist() == ["good"]
    skipped = (out / "skipped.csv").read_text()
    assert str(bad) in skipped and "cut" in skipped


def test_empty_dataset_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "README.txt").write_text("no images here")
    assert_one_line_error(index({"images": images}, tmp_path / "dataset"), images)


def test_missing_dataset_folder_names_the_key_and_path(tmp_path):
    missing = tmp_path / "nowhere"
    last = assert_one_line_error(index({"images": missing}, tmp_path / "dataset"), missing)
    assert "dataset.folder.images" in last


def test_duplicate_ids_from_two_extensions(tmp_path):
    images = tmp_path / "images"
    write_image(images / "twin.png")
    write_image(images / "twin.jpg")
    assert_one_line_error(index({"images": images}, tmp_path / "dataset"), "twin")


def _masked_folder(tmp_path: Path, mask_values: np.ndarray, size=(40, 32)) -> tuple[dict, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "a.png", size=size)
    mask = write_mask(masks / "a.png", mask_values)
    return {"images": images, "masks": masks, "class_names": ["background", "cat", "dog"]}, mask


def test_mask_with_stray_values(tmp_path):
    values = np.zeros((32, 40), np.uint8)
    values[5:10, 5:10] = 7
    folder, mask = _masked_folder(tmp_path, values)
    last = assert_one_line_error(index(folder, tmp_path / "dataset"), mask)
    assert "[7]" in last


def test_mask_of_the_wrong_size(tmp_path):
    folder, mask = _masked_folder(tmp_path, np.zeros((10, 10), np.uint8))
    assert_one_line_error(index(folder, tmp_path / "dataset"), mask)


def test_mask_with_ignore_value_255_is_fine(tmp_path):
    values = np.zeros((32, 40), np.uint8)
    values[0:4] = 255
    values[10:20, 10:20] = 2
    folder, _ = _masked_folder(tmp_path, values)
    out = tmp_path / "dataset"
    assert_ok(index(folder, out))
    assert read_manifest(out / "manifest.csv")["labels"].tolist() == ["2"]


def test_single_class_dataset_indexes(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(3):
        write_image(images / f"im{i}.png")
        values = np.zeros((32, 40), np.uint8)
        values[8:20, 8 + i : 20 + i] = 1
        write_mask(masks / f"im{i}.png", values)
    out = tmp_path / "dataset"
    assert_ok(index({"images": images, "masks": masks, "class_names": ["background", "cat"]}, out))
    assert json.loads((out / "classes.json").read_text())["num_classes"] == 2
    assert set(read_manifest(out / "manifest.csv")["labels"]) == {"1"}


@pytest.mark.parametrize("text,what", [("image_id,labels\na,1 x\n", "line 2"),
                                        ("image_id,labels\na,9\n", "line 2"),
                                        ("id,label\na,1\n", "columns"),
                                        ("image_id,labels\na,1\na,2\n", "line 3")])
def test_bad_labels_csv(tmp_path, text, what):
    images = tmp_path / "images"
    write_image(images / "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    folder = {"images": images, "labels": labels, "class_names": ["background", "cat", "dog"]}
    last = assert_one_line_error(index(folder, tmp_path / "dataset"), labels)
    assert what in last


# ---------------------------------------------------------------------------------------------
# Later stages: a manifest whose files went missing or changed, truncated shards, bad --params


def test_manifest_row_for_a_missing_file_keeps_the_existing_output(tmp_path):
    present = write_image(tmp_path / "present.png")
    missing = tmp_path / "gone.png"
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"image_id": "present", "image_path": present, "width": 40, "height": 32},
        {"image_id": "gone", "image_path": missing, "width": 40, "height": 32},
    ])
    out = tmp_path / "features.safetensors"
    out.write_bytes(b"computed earlier")
    result = cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", out,
                 "--params", features_params())
    assert_one_line_error(result, missing)
    assert out.read_bytes() == b"computed earlier"
    assert not list(tmp_path.glob(".*.partial"))


def test_image_changed_since_indexing(tmp_path):
    image = write_image(tmp_path / "a.png", size=(40, 32))
    manifest = write_manifest(tmp_path / "manifest.csv", [{"image_id": "a", "image_path": image, "width": 64,
                                                           "height": 64}])
    result = cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", tmp_path / "f.safetensors",
                 "--params", features_params())
    assert "differs from the manifest" in assert_one_line_error(result, image)


def test_missing_manifest_and_invalid_params(tmp_path):
    missing = tmp_path / "manifest.csv"
    assert_one_line_error(cli("spectral-segments", "--features", tmp_path / "f.safetensors", "--manifest", missing,
                              "--out", tmp_path / "s.safetensors", "--params", "{not json"), "--params")
    assert_one_line_error(cli("evaluate", "--masks", tmp_path, "--manifest", missing, "--classes",
                              tmp_path / "classes.json", "--split", "val", "--out-json", tmp_path / "e.json",
                              "--out-csv", tmp_path / "e.csv", "--params",
                              json.dumps({"mode": "weak", "evaluate": CONFIG["evaluate"]})),
                          tmp_path / "classes.json")


def test_truncated_feature_shard(tmp_path, demo_features):
    manifest, shard = demo_features
    cut = truncated_copy(shard.read_bytes(), tmp_path / "shard-00000.safetensors")
    params = json.dumps({"spectral": {**CONFIG["spectral"], "device": "cpu"}, "seed": 0})
    result = cli("spectral-segments", "--features", cut, "--manifest", manifest, "--out", tmp_path / "s.safetensors",
                 "--params", params)
    assert_one_line_error(result, cut)


# ---------------------------------------------------------------------------------------------
# Odd but valid input end to end through index + features: names with spaces and non-ASCII
# characters, a PNG named .jpg, a 1 x 1 image


@pytest.fixture(scope="module")
def demo_features(tmp_path_factory):
    """A folder dataset of odd-but-valid files, indexed and featurised through the CLI."""
    root = tmp_path_factory.mktemp("odd names")
    images = root / "imágenes con espacio"
    write_image(images / "ñandú 1.png", size=(48, 40))
    write_image(images / "sub dir" / "日本語 画像.jpg", size=(40, 48))
    write_image(images / "png inside.jpg", size=(40, 40), fmt="PNG")  # a PNG named .jpg just works
    write_image(images / "dot.png", size=(1, 1))
    out = root / "dataset"
    assert_ok(index({"images": images}, out))
    manifest = out / "manifest.csv"
    shard = root / "features" / "shard-00000.safetensors"
    assert_ok(cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", shard,
                  "--params", features_params()))
    return manifest, shard


def test_odd_names_png_as_jpg_and_1x1_images_get_features(demo_features):
    from pipeline.features import read_shard

    manifest, shard = demo_features
    frame = read_manifest(manifest)
    assert sorted(frame["image_id"]) == ["dot", "png inside", "sub dir/日本語 画像", "ñandú 1"]
    sizes = dict(zip(frame["image_id"], zip(frame["width"], frame["height"])))
    assert sizes["dot"] == (1, 1) and sizes["png inside"] == (40, 40)
    features = read_shard(shard)
    assert sorted(features) == sorted(frame["image_id"])
    assert features["dot"]["grid"].tolist() == [1, 1]  # padded to one patch
    for tensors in features.values():
        assert torch.isfinite(tensors["keys"].float()).all()


def test_huge_image_is_downscaled_before_the_backbone_with_bounded_memory(tmp_path):
    """10000 x 10000: decoded once as uint8 (Pillow) and resized before any float tensor; a
    full-resolution float32 copy alone would be 1.2 GB above the small-image baseline."""
    big = tmp_path / "big.png"
    im = Image.new("RGB", (10000, 10000), (40, 90, 160))
    im.paste((200, 30, 30), (2000, 2000, 6000, 7000))
    im.save(big, compress_level=1)
    del im
    small = write_image(tmp_path / "small.png", size=(64, 64))

    def peak(image: Path, size: int) -> int:
        manifest = write_manifest(tmp_path / f"{image.stem}.csv", [{"image_id": image.stem, "image_path": image,
                                                                   "width": size, "height": size}])
        out = tmp_path / f"{image.stem}.safetensors"
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS, "extract-features", "--manifest", str(manifest),
                                 "--shard", "0", "--out", str(out), "--params", features_params()],
                                cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
        assert_ok(result)
        assert out.is_file()
        return int(result.stderr.strip().splitlines()[-1].split()[1])

    extra = peak(big, 10000) - peak(small, 64)
    full_res_float = 10000 * 10000 * 3 * 4
    assert extra < 0.6 * full_res_float, f"{extra / 1e9:.2f} GB above the small-image run"


# ---------------------------------------------------------------------------------------------
# Weights and checkpoints


def test_backbone_weights_of_another_architecture(tmp_path, demo_features):
    import timm

    manifest, _ = demo_features
    weights = tmp_path / "vit-other.pth"
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=3, embed_dim=64,
                              num_heads=4)
    torch.save(other.state_dict(), weights)
    result = cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", tmp_path / "f.safetensors",
                 "--params", features_params(weights=str(weights)))
    assert_one_line_error(result, weights)


def test_truncated_backbone_weights(tmp_path, demo_features):
    manifest, _ = demo_features
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buffer)
    weights = truncated_copy(buffer.getvalue(), tmp_path / "cut.pth")
    result = cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", tmp_path / "f.safetensors",
                 "--params", features_params(weights=str(weights)))
    assert_one_line_error(result, weights)


def _predict_params() -> str:
    return json.dumps({"backbone": TINY_BACKBONE, "predict": {**CONFIG["predict"], "num_workers": 0},
                       "mode": "weak"})


def test_truncated_pc2m_model_for_predict(tmp_path, demo_features):
    from pipeline.backbone import build_backbone
    from pipeline.methods.pc2m.model import Architecture, build_network, model_payload

    manifest, _ = demo_features
    net = build_network(build_backbone(TINY_BACKBONE["name"], "random", "teacher", TINY_BACKBONE["model_kwargs"]),
                        Architecture("pc2m", 3, 0))
    buffer = io.BytesIO()
    torch.save(model_payload(net, Architecture("pc2m", 3, 0)), buffer)
    masks = tmp_path / "masks"
    model = truncated_copy(buffer.getvalue(), tmp_path / "model.pt")
    result = cli("predict", "--manifest", manifest, "--shard", "0", "--model", model, "--out-probs",
                 tmp_path / "probs.safetensors", "--out-masks", masks, "--params", _predict_params())
    assert_one_line_error(result, model)
    assert not masks.exists() and not (tmp_path / "probs.safetensors").exists()


def test_pc2m_model_of_another_backbone(tmp_path, demo_features):
    from pipeline.backbone import build_backbone
    from pipeline.methods.pc2m.model import Architecture, build_network, model_payload

    manifest, _ = demo_features
    other = build_backbone(TINY_BACKBONE["name"], "random", "teacher", {"depth": 1, "embed_dim": 48, "num_heads": 3})
    model = tmp_path / "model.pt"
    torch.save(model_payload(build_network(other, Architecture("pc2m", 3, 0)), Architecture("pc2m", 3, 0)), model)
    result = cli("predict", "--manifest", manifest, "--shard", "0", "--model", model, "--out-probs",
                 tmp_path / "probs.safetensors", "--out-masks", tmp_path / "masks", "--params", _predict_params())
    assert_one_line_error(result, model)


def test_truncated_deeplab_model_for_predict(tmp_path, demo_features):
    from pipeline.deeplab.model import DeepLab, trained_payload

    manifest, _ = demo_features
    buffer = io.BytesIO()
    torch.save(trained_payload(DeepLab("resnet18", 3)), buffer)
    model = truncated_copy(buffer.getvalue(), tmp_path / "model.pt")
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "kept.png").write_bytes(b"earlier output")
    result = cli("predict-deeplab", "--manifest", manifest, "--split", "train", "--model", model, "--out-masks",
                 masks, "--params", json.dumps({"deeplab": {**CONFIG["deeplab"], "num_workers": 0}}))
    assert_one_line_error(result, model)
    assert (masks / "kept.png").read_bytes() == b"earlier output"


# ---------------------------------------------------------------------------------------------
# Configuration: typos and wrong types name the key (schema), through `snakemake -n` too


def _config_with(**changes) -> dict:
    return with_values(copy.deepcopy(CONFIG), **changes)


@pytest.mark.parametrize("changes,key", [
    ({"train__epoch": 3}, "train.epoch"),
    ({"seed": "zero"}, "seed"),
    ({"train__epochs": -1}, "train.epochs"),
    ({"features__keep": ["keys", "tokenz"]}, "features.keep"),
    ({"dataset__demo__n_train": 2.5}, "dataset.demo.n_train"),
    ({"crf__preset": "fast"}, "crf.preset"),
])
def test_config_errors_name_the_key(changes, key):
    schema = load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(_config_with(**changes), schema)


@pytest.mark.parametrize("text,key", [("train:\n  epoch: 3\n", "train.epoch"),
                                      ("deeplab:\n  iterations: ten\n", "deeplab.iterations")])
def test_snakemake_dry_run_names_the_bad_config_key(tmp_path, text, key):
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(text)
    result = subprocess.run([*SNAKEMAKE, "-n", "--configfile", str(configfile)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"config key {key}" in output or f"unknown config key {key}" in output, output[-3000:]
    assert "Traceback" not in output
