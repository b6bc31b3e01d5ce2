"""``train.compile``: regional compilation of the backbone's transformer blocks (a speed key).

Meant for a host-bound GPU step (PC2M ViT-B/16 at batch 32: ~1,500 kernel launches and ~350
autocast casts a step), whose blocks' elementwise ops and casts it fuses; measured on an H200 it
did not pay for PC2M and gained 5-11% for ViT-PCM (bench/RESULTS.md), so it is off by default.

Each block of ``backbone.blocks`` is compiled in place with ``nn.Module.compile``: the module tree and its
``state_dict`` keys stay as they are (``torch.compile(module)`` would wrap it and prefix every key
with ``_orig_mod.``), and identical blocks share one compiled graph, so the compile costs about
one block's time per input shape and trainable state (the frozen and the unfrozen blocks, grad /
no-grad passes). Compilation happens at the first call of each variant, not here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

import torch
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "on", "off")
# torch.compile's backend; tests set "eager" (dynamo's capture without inductor's code generation).
BACKEND = "inductor"
# Compiled variants of the shared block code (shapes x requires_grad of the block's parameters and
# input x grad mode): a run of PC2M or ViT-PCM needs about 6-10; over torch's default limit of 8
# the block would fall back to eager.
RECOMPILE_LIMIT = 64


def compile_setting(value: str | bool) -> str:
    """``train.compile`` as one of COMPILE_SETTINGS: YAML 1.1 reads a bare ``on`` / ``off`` as a
    boolean, taken here as the word it was."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def compile_wanted(setting: str | bool, device: torch.device) -> bool:
    """Whether ``train.compile`` = ``setting`` compiles on ``device``: ``auto`` on CUDA only (the
    CPU keeps the eager numbers and start-up) where inductor can build its GPU kernels, ``on`` /
    ``off`` as said."""
    setting = compile_setting(setting)
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"train.compile: {setting!r} is not one of {', '.join(COMPILE_SETTINGS)}")
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    missing = missing_gpu_compiler()
    if missing:
        log.warning("train.compile: auto leaves the backbone eager: %s", missing)
    return missing is None


def missing_gpu_compiler() -> str | None:
    """Why inductor cannot build GPU kernels on this machine (None if it can): it needs Triton, and
    Triton a C compiler for its kernel launcher (a cluster node may have neither)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not any(shutil.which(cc) for cc in (os.environ.get("CC"), "cc", "gcc", "clang") if cc):
        return "no C compiler ($CC, cc, gcc or clang) for Triton's kernel launcher"
    return None


def compile_blocks(backbone: nn.Module, backend: str | None = None) -> int:
    """Compile every block of ``backbone.blocks`` in place (``nn.Module.compile``); returns how
    many were compiled (0 for a backbone without ``blocks``). Static shapes: one graph per input
    shape (PC2M's two view sizes, a last partial batch), each compiled at its first call. Torch's
    default (a dimension that changes recompiled once as dynamic) made PC2M ViT-B/16 slower on an
    H200, not faster: its dynamic kernels ran the forward in 27.6 ms a step where the eager blocks
    took 17.0 (bench/RESULTS.md, 2026-11-27)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return 0
    # Identical blocks run the same code object: its variants count for all of them together.
    # (torch < 2.7 calls the limit cache_size_limit.)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    for block in blocks:
        block.compile(backend=backend or BACKEND, dynamic=False)
    return len(blocks)
