"""SGD parameter groups and the poly learning rate of the CNN methods (RCM+MAM, the CAM
baseline, CSRM).

``PSA_GROUPS`` follow the ResNet-38 / Puzzle-CAM codebases (PSA / SEAM ``get_parameter_groups``,
Puzzle-CAM's ``PolyOptimizer``): pretrained weights at lr, pretrained biases at 2 lr without
weight decay, layers trained from scratch at 10 lr (their biases 20 lr). ``CSRM_GROUPS``: paper
004 Sec. 4 gives 0.007 for pretrained and 0.07 for new weights; its code keeps biases at their
weights' rate without weight decay. A poly power of 1 is a linear decay.
"""

from __future__ import annotations

import torch
from torch import nn

# (name, lr multiplier, weight decay applies) of the four groups, in the codebases' order.
GroupSpec = tuple[tuple[str, float, bool], ...]
PSA_GROUPS: GroupSpec = (("backbone_weights", 1.0, True), ("backbone_biases", 2.0, False),
                         ("new_weights", 10.0, True), ("new_biases", 20.0, False))
CSRM_GROUPS: GroupSpec = (("backbone_weights", 1.0, True), ("backbone_biases", 1.0, False),
                          ("new_weights", 10.0, True), ("new_biases", 10.0, False))


def poly_lr(base_lr: float, step: int, max_steps: int, power: float = 0.9) -> float:
    """base_lr * (1 - step / max_steps) ** power (0 from ``max_steps`` on)."""
    return base_lr * max(0.0, 1.0 - step / max_steps) ** power


def param_groups(model: nn.Module, lr: float, weight_decay: float = 5e-4, groups: GroupSpec = PSA_GROUPS) -> list[dict]:
    """Optimiser groups of the trainable parameters of ``model`` (frozen ones left out); the new
    layers are ``model.new_layers()``.

    Each group has ``params``, ``lr`` (= lr * ``lr_mult``), ``lr_mult`` and ``weight_decay``;
    empty groups are dropped. Biases are the 1-d parameters.
    """
    new = {id(p) for layer in model.new_layers() for p in layer.parameters()}
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name, _, _ in groups}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        origin = "new" if id(parameter) in new else "backbone"
        kind = "biases" if parameter.ndim == 1 else "weights"
        buckets[f"{origin}_{kind}"].append(parameter)
    return [
        {"name": name, "params": buckets[name], "lr": lr * mult, "lr_mult": mult,
         "weight_decay": weight_decay if decays else 0.0}
        for name, mult, decays in groups
        if buckets[name]
    ]


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_steps: int,
                       power: float = 0.9) -> float:
    """Set every group of ``optimizer`` to its ``lr_mult`` times the poly rate; returns the rate."""
    rate = poly_lr(base_lr, step, max_steps, power)
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("lr_mult", 1.0)
    return rate
