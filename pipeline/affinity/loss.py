"""AffinityNet's loss (Ahn & Kwak, CVPR 2018, Sec. 3.2, Eqs. 3-6).

Cross-entropy of the predicted affinities a in (0, 1] against the pair labels, averaged
separately over background-positive, foreground-positive and negative pairs so that none of the
three dominates by its count: L = L_bg+ / 4 + L_fg+ / 4 + L_neg / 2 (the paper's
L_fg+ + L_bg+ + 2 L_neg, scaled by 1/4 as its public code does). ``EPS`` (1e-5, the public code's)
keeps log finite at a = 0 or 1 and the count of an empty group non-zero.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def affinity_loss(affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
                  neg: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, its three parts as floats) for affinities and 0/1 labels of the same shape."""
    log_same = torch.log(affinity + EPS)
    log_diff = torch.log(1.0 + EPS - affinity)
    bg = -(bg_pos * log_same).sum() / (bg_pos.sum() + EPS)
    fg = -(fg_pos * log_same).sum() / (fg_pos.sum() + EPS)
    negative = -(neg * log_diff).sum() / (neg.sum() + EPS)
    loss = bg / 4 + fg / 4 + negative / 2
    parts = {"bg_loss": bg.item(), "fg_loss": fg.item(), "neg_loss": negative.item()}
    return loss, parts
