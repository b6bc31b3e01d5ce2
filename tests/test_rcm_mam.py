"""RCM+MAM (paper 003): every equation against a hand computation on tiny tensors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError, WeightsError
from pipeline.methods.rcm_mam import (
    CAMNet,
    PrototypeMemory,
    RCMMAMSettings,
    ResNet38,
    ema_update,
    load_resnet38_weights,
    param_groups,
    poly_lr,
    set_learning_rates,
    teacher_copy,
    timm_backbone,
    training_step,
)
from pipeline.methods.rcm_mam.infer import class_scores, masks_from_scores, msinf_cams
from pipeline.methods.rcm_mam.losses import (
    cam_cosine_distance,
    class_prototype_sums,
    classification_loss,
    loss_weights,
    mam_loss,
    mam_targets,
    mean_prototypes,
    rcm_loss,
    region_masks,
)
from pipeline.methods.rcm_mam.model import forward_scale, fuse_scales, max_normalise

# --------------------------------------------------------------------------------------------
# Backbones


@pytest.fixture(scope="module")
def resnet38() -> ResNet38:
    torch.manual_seed(0)
    return ResNet38().eval()


def psa_resnet38_keys() -> set[str]:
    """The key names of the PSA / SEAM converted checkpoint, written out from their scheme."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"conv1a.weight", *(f"bn7.{p}" for p in bn)}
    basic = ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
             "b5", "b5_1", "b5_2"]
    for block in basic:
        keys |= {f"{block}.bn_branch2a.{p}" for p in bn} | {f"{block}.bn_branch2b1.{p}" for p in bn}
        keys |= {f"{block}.conv_branch2a.weight", f"{block}.conv_branch2b1.weight"}
    keys |= {f"{block}.conv_branch1.weight" for block in ("b2", "b3", "b4", "b5")}
    for block in ("b6", "b7"):
        for bn_name in ("bn_branch2a", "bn_branch2b1", "bn_branch2b2"):
            keys |= {f"{block}.{bn_name}.{p}" for p in bn}
        keys |= {f"{block}.conv_branch{b}.weight" for b in ("1", "2a", "2b1", "2b2")}
    return keys


def test_resnet38_has_psa_keys_widths_and_stride_8(resnet38: ResNet38) -> None:
    state = resnet38.state_dict()
    assert {k for k in state if not k.endswith("num_batches_tracked")} == psa_resnet38_keys()
    assert state["b5.conv_branch2b1.weight"].shape == (1024, 512, 3, 3)
    assert state["b6.conv_branch2b2.weight"].shape == (2048, 1024, 1, 1)
    assert state["b7.conv_branch2b1.weight"].shape == (2048, 1024, 3, 3)
    assert resnet38.b5.conv_branch2a.dilation == (1, 1) and resnet38.b5_1.conv_branch2a.dilation == (2, 2)
    assert resnet38.b7.conv_branch2b1.dilation == (4, 4)
    with torch.no_grad():
        out = resnet38(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 4096, 4, 4)
    assert (out >= 0).all()  # bn7 + ReLU


