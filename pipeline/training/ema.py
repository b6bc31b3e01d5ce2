"""EMA teachers (RCM+MAM's SupportNet G, paper 003 Sec. 3.1; CSRM's teacher, paper 004 Sec. 3.2.6):
a frozen copy of the trained network whose weights follow the exponential moving average of its."""

from __future__ import annotations

import copy

import torch
from torch import nn


def teacher_copy(student: nn.Module) -> nn.Module:
    """The teacher at the start of training: the student's weights, no gradients, eval mode (no dropout)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """theta_t <- alpha theta_t + (1 - alpha) theta_s (paper 003 Sec. 3.1: alpha = 0.997).

    Floating-point buffers (BatchNorm statistics) are averaged the same way; integer buffers
    (BatchNorm's step counter) are copied.
    """
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        else:
            t.copy_(s)
