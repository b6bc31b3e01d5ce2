"""DeepLab verification: model shapes, weight files, training, exact resume after SIGKILL, predict.

Training tests use timm's ``test_resnet`` (a ResNet with narrow layers, same strides as resnet18)
on tiny demo crops, single-threaded, so the whole module runs in well under a minute on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.checkpoint import load_checkpoint
from pipeline.datasets import build_index, read_manifest
from pipeline.datasets.demo import generate_demo
from pipeline.deeplab.model import DeepLabV3Plus
from pipeline.deeplab.predict import predict_deeplab
from pipeline.deeplab.train import CHECKPOINT_NAME, train_deeplab
from pipeline.errors import BadInputError, PipelineError, WeightsError
from pipeline.imageio import load_mask, write_label_png

NUM_CLASSES = 5  # demo: background + 4 shapes
THREADS = 1  # bit-exact comparisons across processes need the same (and a fixed) thread count


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest.csv, folder of train masks): the demo's GT masks stand in for pseudo-masks."""
    root = tmp_path_factory.mktemp("deeplab_demo")
    generate_demo(root / "demo", seed=0, n_train=6, n_val=3, width=64, height=48)
    build_index({"dataset": {"kind": "demo"}, "demo_root": str(root / "demo")}, root / "index", 1)
    return root / "index" / "manifest.csv", root / "demo" / "masks" / "train"


def deeplab_params(**overrides) -> dict:
    section = {
        "backbone": "test_resnet", "backbone_weights": "random", "iterations": 30,
        "batch_size": 4, "crop_size": 40, "scale_range": [0.5, 1.5], "lr": 0.01,
        "head_lr_multiplier": 10.0, "momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9,
        "checkpoint_every": 10, "log_every": 5, "num_workers": 0, "device": "cpu",
        "test_size": None, "multiscale": False, "test_scales": [0.5, 0.75, 1.0, 1.25, 1.5],
    }
    section.update(overrides)
    return {"deeplab": section, "num_classes": NUM_CLASSES, "seed": 0}


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    manifest, masks = demo
    out = tmp_path_factory.mktemp("deeplab_trained")
    train_deeplab(manifest, masks, out, deeplab_params(), THREADS)
    return out


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet18", "test_vit"])
def test_logits_have_the_input_size_and_one_channel_per_class(backbone):
    model = DeepLabV3Plus(backbone, NUM_CLASSES).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 50, 70))  # not a multiple of the stride or patch size
    assert logits.shape == (2, NUM_CLASSES, 50, 70)


def test_a_timm_state_dict_loads_without_its_classifier(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)  # with its ImageNet `fc`
    save_file(reference.state_dict(), tmp_path / "resnet18.safetensors")
    model = DeepLabV3Plus("resnet18", NUM_CLASSES, str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.backbone.body.state_dict()["conv1.weight"], reference.conv1.weight)


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other_net.pth")
    with pytest.raises(WeightsError, match="other_net.pth"):
        DeepLabV3Plus("resnet18", NUM_CLASSES, str(tmp_path / "other_net.pth"))


# --- training ---------------------------------------------------------------------------------


def test_loss_decreases_and_artifacts_are_written(trained):
    history = pd.read_csv(trained / "history.csv")
    assert list(history["iteration"]) == [5, 10, 15, 20, 25, 30]
    assert history["loss"].iloc[-2:].mean() < 0.7 * history["loss"].iloc[:2].mean()
    assert json.loads((trained / "done.json").read_text())["iterations"] == 30
    assert set(load_checkpoint(trained / "model.pt")) == {"arch", "model"}


def test_missing_pseudo_mask_is_an_error_naming_the_image(demo, tmp_path):
    manifest, masks = demo
    partial = tmp_path / "masks"
    shutil.copytree(masks, partial)
    (partial / "train_0003.png").unlink()
    with pytest.raises(BadInputError, match="train_0003"):
        train_deeplab(manifest, partial, tmp_path / "out", deeplab_params(), THREADS)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a png")


def _stray_label(path: Path) -> None:
    mask = load_mask(path)
    mask[0, 0] = NUM_CLASSES  # one past the last class, and not 255
    write_label_png(path, mask)