def _constant_checkpoint(keys: list[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tensor i filled with the value i: a wrong routing of keys shows, and the file stays tiny
    (every tensor is a stride-0 view of one small storage)."""
    base = torch.arange(len(keys), dtype=torch.float32)
    return {key: base[i].expand(shapes[key]) for i, key in enumerate(keys)}


def test_resnet38_loader_round_trip_and_mismatch_errors(resnet38: ResNet38, tmp_path) -> None:
    shapes = {k: v.shape for k, v in resnet38.state_dict().items()}
    keys = sorted(psa_resnet38_keys())
    path = tmp_path / "resnet38.pth"
    torch.save(_constant_checkpoint(keys, shapes), path)
    target = ResNet38()
    load_resnet38_weights(target, path)
    loaded = target.state_dict()
    for i, key in enumerate(keys):
        assert torch.equal(loaded[key], torch.full(shapes[key], float(i))), key

    wrong = _constant_checkpoint(keys, shapes)
    del wrong["b4_3.conv_branch2a.weight"]
    wrong["fc8.weight"] = torch.zeros(20, 4096, 1, 1)
    torch.save(wrong, path)
    with torch.device("meta"):  # the check needs only the shapes; meta tensors build at once
        shapes_only = ResNet38()
    with pytest.raises(WeightsError, match=r"1 missing: b4_3\.conv_branch2a\.weight.*1 unexpected: fc8\.weight"):
        load_resnet38_weights(shapes_only, path)
    path.write_bytes(b"mxnet binary")
    params = path.rename(tmp_path / "resnet38.params")
    with pytest.raises(WeightsError, match="converted"):
        load_resnet38_weights(shapes_only, params)


@pytest.mark.parametrize("stride", [8, 16])
def test_timm_backbone_output_stride(stride: int) -> None:
    trunk = timm_backbone("resnet10t", output_stride=stride)
    out = trunk(torch.randn(1, 3, 64, 64))
    assert trunk.output_stride == stride and out.shape == (1, trunk.out_channels, 64 // stride, 64 // stride)


def test_timm_backbone_refuses_a_model_timm_cannot_dilate() -> None:
    with pytest.raises(ConfigError, match="ResNet or ResNeSt"):
        timm_backbone("vit_tiny_patch16_224", output_stride=16)


def test_timm_backbone_loads_a_classifier_checkpoint(tmp_path) -> None:
    import timm

    classifier = timm.create_model("resnet10t", pretrained=False)
    torch.save(classifier.state_dict(), tmp_path / "r10t.pth")
    trunk = timm_backbone("resnet10t", output_stride=16, weights=str(tmp_path / "r10t.pth"))
    assert torch.equal(trunk.body.state_dict()["layer4.0.conv1.weight"],
                       classifier.state_dict()["layer4.0.conv1.weight"])


# --------------------------------------------------------------------------------------------
# Networks


class TinyTrunk(nn.Module):
    """A stride-2 conv + BN: the smallest backbone a CAMNet accepts."""

    out_channels = 6
    frozen_modules = ("stem",)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(self.stem(x))))


def tiny_net(num_classes: int = 3, dim: int = 5, seed: int = 0) -> CAMNet:
    torch.manual_seed(seed)
    return CAMNet(TinyTrunk(), num_classes, feature_dim=dim)


def test_camnet_freezes_batchnorm_and_named_modules() -> None:
    net = tiny_net().train()
    assert not net.backbone.bn.training and net.training
    assert not any(p.requires_grad for p in net.backbone.bn.parameters())
    assert not any(p.requires_grad for p in net.backbone.stem.parameters())
    assert net.backbone.conv.weight.requires_grad and net.project.weight.requires_grad
    features, cams = net(torch.randn(2, 3, 8, 8))
    assert features.shape == (2, 5, 4, 4) and cams.shape == (2, 3, 4, 4)


def test_max_normalise_and_multi_scale_fusion() -> None:
    a = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]])
    assert torch.allclose(max_normalise(a), torch.tensor([[[[0.0, 0.5], [0.25, 1.0]]]]), atol=1e-5)
    assert torch.equal(max_normalise(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))
    s1 = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    s2 = torch.tensor([[[[0.0, 1.0], [0.5, 0.0]]]])
    # sum (1, 1.5, 0.5, 0) divided by its maximum 1.5
    expected = torch.tensor([[[[1 / 1.5, 1.0], [0.5 / 1.5, 0.0]]]])
    assert torch.allclose(fuse_scales([s1, s2]), expected, atol=1e-4)


def test_forward_scale_resizes_to_the_input_and_normalises() -> None:
    net = tiny_net().eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = forward_scale(net, images, 0.5)
        _, raw = net(nn.functional.interpolate(images, size=(4, 4), mode="bilinear", align_corners=False))
    assert out.features.shape == (2, 5, 8, 8) and out.cams.shape == (2, 3, 8, 8)
    assert torch.allclose(out.logits, raw.mean(dim=(2, 3)), atol=1e-6)
    peaks = out.cams.flatten(2).amax(-1)
    assert torch.allclose(peaks[peaks > 0], torch.ones_like(peaks[peaks > 0]), atol=1e-4)


def test_ema_update_by_hand() -> None:
    teacher, student = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(0.0)
        student.weight.fill_(3.0), student.bias.fill_(10.0)
    ema_update(teacher, student, 0.997)
    assert teacher.weight.item() == pytest.approx(0.997 * 1 + 0.003 * 3)
    assert teacher.bias.item() == pytest.approx(0.003 * 10)
    assert student.weight.item() == 3.0


# --------------------------------------------------------------------------------------------
# RCM (eqs. 1-5)


def test_region_masks_eq1_eq2() -> None:
    # 1 image, 3 classes, 1 x 4 pixels; class 1 (index 0) absent from the label.
    cams = torch.tensor([[[[0.9, 0.9, 0.9, 0.9]],
                          [[0.5, 0.1, 0.3, 0.2]],
                          [[0.4, 0.15, 0.6, 0.21]]]])
    labels = torch.tensor([[0.0, 1.0, 1.0]])
    masks = region_masks(cams, labels, threshold=0.2)
    # pixel 0 -> class 2 (0.5 beats 0.4; class 1 ignored), pixel 1 -> background (all <= 0.2),
    # pixel 2 -> class 3, pixel 3 -> class 3 (0.21 > 0.2).
    region = masks.argmax(dim=1)
    assert region.tolist() == [[[2, 0, 3, 3]]]
    assert masks.sum(dim=1).eq(1).all() and masks[:, 1].sum() == 0


def test_prototypes_eq3_and_memory() -> None:
    # 2 images, K = 3 (bg, c1, c2), D = 2, 1 x 3 pixels.
    masks = torch.zeros(2, 3, 1, 3)
    masks[0, 0, 0, 0] = masks[0, 1, 0, 1] = masks[0, 1, 0, 2] = 1  # image 0: bg | c1 c1
    masks[1, 1, 0, 0] = masks[1, 1, 0, 1] = masks[1, 1, 0, 2] = 1  # image 1: c1 c1 c1
    features = torch.tensor([[[[1.0, 2.0, 4.0]], [[0.0, 1.0, 3.0]]],
                             [[[6.0, 6.0, 9.0]], [[3.0, 0.0, 0.0]]]])
    sums, counts = class_prototype_sums(masks, features)
    assert counts.tolist() == [1.0, 2.0, 0.0]
    means = mean_prototypes(sums, counts)
    # c1: image 0 mean (3, 2), image 1 mean (7, 1) -> (5, 1.5); bg: image 0 pixel 0 (1, 0).
    assert torch.allclose(means, torch.tensor([[1.0, 0.0], [5.0, 1.5], [0.0, 0.0]]))

    memory = PrototypeMemory(3, 2)
    memory.update(means, counts > 0)
    assert memory.filled.tolist() == [True, True, False]
    memory.update(torch.tensor([[9.0, 9.0], [0.0, 0.0], [2.0, 2.0]]), torch.tensor([False, False, True]))
    # bg and c1 keep their last non-empty prototypes; c2 gets its first.
    assert torch.allclose(memory.prototypes, torch.tensor([[1.0, 0.0], [5.0, 1.5], [2.0, 2.0]]))
    assert memory.filled.all()
    restored = PrototypeMemory(3, 2)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.prototypes, memory.prototypes) and torch.equal(restored.filled, memory.filled)


def test_rcm_infonce_by_hand() -> None:
    # 1 image, 2 pixels, D = 2, K = 3 prototypes, the third never filled.
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # pixel 0 (1, 0), pixel 1 (0, 2)
    prototypes = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    filled = torch.tensor([True, True, False])
    masks = torch.zeros(1, 3, 1, 2)
    masks[0, 0, 0, 0] = 1  # pixel 0 is background
    masks[0, 1, 0, 1] = 1  # pixel 1 is class 1
    t = 0.5
    c = 1 / math.sqrt(2)
    # normalised: pixel 0 (1, 0), pixel 1 (0, 1); prototypes (1, 0), (c, c).
    p0 = math.exp(1 / t) / (math.exp(1 / t) + math.exp(c / t))
    p1 = math.exp(c / t) / (math.exp(0 / t) + math.exp(c / t))
    expected = -(math.log(p0) + math.log(p1)) / 2
    assert rcm_loss(features, masks, prototypes, filled, t).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# MAM (eqs. 6-8)


def _two_class_cams() -> tuple[torch.Tensor, torch.Tensor]:
    """S = 3 scales, B = 1, N = 2, 1 x 2 pixels."""
    main = torch.tensor([[[[[1.0, 0.0]], [[1.0, 1.0]]]],
                         [[[[0.0, 1.0]], [[1.0, 0.0]]]],
                         [[[[1.0, 1.0]], [[0.0, 1.0]]]]])
    support = torch.tensor([[[[[1.0, 1.0]], [[0.5, 0.0]]]],
                            [[[[1.0, 0.0]], [[1.0, 1.0]]]],
                            [[[[0.0, 1.0]], [[0.0, 0.5]]]]])
    return main, support


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_xi_matrix_eq6_and_target_eq7_by_hand() -> None:
    main, support = _two_class_cams()
    xi = cam_cosine_distance(main, support)
    assert xi.shape == (1, 2, 3, 3)
    for k in range(2):
        for i in range(3):
            for j in range(3):
                hand = 2 - _cos(main[i, 0, k, 0].tolist(), support[j, 0, k, 0].tolist())
                assert xi[0, k, i, j].item() == pytest.approx(hand, abs=1e-6)
    targets = mam_targets(xi, support)
    for k in range(2):
        for i in range(3):
            hand = [sum(xi[0, k, i, j].item() * support[j, 0, k, 0, p].item() for j in range(3)) / 3
                    for p in range(2)]
            assert targets[i, 0, k, 0].tolist() == pytest.approx(hand, abs=1e-6)


def test_mam_loss_eq8_only_present_classes_and_stop_gradient() -> None:
    main, support = _two_class_cams()
    main.requires_grad_(True)
    support.requires_grad_(True)
    labels = torch.tensor([[0.0, 1.0]])  # only class 2 counts
    loss = mam_loss(main, support, labels)
    targets = mam_targets(cam_cosine_distance(main, support), support).detach()
    hand = sum(abs(targets[i, 0, 1, 0, p].item() - main[i, 0, 1, 0, p].item()) for i in range(3) for p in range(2)) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    loss.backward()
    assert support.grad is None
    assert main.grad[:, :, 0].abs().sum() == 0 and main.grad[:, :, 1].abs().sum() > 0


def test_classification_loss_is_bce() -> None:
    logits, labels = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hand = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0))) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(hand, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Schedules and optimiser


def test_lambda3_schedule_and_poly_lr() -> None:
    assert [loss_weights(e).mam for e in range(8)] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert loss_weights(0).cls == loss_weights(0).rcm == 1.0
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_param_groups_and_poly_rates() -> None:
    net = tiny_net()
    groups = {g["name"]: g for g in param_groups(net, lr=0.01, weight_decay=5e-4)}
    assert set(groups) == {"backbone_weights", "backbone_biases", "new_weights"}
    assert groups["new_weights"]["params"] == [net.project.weight, net.classifier.weight]
    assert groups["backbone_weights"]["params"] == [net.backbone.conv.weight]  # stem and BN frozen
    assert groups["backbone_biases"]["weight_decay"] == 0.0
    optimizer = torch.optim.SGD(list(groups.values()), lr=0.01)
    set_learning_rates(optimizer, 0.01, 50, 100)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["new_weights"] == pytest.approx(10 * 0.01 * 0.5**0.9)
    assert rates["backbone_biases"] == pytest.approx(2 * 0.01 * 0.5**0.9)


# --------------------------------------------------------------------------------------------
# Training step and inference


@pytest.mark.parametrize("epoch", [0, 6])
def test_training_step_trains_only_main(epoch: int) -> None:
    main = tiny_net(num_classes=3, dim=5)
    support = teacher_copy(main)
    settings = RCMMAMSettings(feature_dim=5)
    memory = PrototypeMemory(4, 5)
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    before = [p.clone() for p in support.parameters()]
    main.train()
    total, parts = training_step(main, support, images, labels, epoch, memory, settings)
    assert set(parts) == {"cls", "rcm", "mam"} and torch.isfinite(total)
    assert (parts["mam"] > 0) == (epoch >= 6)
    expected = parts["cls"] + parts["rcm"] + (parts["mam"] if epoch >= 6 else 0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert memory.filled.any()
    total.backward()
    assert main.project.weight.grad is not None and main.project.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in support.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, support.parameters(), strict=True))


def test_training_step_losses_stay_float32_under_bf16_autocast() -> None:
    main = tiny_net(num_classes=2, dim=4)
    support = teacher_copy(main)
    memory = PrototypeMemory(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = training_step(main.train(), support, torch.randn(2, 3, 8, 8), torch.eye(2), 6, memory,
                                     RCMMAMSettings(feature_dim=4))
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert memory.prototypes.dtype == torch.float32 and torch.isfinite(total)


def test_settings_from_params() -> None:
    settings = RCMMAMSettings.from_params({"scales": [0.5, 1, 2], "threshold": 0.25})
    assert settings.scales == (0.5, 1.0, 2.0) and settings.threshold == 0.25
    with pytest.raises(ValueError, match="1.0"):
        RCMMAMSettings(scales=(0.5, 2.0))
    with pytest.raises(ValueError, match="unknown"):
        RCMMAMSettings.from_params({"temprature": 0.5})


def test_msinf_cams_flip_equivariant_and_single_view() -> None:
    net = tiny_net().eval()
    images = torch.randn(1, 3, 12, 12)
    cams = msinf_cams(net, images)
    assert cams.shape == (1, 3, 12, 12) and cams.max() <= 1.0 + 1e-6
    assert torch.allclose(msinf_cams(net, images.flip(-1)), cams.flip(-1), atol=1e-5)
    single = msinf_cams(net, images, scales=(1.0,), flip=False)
    with torch.no_grad():
        _, raw = net(images)
    # ReLU at the network's resolution, then upsampled, then divided by the maximum.
    upsampled = nn.functional.interpolate(torch.relu(raw), size=(12, 12), mode="bilinear")
    peak = upsampled.flatten(2).amax(-1)[..., None, None]
    assert torch.allclose(single, upsampled / peak, atol=1e-4)


def test_class_scores_and_masks_by_hand() -> None:
    cams = torch.tensor([[[[0.9, 0.1]], [[0.5, 0.6]]]])  # N = 2, 1 x 2 pixels
    scores = class_scores(cams, torch.tensor([[0.0, 1.0]]), background=0.55)
    assert torch.allclose(scores[0, :, 0], torch.tensor([[0.55, 0.55], [0.0, 0.0], [0.5, 0.6]]))
    assert masks_from_scores(scores).tolist() == [[[0, 2]]]
    assert masks_from_scores(class_scores(cams, None, 0.55)).tolist() == [[[1, 2]]]


# ---------------------------------------------------------------------------------------------
# The method plugged into the shared trainer and prediction stage


def rcm_train_settings(**overrides) -> dict:
    from test_pc2m import train_settings

    rcm = dict(backbone="resnet10t", weights="random", output_stride=8, scales=[0.5, 1.0, 2.0], feature_dim=16,
               threshold=0.2, temperature=0.5, ema_momentum=0.9, mam_start_epoch=1, lambda_cls=1.0,
               lambda_rcm=1.0, lambda_mam=1.0, lr=0.01, lr_power=0.9, weight_decay=5e-4, crop_size=32,
               resize_range=[0.5, 1.3], flip=True, jitter=True)
    rcm.update(overrides.pop("rcm_mam", {}))
    return train_settings(**({"method": "rcm_mam", "epochs": 2, "batch_size": 4, "rcm_mam": rcm} | overrides))


@pytest.fixture(scope="module")
def rcm_demo(tmp_path_factory):
    from test_pc2m import make_demo

    return make_demo(tmp_path_factory.mktemp("rcm_demo"), 12, 4, 64, 48)


def test_crop_views_resize_flip_and_pad_with_the_mean():
    from pipeline.methods.rcm_mam.data import CropViews, random_crop_view

    image = torch.rand(3, 10, 20)
    views = CropViews(crop_size=16, resize_range=(1.0, 1.0), flip=False, jitter=False)
    view = random_crop_view(image, views, torch.Generator().manual_seed(0))
    assert view.shape == (3, 16, 16)
    # the 10-row image is placed whole inside the 16-row crop; the rest is NaN (mean after normalising)
    assert int(torch.isnan(view[0]).all(dim=1).sum()) == 6
    rows = ~torch.isnan(view[0]).all(dim=1)
    window = view[:, rows]
    offsets = [x for x in range(5) if torch.equal(window, image[:, :, x : x + 16])]
    assert len(offsets) == 1  # a crop of the image, unresized and unflipped
    doubled = random_crop_view(image, CropViews(16, (2.0, 2.0), False, False), torch.Generator().manual_seed(0))
    assert not torch.isnan(doubled).any()  # 20 x 40 after resizing: the crop lies inside


def test_training_resumes_exactly_and_predicts_through_the_shared_stages(rcm_demo, tmp_path):
    import pandas as pd

    from pipeline import shards
    from pipeline.predict import predict_shard
    from pipeline.training.trainer import train
    from test_pc2m import BACKBONE, NUM_CLASSES, predict_settings

    def run(out):
        train(rcm_demo / "manifest.csv", rcm_demo / "classes.json", None, out,
              {"backbone": BACKBONE, "train": rcm_train_settings(epochs=3, keep_checkpoints=3), "mode": "weak",
               "seed": 0}, 2)

    run(tmp_path / "straight")
    history = pd.read_csv(tmp_path / "straight" / "history.csv")
    assert {"cls", "rcm", "mam", "lambda_mam"} <= set(history.columns)
    assert list(history["lambda_mam"]) == [0.0, 1.0, 1.0]  # lambda_3 switched on at mam_start_epoch
    assert history["mam"].iloc[0] == 0 and history["mam"].iloc[1:].gt(0).all()
    assert history["lr"].is_monotonic_decreasing  # poly schedule
    # A run killed after epoch 2: only its epoch-2 checkpoint is left; the same command resumes it.
    # (The poly rate spans the run: asking for other epochs is another run, never resumed.)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tmp_path / "straight" / "checkpoints" / "epoch-0002.pt",
                    tmp_path / "resumed" / "checkpoints" / "last.pt")
    run(tmp_path / "resumed")
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert straight["arch"]["method"] == "rcm_mam" and straight["arch"]["num_classes"] == NUM_CLASSES
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    pd.testing.assert_frame_equal(history.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns="seconds"))

    predict = predict_settings(max_size=64, flip=True) | {"rcm_mam": {"scales": [0.5, 1.0], "background": 0.2}}
    params = {"backbone": BACKBONE, "predict": predict, "mode": "weak"}
    predict_shard(rcm_demo / "manifest.csv", 0, tmp_path / "straight" / "model.pt", tmp_path / "probs.safetensors",
                  tmp_path / "masks", params, 2)
    meta = shards.read_meta(tmp_path / "probs.safetensors")
    assert meta["num_classes"] == NUM_CLASSES and meta["patch_size"] == 8
    for image in shards.read_images(tmp_path / "probs.safetensors").values():
        probs = image["probs"].float()
        assert probs.shape[0] == NUM_CLASSES
        torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]), atol=2e-3, rtol=0)
    assert len(list((tmp_path / "masks").glob("*.png"))) == len(meta["image_ids"])
