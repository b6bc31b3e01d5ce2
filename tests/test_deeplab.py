"""DeepLab verification: the recipes' networks (DeepLab-v2 ASPP-L with frozen BatchNorm, DeepLabv3,
DeepLabV3+), parameter groups, initial weights, training, exact resume after SIGKILL, and the
padded multi-scale + flip test.

Training tests use timm's ``test_resnet`` (a ResNet with narrow layers, same strides as resnet18)
on tiny demo crops, single-threaded, from config.yaml's recipes with tiny overrides, so the whole
module runs in about a minute on CPU.
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
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from pipeline.checkpoint import load_checkpoint
from pipeline.datasets import build_index, read_manifest
from pipeline.datasets.demo import generate_demo
from pipeline.deeplab.model import AsppV2, DeepLab
from pipeline.deeplab.predict import PredictSettings, class_probabilities, pad_to_canvas, predict_deeplab
from pipeline.deeplab.train import (
    CHECKPOINT_NAME,
    TrainSettings,
    build_model,
    make_optimizer,
    parameter_groups,
    resolve_recipe,
    set_lr,
    train_deeplab,
)
from pipeline.errors import BadInputError, ConfigError, PipelineError, WeightsError
from pipeline.imageio import load_mask, write_label_png

NUM_CLASSES = 5  # demo: background + 4 shapes
CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["deeplab"]
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
    """config.yaml's ``deeplab`` section (its recipes, demo recipe v3plus) at test size."""
    section = {
        **CONFIG, "backbone": "test_resnet", "init": "random", "iterations": 30, "batch_size": 4, "crop_size": 40,
        "lr": 0.01, "head_lr_multiplier": 10.0, "checkpoint_every": 10, "log_every": 5, "num_workers": 0,
        "device": "cpu",
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


@pytest.mark.parametrize("recipe", ["v2", "v3plus", "comus"])
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_logits_have_the_input_size_and_one_channel_per_class(backbone, recipe):
    model = build_model(TrainSettings.from_params(deeplab_params(recipe=recipe, backbone=backbone))).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 50, 70))  # not a multiple of the stride or patch size
    assert logits.shape == (2, NUM_CLASSES, 50, 70)


def test_a_timm_state_dict_loads_without_its_classifier(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)  # with its ImageNet `fc`
    save_file(reference.state_dict(), tmp_path / "resnet18.safetensors")
    model = DeepLab("resnet18", NUM_CLASSES, weights=str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.backbone.body.state_dict()["conv1.weight"], reference.conv1.weight)


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other_net.pth")
    with pytest.raises(WeightsError, match="other_net.pth"):
        DeepLab("resnet18", NUM_CLASSES, weights=str(tmp_path / "other_net.pth"))


# --- training ---------------------------------------------------------------------------------


def test_loss_decreases_and_artifacts_are_written(trained):
    history = pd.read_csv(trained / "history.csv")
    assert list(history["iteration"]) == [5, 10, 15, 20, 25, 30]
    assert history["loss"].iloc[-2:].mean() < 0.7 * history["loss"].iloc[:2].mean()
    done = json.loads((trained / "done.json").read_text())
    assert done["iterations"] == 30 and done["recipe"] == "v3plus" and done["network"].startswith("DeepLabV3+")
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
                    deeplab_params(test_scales=[0.5, 1.0, 1.5], test_flip=True, pad_to=56), THREADS)
    val = frame[frame["split"] == "val"]
    for image_id, width, height in zip(val["image_id"], val["width"], val["height"]):
        mask = load_mask(out / f"{image_id}.png")
        assert mask.shape == (height, width) and int(mask.max()) < NUM_CLASSES
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{i}.png" for i in val["image_id"])
    assert json.loads((out / ".done").read_text())["pad_to"] == 56


