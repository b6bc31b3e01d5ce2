"""Security: checkpoints never run code, config values never reach a shell unquoted, and image ids
never lead a write outside the results folder."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.errors import BadInputError, WeightsError
from pipeline.imageio import check_image_id, safe_child
from workflow_runs import REPO, SNAKEMAKE, assert_one_line_error, tiny_config, write_config

PIPELINE = REPO / "pipeline"
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
TINY_BACKBONE = {**CONFIG["backbone"], "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# Checkpoints: weights_only everywhere, pickled callables refused


def _torch_load_calls() -> list[tuple[Path, int, ast.Call]]:
    calls = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls.append((path, node.lineno, node))
    return calls


def test_every_torch_load_uses_weights_only():
    calls = _torch_load_calls()
    assert calls, "no torch.load call found: the static check is looking in the wrong place"
    unsafe = [f"{path.relative_to(REPO)}:{line}" for path, line, call in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
    # Nothing unpickles by another way: no pickle.load(s), no `from torch import load`, and no
    # call anywhere passes weights_only=False.
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                func = node.func
                assert not (isinstance(func, ast.Attribute) and func.attr in ("load", "loads")
                            and isinstance(func.value, ast.Name) and func.value.id in ("pickle", "dill")), where
                assert not any(k.arg == "weights_only"
                               and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                               for k in node.keywords), where
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in [alias.name for alias in node.names], where


class _Touch:
    """Unpickling this runs ``Path(target).touch()``: what a malicious checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.fixture()
def evil(tmp_path):
    pwned = tmp_path / "pwned"

    def make(payload_of) -> Path:
        path = tmp_path / f"evil-{len(list(tmp_path.glob('evil-*')))}.pt"
        torch.save(payload_of(_Touch(pwned)), path)
        return path

    yield make
    assert not pwned.exists(), "a checkpoint ran code while being loaded"


def test_checkpoint_loader_refuses_pickled_callables(evil):
    from pipeline.checkpoint import load_checkpoint

    path = evil(lambda bomb: {"model": {"w": torch.zeros(2)}, "rng": bomb})
    with pytest.raises(WeightsError, match=re.escape(str(path)) + ".*refused"):
        load_checkpoint(path)


def test_backbone_weights_loader_refuses_pickled_callables(evil):
    from pipeline.backbone import read_weights_file

    path = evil(lambda bomb: {"teacher": {"cls_token": torch.zeros(1, 1, 48)}, "args": bomb})
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        read_weights_file(path)


def test_pc2m_model_loader_refuses_pickled_callables(evil):
    from pipeline.predict import load_predictor

    path = evil(lambda bomb: {"classifier.weight": torch.zeros(3, 48), "extra": bomb})
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_predictor(path, TINY_BACKBONE, torch.device("cpu"))


def test_pc2m_training_checkpoint_refuses_pickled_callables(evil):
    from pipeline.training.checkpoints import load_checkpoint

    path = evil(lambda bomb: {"format": "x", "rng": bomb})
    with pytest.raises(BadInputError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_deeplab_model_loader_refuses_pickled_callables(evil):
    from pipeline.deeplab.model import load_trained_deeplab

    path = evil(lambda bomb: {"arch": {"backbone": "resnet18", "num_classes": 3}, "model": bomb})
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_trained_deeplab(path)


def test_pickled_weights_through_the_cli_are_one_line_errors(evil, tmp_path):
    weights = evil(lambda bomb: {"teacher": bomb})
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(image)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([{"image_id": "a", "image_path": str(image), "mask_path": "", "labels": "", "has_labels": False,
                   "split": "train", "width": 32, "height": 32, "shard": 0}]).to_csv(manifest, index=False)
    params = {"backbone": {**TINY_BACKBONE, "weights": str(weights)},
              "features": {**CONFIG["features"], "num_workers": 0}, "seed": 0}
    result = cli("extract-features", "--manifest", manifest, "--shard", 0, "--out", tmp_path / "f.safetensors",
                 "--params", json.dumps(params))
    last = assert_one_line_error(result, weights)
    assert "weights_only=False" not in last  # never advise the unsafe retry


# ---------------------------------------------------------------------------------------------
# Image ids: nothing is written outside the output folder


ESCAPING_IDS = ["../x", "a/../../x", "/etc/passwd", "..", "a/./b", "a//b", "", "a\\..\\x", "x\n"]


@pytest.mark.parametrize("image_id", ESCAPING_IDS)
def test_safe_child_refuses_ids_that_escape(tmp_path, image_id):
    with pytest.raises(BadInputError, match="unsafe image id"):
        safe_child(tmp_path / "masks", image_id)
    with pytest.raises(BadInputError):
        check_image_id(image_id)


def test_safe_child_keeps_nested_ids_inside(tmp_path):
    assert safe_child(tmp_path, "sub dir/ñandú") == tmp_path / "sub dir" / "ñandú.png"


def test_every_mask_writer_names_its_files_through_safe_child():
    """predict (every method), crf and deeplab predict write one file per image id: through safe_child."""
    for module in ("predict.py", "crf.py", "deeplab/predict.py"):
        text = (PIPELINE / module).read_text(encoding="utf-8")
        assert "safe_child(" in text, module
        assert not re.search(r"f\"\{image_id\}\.png\"|/ f\"\{", text), f"{module} builds a per-image path by hand"


def test_folder_dataset_ids_come_from_paths_inside_it(tmp_path):
    from pipeline.datasets.folder import find_files, image_id_of

    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for name in ("a/b/c.png", "top.jpg", "..hidden.png", ".x.png"):
        Image.new("RGB", (8, 8)).save(root / name, format="PNG")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "o.png")
    # A linked folder is searched (issue 11), but its images get ids of their path under root.
    (root / "link").symlink_to(outside, target_is_directory=True)
    ids = [image_id_of(p, root) for p in find_files(root)[0]]
    assert sorted(ids) == ["a/b/c", "link/o", "top"]
    for image_id in ids:
        check_image_id(image_id)