@pytest.mark.parametrize("breakage", [_garbage, _stray_label])
def test_bad_pseudo_mask_read_in_a_worker_is_an_error_naming_the_file(demo, tmp_path, breakage):
    manifest, masks = demo
    broken = tmp_path / "masks"
    shutil.copytree(masks, broken)
    breakage(broken / "train_0002.png")
    with pytest.raises(BadInputError, match="train_0002.png"):
        train_deeplab(manifest, broken, tmp_path / "out", deeplab_params(num_workers=1), THREADS)


def test_diverging_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(demo, tmp_path):
    manifest, masks = demo
    params = deeplab_params(lr=1e12, iterations=10, checkpoint_every=1, crop_size=32)
    with pytest.raises(PipelineError, match=r"at iteration \d+"):
        train_deeplab(manifest, masks, tmp_path, params, THREADS)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["iteration"] >= 1
    assert not (tmp_path / "model.pt").exists()


_TRAIN_IN_SUBPROCESS = """
import json, sys
from pipeline.deeplab.train import train_deeplab
manifest, masks, out, params, threads = json.loads(sys.argv[1])
train_deeplab(manifest, masks, out, params, threads)
"""


def _train_until_killed(manifest: Path, masks: Path, out: Path, params: dict) -> None:
    """Start training in its own process group; SIGKILL it as soon as a checkpoint exists."""
    args = json.dumps([str(manifest), str(masks), str(out), params, THREADS])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", _TRAIN_IN_SUBPROCESS, args], env=env,
                               start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT_NAME).exists():
        assert process.poll() is None, "training exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and its DataLoader worker
    process.wait()


def test_resume_after_sigkill_ends_bit_exact(demo, tmp_path):
    manifest, masks = demo
    params = deeplab_params(iterations=24, checkpoint_every=4, batch_size=2, crop_size=32)
    train_deeplab(manifest, masks, tmp_path / "whole", params, THREADS)

    killed = tmp_path / "killed"
    # A DataLoader worker in the killed run: where samples are decoded must not matter.
    with_worker = {**params, "deeplab": {**params["deeplab"], "num_workers": 1}}
    _train_until_killed(manifest, masks, killed, with_worker)
    assert not (killed / "done.json").exists(), "the run finished before it was killed"
    stopped_at = load_checkpoint(killed / CHECKPOINT_NAME)["iteration"]
    assert 4 <= stopped_at < 24
    train_deeplab(manifest, masks, killed, params, THREADS)

    whole, resumed = (load_checkpoint(d / "model.pt")["model"] for d in (tmp_path / "whole", killed))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "history.csv"),
                                  pd.read_csv(killed / "history.csv"))


# --- prediction -------------------------------------------------------------------------------


def test_predictions_cover_every_image_at_its_size(demo, trained, tmp_path):
    manifest, _ = demo
    frame = read_manifest(manifest)
    # An id with a folder in it becomes a sub-folder of the output.
    frame.loc[frame["split"] == "val", "image_id"] = "nested/" + frame["image_id"]
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "pred"
    predict_deeplab(tmp_path / "manifest.csv", "val", trained / "model.pt", out,
                    deeplab_params(multiscale=True, test_size=56), THREADS)
    val = frame[frame["split"] == "val"]
    for image_id, width, height in zip(val["image_id"], val["width"], val["height"]):
        mask = load_mask(out / f"{image_id}.png")
        assert mask.shape == (height, width) and int(mask.max()) < NUM_CLASSES
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{i}.png" for i in val["image_id"])
    assert (out / ".done").is_file()


def test_model_file_of_another_kind_is_refused(demo, tmp_path):
    manifest, _ = demo
    torch.save({"weights": torch.zeros(3)}, tmp_path / "not_deeplab.pt")
    with pytest.raises(WeightsError, match="not_deeplab.pt"):
        predict_deeplab(manifest, "val", tmp_path / "not_deeplab.pt", tmp_path / "pred",
                        deeplab_params(), THREADS)
    assert not list(tmp_path.rglob(".done"))
