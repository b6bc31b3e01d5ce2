"""Affinity labels of AffinityNet (Ahn & Kwak, CVPR 2018, Sec. 3.2) from confident regions.

A confident label map holds a class id where the class-probability maps are sure of it and
``IGNORE`` elsewhere. Two cells within ``radius`` of each other form a pair; a pair is
*positive* when both cells carry the same class (split into background pairs and foreground
pairs, which the loss balances separately), *negative* when they carry different classes, and
unlabelled when either cell is ignored. AffinityNet's public code (jiwoon-ahn/psa) uses radius 5
at stride 8.

Confident regions follow PSA's two background strengths: a map whose background score is
strengthened (PSA's low alpha) keeps only sure foreground, one whose background is weakened
(PSA's high alpha) keeps only sure background; what lies between is ignored. PSA's background
score is ``(1 - max_c CAM_c) ** alpha``; our stages give calibrated probabilities with their own
background channel, so the background probability itself is raised to ``alpha``
(:func:`background_scaled`), which is PSA's score exactly when an image has one foreground
class (then p_bg = 1 - p_c).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) to the neighbours within Euclidean distance < ``radius``, each unordered
    pair once: the half plane dy > 0, plus dy == 0 with dx > 0 (radius 5: 34 offsets)."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    return offsets


def shifted(values: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = values[y + dy, x + dx]``, ``fill`` where that lies outside the map."""
    height, width = values.shape[-2:]
    out = np.full_like(values, fill)
    ys, xs = slice(max(0, -dy), min(height, height - dy)), slice(max(0, -dx), min(width, width - dx))
    yt, xt = slice(max(0, dy), min(height, height + dy)), slice(max(0, dx), min(width, width + dx))
    out[..., ys, xs] = values[..., yt, xt]
    return out


def affinity_labels(labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bg_pos, fg_pos, neg), each float32 K x h x w for the K offsets of :func:`neighbour_offsets`:
    entry [k, y, x] describes the pair (y, x) -- (y + dy_k, x + dx_k). A pair leaving the map, or
    touching an ignored cell, is 0 in all three."""
    labels = np.asarray(labels)
    planes = []
    for dy, dx in neighbour_offsets(radius):
        other = shifted(labels, dy, dx, IGNORE)
        valid = (labels != IGNORE) & (other != IGNORE)
        same = valid & (labels == other)
        planes.append((same & (labels == 0), same & (labels != 0), valid & (labels != other)))
    bg, fg, neg = (np.stack(group).astype(np.float32) for group in zip(*planes))
    return bg, fg, neg


def background_scaled(probs: np.ndarray, alpha: float) -> np.ndarray:
    """C x H x W scores with the background (channel 0) raised to ``alpha`` (PSA's alpha)."""
    scores = np.array(probs, dtype=np.float32, copy=True)
    scores[0] = scores[0] ** alpha
    return scores


def confident_labels(probs: np.ndarray, alpha_fg: float, alpha_bg: float) -> np.ndarray:
    """H x W uint8: the foreground class where it wins even against the background raised to
    ``alpha_fg`` (stronger background), 0 where the background wins even when raised to
    ``alpha_bg`` (weaker background), IGNORE between (PSA's la / ha maps)."""
    fg_map = background_scaled(probs, alpha_fg).argmax(axis=0)
    bg_map = background_scaled(probs, alpha_bg).argmax(axis=0)
    labels = np.where(fg_map > 0, fg_map, IGNORE)
    labels[bg_map == 0] = 0
    return labels.astype(np.uint8)


def pool_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Labels of an H x W map (multiples of ``stride``) on the stride grid: each cell's most
    frequent value, IGNORE counted as a value (smallest value on ties). AffinityNet's labels live
    at its feature stride 8."""
    height, width = labels.shape
    if height % stride or width % stride:
        raise ValueError(f"label map {height}x{width} is not a multiple of {stride}")
    cells = labels.reshape(height // stride, stride, width // stride, stride).transpose(0, 2, 1, 3)
    flat = cells.reshape(-1, stride * stride).astype(np.int64)
    counts = np.zeros((flat.shape[0], IGNORE + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(flat.shape[0]), flat.shape[1]), flat.ravel()), 1)
    return counts.argmax(axis=1).astype(np.uint8).reshape(height // stride, width // stride)