def test_labels_csv_with_an_escaping_id_is_rejected(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,labels\na,1\n../../x,1\n")
    dataset = {**CONFIG["dataset"], "kind": "folder",
               "folder": {**CONFIG["dataset"]["folder"], "images": str(images), "labels": str(labels),
                          "class_names": ["background", "cat"]}}
    result = cli("index", "--params", json.dumps({"dataset": dataset, "on_bad_input": "error", "seed": 0}),
                 "--out-dir", tmp_path / "dataset")
    last = assert_one_line_error(result, labels)
    assert "../../x" in last and "line 3" in last


def test_manifest_with_an_escaping_id_is_rejected_before_anything_is_written(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (50, 60, 70)).save(image)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([{"image_id": "../../escaped", "image_path": str(image), "mask_path": "", "labels": "",
                   "has_labels": False, "split": "val", "width": 32, "height": 32, "shard": 0}]).to_csv(
        manifest, index=False)
    out = tmp_path / "results" / "deeplab" / "masks" / "val"
    result = cli("predict-deeplab", "--manifest", manifest, "--split", "val", "--model", tmp_path / "model.pt",
                 "--out-masks", out, "--params", json.dumps({"deeplab": {**CONFIG["deeplab"], "num_workers": 0}}))
    last = assert_one_line_error(result, manifest)
    assert "../../escaped" in last
    assert not list(tmp_path.rglob("escaped*"))


# ---------------------------------------------------------------------------------------------
# Config values through the Snakemake shell commands


@pytest.mark.slow
def test_config_paths_with_shell_syntax_spaces_and_unicode_are_inert(tmp_path):
    """`results` and the folder dataset path hold `;`, `$( )`, backticks, quotes, spaces and
    non-ASCII characters; snakemake runs the index and a feature shard on them, and none of the
    embedded commands runs."""
    # Relative commands: a shell would run them in snakemake's working folder, tmp_path.
    results = tmp_path / "ré sults; touch pwned-results"
    images = tmp_path / "imágenes $(touch pwned-images) `touch pwned-tick` it's \"q\""
    images.mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 40), colour).save(images / f"photo {i} ñ.png")
    config = tiny_config(results, dataset={"kind": "folder", "images_per_shard": 4,
                                           "folder": {"images": str(images), "num_classes": 3}})
    configfile = write_config(tmp_path / "config; touch pwned-config.yaml", config)
    target = results / "features" / "shard-00000.safetensors"
    result = subprocess.run([*SNAKEMAKE, str(target), "--configfile", str(configfile)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert target.is_file()
    manifest = pd.read_csv(results / "dataset" / "manifest.csv")
    assert sorted(manifest["image_id"]) == ["photo 0 ñ", "photo 1 ñ", "photo 2 ñ"]
    ran = [name for name in ("pwned-results", "pwned-images", "pwned-tick", "pwned-config.yaml")
           if (tmp_path / name).exists() or (REPO / name).exists()]
    assert ran == [], f"a config value ran as a shell command: {ran}"