def test_each_png_written_by_the_threads_is_its_own_images_argmax(demo, trained, tmp_path):
    """Four PNG threads: every mask is the argmax of its own image's probabilities (a mask
    handed to the wrong name, or written before its image was done, would differ)."""
    from pipeline.deeplab.model import load_trained_deeplab
    from pipeline.imageio import load_rgb

    manifest, _ = demo
    params = deeplab_params(test_scales=[1.0], test_flip=False, pad_to=None)
    predict_deeplab(manifest, "val", trained / "model.pt", tmp_path / "pred", params, 4)
    model = load_trained_deeplab(trained / "model.pt").eval()
    settings = PredictSettings.from_params(params)
    val = read_manifest(manifest).query("split == 'val'")
    masks = [load_mask(tmp_path / "pred" / f"{image_id}.png") for image_id in val["image_id"]]
    for image_id, path, mask in zip(val["image_id"], val["image_path"], masks):
        rgb = torch.from_numpy(load_rgb(path).copy())
        image = ((rgb.permute(2, 0, 1).float() / 255 - torch.tensor(model.normalisation[0]).view(3, 1, 1))
                 / torch.tensor(model.normalisation[1]).view(3, 1, 1))[None]
        expected = class_probabilities(model, image, settings).argmax(dim=0).numpy()
        assert (mask == expected).all(), image_id
    assert len({m.tobytes() for m in masks}) > 1  # the images' masks differ: a mix-up would show


def test_a_failed_png_write_leaves_no_masks_folder(demo, trained, tmp_path, full_disk_at_the_third_mask):
    import pipeline.deeplab.predict as deeplab_predict

    writes = full_disk_at_the_third_mask(deeplab_predict)
    manifest, _ = demo
    with pytest.raises(OSError, match="No space left"):
        predict_deeplab(manifest, "val", trained / "model.pt", tmp_path / "pred", deeplab_params(), 2)
    assert len(writes) >= 3 and list(tmp_path.iterdir()) == []


def test_model_file_of_another_kind_is_refused(demo, tmp_path):
    manifest, _ = demo
    torch.save({"weights": torch.zeros(3)}, tmp_path / "not_deeplab.pt")
    with pytest.raises(WeightsError, match="not_deeplab.pt"):
        predict_deeplab(manifest, "val", tmp_path / "not_deeplab.pt", tmp_path / "pred",
                        deeplab_params(), THREADS)
    assert not list(tmp_path.rglob(".done"))


# --- recipes ------------------------------------------------------------------------------------


def test_a_recipe_without_overrides_has_its_papers_values():
    cfg = {**CONFIG, "recipe": "v2", **{key: None for key in ("iterations", "batch_size", "crop_size", "lr")}}
    values = resolve_recipe(cfg)
    # papers 001/004: DeepLab-v2 R101 lr 2.5e-4, poly 0.9, batch 10, crop 321, 10k iterations, x10 head
    assert (values["lr"], values["poly_power"], values["batch_size"], values["crop_size"], values["iterations"],
            values["head_lr_multiplier"], values["aspp_rates"], values["freeze_bn"]) == (
        2.5e-4, 0.9, 10, 321, 10000, 10.0, [6, 12, 18, 24], True)
    comus = resolve_recipe({**cfg, "recipe": "comus"})  # paper 002 Table 11
    assert (comus["optimizer"], comus["lr"], comus["batch_size"], comus["crop_size"], comus["scale_range"],
            comus["epochs"], comus["iterations"]) == ("adam", 6e-5, 56, 512, [0.5, 2.0], 10, None)
    v3plus = resolve_recipe({**cfg, "recipe": "v3plus"})  # paper 004: batch 32, 50 epochs, lr 0.007
    assert (v3plus["batch_size"], v3plus["epochs"], v3plus["lr"]) == (32, 50, 0.007)


def test_overrides_replace_the_recipe_and_iterations_replace_epochs():
    cfg = {**CONFIG, "recipe": "v3plus", "iterations": 7, "lr": 0.5}
    values = resolve_recipe(cfg)
    assert (values["iterations"], values["epochs"], values["lr"], values["batch_size"]) == (7, None, 0.5, 6)
    by_epochs = resolve_recipe({**cfg, "iterations": None, "epochs": 2})
    assert (by_epochs["iterations"], by_epochs["epochs"]) == (None, 2)
    with pytest.raises(ConfigError, match="both"):
        resolve_recipe({**cfg, "epochs": 2})
    with pytest.raises(ConfigError, match="deeplab.recipe: 'v9'"):
        resolve_recipe({**cfg, "recipe": "v9"})


