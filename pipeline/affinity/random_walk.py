"""Random walk with AffinityNet's transition matrix (Ahn & Kwak, CVPR 2018, Sec. 3.3, Eqs. 7-8).

The affinities of every cell with its neighbours within the radius (and 1 with itself) form a
symmetric matrix A on the N cells of the stride-8 grid; the transition matrix is
T = D^-1 A^{∘β} (A raised element-wise to β, rows normalised by their sums D, so T is
row-stochastic) and the refined score of each class is T^t · vec(score). t = 2^log_t is reached
by log_t squarings of T, as the public code does (β 8, log_t 8: t = 256 steps).
"""

from __future__ import annotations

import torch

from pipeline.affinity.labels import neighbour_offsets


def affinity_matrix(pair_affinity: torch.Tensor, radius: int) -> torch.Tensor:
    """N x N symmetric affinities (N = h*w, row-major cells) from K x h x w pair affinities
    (:func:`pipeline.affinity.labels.neighbour_offsets` order); 1 on the diagonal, 0 beyond the
    radius or the map."""
    _, height, width = pair_affinity.shape
    cells = height * width
    matrix = torch.eye(cells, dtype=pair_affinity.dtype, device=pair_affinity.device)
    index = torch.arange(cells, device=pair_affinity.device).view(height, width)
    for k, (dy, dx) in enumerate(neighbour_offsets(radius)):
        y0, y1 = 0, height - dy
        x0, x1 = max(0, -dx), min(width, width - dx)
        if y1 <= y0 or x1 <= x0:
            continue
        source = index[y0:y1, x0:x1].reshape(-1)
        target = index[y0 + dy:y1 + dy, x0 + dx:x1 + dx].reshape(-1)
        values = pair_affinity[k, y0:y1, x0:x1].reshape(-1)
        matrix[source, target] = values
        matrix[target, source] = values
    return matrix


def transition_matrix(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """T = D^-1 A^{∘β}: row-stochastic (every row sums to 1)."""
    powered = affinity.pow(beta)
    return powered / powered.sum(dim=1, keepdim=True)


def random_walk(scores: torch.Tensor, transition: torch.Tensor, log_t: int) -> torch.Tensor:
    """C x N scores after t = 2^log_t steps: each class vector v becomes T^t v."""
    power = transition
    for _ in range(log_t):
        power = power @ power
    return (power @ scores.T).T


def refine_scores(scores: torch.Tensor, pair_affinity: torch.Tensor, radius: int, beta: float,
                  log_t: int) -> torch.Tensor:
    """C x h x w class scores on the affinity grid, propagated by the random walk."""
    channels, height, width = scores.shape
    transition = transition_matrix(affinity_matrix(pair_affinity, radius), beta)
    return random_walk(scores.reshape(channels, -1), transition, log_t).reshape(channels, height, width)
