"""Two speed options of PC2M / ViT-PCM training: ``train.compile`` (regional compilation of the
backbone's blocks, a speed-only key) and ``train.vitpcm.lstm_precision`` (the HV-BiLSTM in bf16, a
result key). No real inductor compile here: the compiled blocks use dynamo's ``eager`` backend
(the graph capture and guards, without code generation), so each test stays within seconds."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_vitpcm import vitpcm_settings

import pipeline.training.compile as compile_module
from pipeline.backbone import build_backbone
from pipeline.config import load_schema, validate_config
from pipeline.devices import mixed_precision
from pipeline.errors import ConfigError
from pipeline.methods.pc2m.model import Architecture, HVBiLSTM, build_network, model_payload
from pipeline.methods.pc2m.settings import TrainSettings
from pipeline.stage_settings import SPEED_ONLY
from pipeline.training.checkpoints import RESUMABLE_KEYS
from pipeline.training.compile import compile_blocks, compile_wanted
from test_pc2m import BACKBONE, NUM_CLASSES, make_demo, train_settings


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_backbone() -> torch.nn.Module:
    return build_backbone(BACKBONE["name"], "random", model_kwargs=BACKBONE["model_kwargs"])


# ---------------------------------------------------------------------------------------------
# train.compile


def test_compile_wanted_by_setting_and_device(monkeypatch, caplog):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(compile_module, "missing_gpu_compiler", lambda: None)
    assert compile_wanted("auto", cuda) and not compile_wanted("auto", cpu)
    # A GPU node without Triton's C compiler: auto stays eager and says why; on is taken at its word.
    monkeypatch.setattr(compile_module, "missing_gpu_compiler", lambda: "no C compiler")
    assert not compile_wanted("auto", cuda) and compile_wanted("on", cuda)
    assert "auto leaves the backbone eager: no C compiler" in caplog.text
    assert compile_wanted("on", cpu) and compile_wanted("on", cuda)
    assert not compile_wanted("off", cuda) and not compile_wanted("off", cpu)
    # YAML 1.1 reads a bare on / off as a boolean
    assert compile_wanted(True, cpu) and not compile_wanted(False, cuda)
    with pytest.raises(ConfigError, match="train.compile"):
        compile_wanted("yes", cpu)


def test_a_gpu_compiler_needs_triton_and_a_c_compiler(monkeypatch):
    monkeypatch.setattr(compile_module.importlib.util, "find_spec", lambda name: None)
    assert compile_module.missing_gpu_compiler() == "Triton is not installed"
    monkeypatch.setattr(compile_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    assert "no C compiler" in compile_module.missing_gpu_compiler()
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert compile_module.missing_gpu_compiler() is None


def test_compiled_blocks_keep_the_keys_and_the_output():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = build_network(backbone, Architecture("pc2m", NUM_CLASSES, 0)).eval()
    arch = Architecture("pc2m", NUM_CLASSES, 0)
    keys = list(model.state_dict())
    payload_keys = list(model_payload(model, arch)["model"])
    images = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        eager = model(images).log_probs
    assert compile_blocks(backbone, backend="eager") == BACKBONE["model_kwargs"]["depth"]
    assert all(block._compiled_call_impl is not None for block in backbone.blocks)
    with torch.no_grad():
        compiled = model(images).log_probs
        other_size = model(images[..., :16]).log_probs  # a second view size: a recompile, not an error
    assert torch.equal(compiled, eager)
    assert other_size.shape[-2:] == (6, 2)
    assert list(model.state_dict()) == keys and list(model_payload(model, arch)["model"]) == payload_keys
    assert not any("_orig_mod" in key for key in keys)
    # Gradients flow through the compiled blocks (the unfrozen phase).
    model.train()
    model(images).log_probs.sum().backward()
    assert backbone.blocks[-1].mlp.fc1.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor's GPU kernels)")
def test_inductor_compiled_blocks_on_cuda_agree_with_eager_ones():
    """What train.compile: auto does on a GPU: inductor's kernels, under the stage's bf16 autocast,
    forward at two view sizes and backward, against the same blocks run eagerly."""
    torch.manual_seed(0)
    backbone = tiny_backbone().cuda()
    model = build_network(backbone, Architecture("pc2m", NUM_CLASSES, 0)).cuda().train()
    images = [torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(4, 3, 32, 32, device="cuda")]

    def outputs_and_grad() -> tuple[list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        with mixed_precision(torch.device("cuda")):
            outs = [model(view).log_probs for view in images]
        sum(out.sum() for out in outs).backward()
        return [out.detach() for out in outs], backbone.blocks[0].attn.qkv.weight.grad.clone()

    eager, eager_grad = outputs_and_grad()
    compile_blocks(backbone)
    for _ in range(2):  # the first call compiles
        compiled, compiled_grad = outputs_and_grad()
    for a, b in [*zip(compiled, eager), (compiled_grad, eager_grad)]:
        assert (a - b).norm() / b.norm() < 5e-2  # bf16 rounding, fused differently; a wrong kernel: ~1


def test_compile_is_a_speed_only_resumable_key(default_config, repo):
    assert "compile" in SPEED_ONLY["train"] and "compile" in RESUMABLE_KEYS
    assert default_config["train"]["compile"] == "off"  # measured not to pay (config.yaml)
    assert TrainSettings.from_params(train_settings()).compile == "off"  # absent: off
    assert TrainSettings.from_params(train_settings(compile=True)).compile == "on"
    with pytest.raises(ConfigError, match="train.compile"):
        TrainSettings.from_params(train_settings(compile="always"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("compile_demo"), 8, 2, 64, 48)


@pytest.mark.parametrize("method", ["pc2m", "vitpcm"])
def test_training_with_compiled_blocks_saves_the_same_model(demo, tmp_path, monkeypatch, method, caplog):
    """train.compile: on, on the CPU (dynamo's eager backend): model.pt and the checkpoints hold the
    same keys as an eager run, and the same numbers (the eager backend runs the captured ops)."""
    from pipeline.training.trainer import train

    monkeypatch.setattr(compile_module, "BACKEND", "eager")
    make = vitpcm_settings if method == "vitpcm" else train_settings
    saved = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        settings = make(epochs=2, warmup_epochs=1, unfreeze_blocks=1, batch_size=4, compile=setting)
        with caplog.at_level("INFO", logger="pipeline.methods.pc2m.method"):
            train(demo / "manifest.csv", demo / "classes.json", None, out,
                  {"backbone": BACKBONE, "train": settings, "mode": "weak", "seed": 0}, 2)
        checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        saved[setting] = (torch.load(out / "model.pt", weights_only=True), checkpoint,
                          pd.read_csv(out / "history.csv").drop(columns="seconds"))
    assert "backbone blocks compiled: 2" in caplog.text and "backbone blocks eager" in caplog.text
    (model_off, checkpoint_off, history_off), (model_on, checkpoint_on, history_on) = saved["off"], saved["on"]
    assert model_on["arch"] == model_off["arch"]
    assert list(model_on["model"]) == list(model_off["model"])
    assert list(checkpoint_on["model"]) == list(checkpoint_off["model"])
    assert checkpoint_on["fingerprint"] == checkpoint_off["fingerprint"]  # resumable across the switch
    for name, tensor in model_off["model"].items():
        torch.testing.assert_close(model_on["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    pd.testing.assert_frame_equal(history_on, history_off, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# train.vitpcm.lstm_precision


def old_float32_forward(lstm: HVBiLSTM, grid: torch.Tensor) -> torch.Tensor:
    """HVBiLSTM.forward as it was before lstm_precision (eval mode: no dropout)."""
    b, gh, gw, e = grid.shape
    with torch.autocast(grid.device.type, enabled=False):
        grid = grid.float()
        rows = lstm.rows(grid.reshape(b * gh, gw, e))[0].reshape(b, gh, gw, -1)
        columns = lstm.columns(grid.transpose(1, 2).reshape(b * gw, gh, e))[0]
        columns = columns.reshape(b, gw, gh, -1).transpose(1, 2)
    return torch.cat([rows, columns], dim=-1)


def test_bf16_lstm_is_close_to_float32_and_float32_is_unchanged():
    torch.manual_seed(0)
    single = HVBiLSTM(in_features=8, hidden=5, dropout=0.2).eval()
    reduced = HVBiLSTM(in_features=8, hidden=5, dropout=0.2, precision="bfloat16").eval()
    reduced.load_state_dict(single.state_dict())
    grid = torch.randn(2, 4, 6, 8)
    out = single(grid)
    assert torch.equal(out, old_float32_forward(single, grid))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 even under an outer autocast
        assert torch.equal(single(grid), out)
    low = reduced(grid)
    assert low.dtype == torch.float32 and not torch.equal(low, out)
    torch.testing.assert_close(low, out, atol=3e-2, rtol=0)  # bf16: 8 bits of mantissa
    # Training mode: gradients reach the float32 weights.
    reduced.train()(grid).sum().backward()
    assert reduced.rows.weight_ih_l0.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        HVBiLSTM(8, 5, 0.0, precision="float16")


def test_lstm_precision_reaches_the_network():
    settings = TrainSettings.from_params(vitpcm_settings())
    assert settings.lstm_precision() == "float32"
    settings = TrainSettings.from_params(vitpcm_settings(vitpcm={"lstm_precision": "bfloat16"}))
    assert settings.lstm_precision() == "bfloat16"
    network = build_network(tiny_backbone(), settings.architecture(NUM_CLASSES, BACKBONE["name"]),
                            settings.head_dropout(), settings.lstm_precision())
    assert network.conditioning.precision == "bfloat16"
    assert "lstm_precision" not in vars(settings.architecture(NUM_CLASSES, BACKBONE["name"]))  # training only
    logits = network.eval()(torch.randn(1, 3, 32, 32)).log_probs
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(F.softmax(logits, 1).sum(1), torch.ones(1, 4, 4))
    with pytest.raises(ConfigError, match="lstm_precision"):
        TrainSettings.from_params(vitpcm_settings(vitpcm={"lstm_precision": "float16"}))


# ---------------------------------------------------------------------------------------------
# The schema


@pytest.mark.parametrize(("path", "value", "valid"), [
    (("train", "compile"), "auto", True), (("train", "compile"), "on", True), (("train", "compile"), "off", True),
    (("train", "compile"), True, True), (("train", "compile"), "yes", False), (("train", "compile"), 1, False),
    (("train", "vitpcm", "lstm_precision"), "float32", True),
    (("train", "vitpcm", "lstm_precision"), "bfloat16", True),
    (("train", "vitpcm", "lstm_precision"), "float16", False),
])
def test_the_schema_takes_the_new_keys(repo, default_config, path, value, valid):
    schema = load_schema(repo / "workflow" / "schemas" / "config.schema.yaml")
    node = default_config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if valid:
        validate_config(default_config, schema)
    else:
        with pytest.raises(ConfigError, match=r"config key " + ".".join(path)):
            validate_config(default_config, schema)