def test_epochs_become_whole_batches_of_passes_over_the_images():
    settings = TrainSettings.from_params(deeplab_params(iterations=None, epochs=50, batch_size=32))
    assert settings.for_images(10).iterations == 16  # ceil(50 * 10 / 32)
    assert settings.for_images(64).iterations == 100


# --- DeepLab-v2 ----------------------------------------------------------------------------------


def _v2(backbone: str = "resnet18") -> DeepLab:
    return build_model(TrainSettings.from_params(deeplab_params(recipe="v2", backbone=backbone)))


def test_v2_head_is_aspp_l_four_dilated_3x3_convs_summed():
    model = _v2().eval()
    head = model.head
    assert isinstance(head, AsppV2) and len(head.branches) == 4
    for conv, rate in zip(head.branches, (6, 12, 18, 24)):
        assert (conv.kernel_size, conv.dilation, conv.padding) == ((3, 3), (rate, rate), (rate, rate))
        assert (conv.in_channels, conv.out_channels) == (512, NUM_CLASSES) and conv.bias is not None
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        _, deep = model.backbone(x)
        assert deep.shape[-2:] == (9, 9)  # output stride 8
        by_hand = sum(F.conv2d(deep, c.weight, c.bias, padding=c.dilation, dilation=c.dilation) for c in head.branches)
        torch.testing.assert_close(head(None, deep), by_hand)
        assert model(x).shape == (1, NUM_CLASSES, 65, 65)


