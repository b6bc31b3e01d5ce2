"""Optimiser settings of RCM+MAM: parameter groups and the poly learning rate (paper 003 Sec. 4.2).

The paper gives the poly policy (initial lr 0.01, power 0.9, "as in [6]"); the groups follow the
ResNet-38 codebases it builds on (PSA / SEAM ``get_parameter_groups``): pretrained weights at lr,
pretrained biases at 2 lr without weight decay, layers trained from scratch at 10 lr (their
biases 20 lr). Weight decay is not given by the paper; the codebases use 5e-4.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.rcm_mam.model import CAMNet

# (name, lr multiplier, weight decay applies) of the four groups, in the codebases' order.
_GROUPS = (("backbone_weights", 1.0, True), ("backbone_biases", 2.0, False),
           ("new_weights", 10.0, True), ("new_biases", 20.0, False))


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """base_lr * (1 - step / max_steps) ** power (0 from ``max_steps`` on)."""
    return base_lr * max(0.0, 1.0 - step / max_steps) ** power


def param_groups(model: CAMNet, lr: float, weight_decay: float = 5e-4) -> list[dict]:
    """Optimiser groups of the trainable parameters of ``model`` (frozen ones left out).

    Each group has ``params``, ``lr`` (= lr * ``lr_mult``), ``lr_mult`` and ``weight_decay``;
    empty groups are dropped. Biases are the 1-d parameters.
    """
    new = {id(p) for layer in model.new_layers() for p in layer.parameters()}
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name, _, _ in _GROUPS}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        origin = "new" if id(parameter) in new else "backbone"
        kind = "biases" if parameter.ndim == 1 else "weights"
        buckets[f"{origin}_{kind}"].append(parameter)
    return [
        {"name": name, "params": buckets[name], "lr": lr * mult, "lr_mult": mult,
         "weight_decay": weight_decay if decays else 0.0}
        for name, mult, decays in _GROUPS
        if buckets[name]
    ]


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_steps: int,
                       power: float = 0.9) -> float:
    """Set every group of ``optimizer`` to its ``lr_mult`` times the poly rate; returns the rate."""
    rate = poly_lr(base_lr, step, max_steps, power)
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("lr_mult", 1.0)
    return rate