def test_v2_on_resnet101_at_65_px():
    model = _v2("resnet101").eval()
    assert model.head.branches[0].in_channels == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, NUM_CLASSES, 65, 65)


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_v2_batchnorm_is_frozen_through_a_training_step():
    torch.manual_seed(0)
    model = _v2().train()
    norms = _batchnorms(model)
    assert norms and model.training and not any(bn.training for bn in norms)
    assert not any(p.requires_grad for bn in norms for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings.from_params(deeplab_params(recipe="v2", backbone="resnet18"))
    optimizer = make_optimizer(model, settings)
    set_lr(optimizer, 0.1)
    loss = model(torch.randn(2, 3, 33, 33)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for bn in norms for p in bn.parameters())
    after = model.state_dict()
    bn_keys = [k for k in before if k.split(".")[-1] in {"running_mean", "running_var", "weight", "bias"}
               and isinstance(model.get_submodule(k.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)
    assert not torch.equal(before["head.branches.0.weight"], after["head.branches.0.weight"])


def test_v2_groups_head_at_10x_lr_and_no_weight_decay_on_biases_or_batchnorm():
    model = _v2()
    groups = parameter_groups(model, 10.0, 5e-4)
    head = {id(p) for p in model.head.parameters()}
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert set(by_id) == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)
            continue
        group = by_id[id(p)]
        assert group["lr_multiplier"] == (10.0 if id(p) in head else 1.0), name
        assert group["weight_decay"] == (0.0 if name.endswith(".bias") else 5e-4), name
    optimizer = torch.optim.SGD(groups, lr=1.0)
    set_lr(optimizer, 2.5e-4)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [2.5e-4, 2.5e-3]


def test_trained_batchnorm_gets_no_weight_decay():
    model = DeepLab("resnet18", NUM_CLASSES)  # V3+: BatchNorm trained
    by_id = {id(p): g for g in parameter_groups(model, 1.0, 4e-5) for p in g["params"]}
    norms = _batchnorms(model)
    assert all(by_id[id(p)]["weight_decay"] == 0.0 for bn in norms for p in bn.parameters())
    assert by_id[id(model.backbone.body.conv1.weight)]["weight_decay"] == 4e-5


def test_v2_and_comus_train_and_say_which_recipe_ran(demo, tmp_path):
    manifest, masks = demo
    train_deeplab(manifest, masks, tmp_path / "v2", deeplab_params(recipe="v2", iterations=3, crop_size=33), THREADS)
    done = json.loads((tmp_path / "v2" / "done.json").read_text())
    assert done["recipe"] == "v2" and done["network"].startswith("DeepLab-v2 test_resnet (ASPP 6/12/18/24")
    initial = build_model(TrainSettings.from_params(deeplab_params(recipe="v2")))
    trained = load_checkpoint(tmp_path / "v2" / "model.pt")["model"]
    stats = [k for k in trained if k.endswith("running_mean")]
    assert stats and all(torch.equal(trained[k], initial.state_dict()[k]) for k in stats)  # frozen BN

    params = deeplab_params(recipe="comus", iterations=None, epochs=2, lr=1e-3, crop_size=33)
    train_deeplab(manifest, masks, tmp_path / "comus", params, THREADS)
    done = json.loads((tmp_path / "comus" / "done.json").read_text())
    assert done["recipe"] == "comus" and done["iterations"] == 3  # ceil(2 epochs * 6 images / batch 4)
    assert done["settings"]["optimizer"] == "adam" and done["network"].startswith("DeepLabv3")


# --- initial weights -------------------------------------------------------------------------------


def test_dino_resnet50_file_missing_says_where_to_get_it(tmp_path):
    params = deeplab_params(recipe="comus", backbone="resnet50", init="dino_resnet50",
                            init_file=str(tmp_path / "dino_resnet50_pretrain.pth"))
    with pytest.raises(WeightsError, match=r"facebookresearch/dino.*dino_resnet50_pretrain\.pth.*init: random"):
        build_model(TrainSettings.from_params(params))
    with pytest.raises(ConfigError, match="resnet50"):
        build_model(TrainSettings.from_params({**params, "deeplab": {**params["deeplab"], "backbone": "resnet18"}}))


def test_dino_resnet50_file_loads_into_the_backbone(tmp_path):
    # The DINO release is a torchvision ResNet-50 state dict: same key names as timm's resnet50.
    reference = timm.create_model("resnet50", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "dino_resnet50_pretrain.pth")
    params = deeplab_params(recipe="comus", backbone="resnet50", init="dino_resnet50",
                            init_file=str(tmp_path / "dino_resnet50_pretrain.pth"))
    model = build_model(TrainSettings.from_params(params))
    assert torch.equal(model.backbone.body.state_dict()["layer4.2.conv3.weight"], reference.layer4[2].conv3.weight)


def test_file_init_needs_its_file():
    with pytest.raises(ConfigError, match="deeplab.init_file"):
        build_model(TrainSettings.from_params(deeplab_params(init="file", init_file=None)))


# --- test-time: pad, scales, flip ------------------------------------------------------------------


def test_padding_fills_bottom_right_with_the_mean_and_never_shrinks():
    image = torch.randn(1, 3, 20, 600)
    padded = pad_to_canvas(image, 513)
    assert padded.shape[-2:] == (513, 600)
    assert torch.equal(padded[..., :20, :], image) and not padded[..., 20:, :].any()
    assert pad_to_canvas(image, None) is image


def test_multiscale_flip_prediction_equals_the_hand_averaged_views():
    torch.manual_seed(0)
    model = DeepLab("test_resnet", NUM_CLASSES).eval()
    image = torch.randn(1, 3, 37, 45)
    settings = PredictSettings(scales=(0.5, 0.75, 1.0, 1.5), flip=True, pad_to=48, num_workers=0, device="cpu")
    canvas = torch.zeros(1, 3, 48, 48)
    canvas[:, :, :37, :45] = image
    views = []
    with torch.no_grad():
        for scale in settings.scales:
            side = round(48 * scale)
            scaled = F.interpolate(canvas, size=(side, side), mode="bilinear", align_corners=False)
            mirrored = scaled[..., torch.arange(side - 1, -1, -1)]
            for logits in (model(scaled), model(mirrored)[..., torch.arange(side - 1, -1, -1)]):
                up = F.interpolate(logits, size=(48, 48), mode="bilinear", align_corners=False)
                views.append(torch.softmax(up, dim=1)[0, :, :37, :45])
    by_hand = torch.stack(views).mean(dim=0)
    torch.testing.assert_close(class_probabilities(model, image, settings), by_hand)
    one_view = PredictSettings(scales=(1.0,), flip=False, pad_to=None, num_workers=0, device="cpu")
    assert not torch.allclose(class_probabilities(model, image, one_view), by_hand)
