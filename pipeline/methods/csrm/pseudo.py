"""CSRM's pseudo-labels inside the training loop (paper 004 eqs. 6-7): the teacher's psi-normalised
CAMs, refined by the dense CRF, with the uncertainty band (delta_bg, delta_fg] ignored.

The band as CSRM's code (and IRN's ``cam_to_ir_label`` before it) draws it: the CAMs are padded
with a constant background score and argmax'd twice, once with background delta_fg and once with
delta_bg, each map refined by the CRF (labels unary, the ``psa`` preset of CSRM's base code):
a pixel is its foreground class where the delta_fg map says foreground, background where even the
delta_bg map says background, and ignored between (``IGNORE``). Without the CRF
(``in_loop_crf: false``) this is exactly eq. 6's mask on max_c psi(A)_c.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch

from pipeline.crf import CrfParams, crf_refine

IGNORE = -1

Refine = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image H x W x 3 uint8, scores K x H x W) -> labels


def argmax_labels(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """No refinement: the best-scoring channel."""
    return scores.argmax(axis=0)


def band_labels(fg_map: np.ndarray, bg_map: np.ndarray) -> np.ndarray:
    """Combine the delta_fg and delta_bg label maps (0 = background): foreground classes of the
    first, background where both say so, IGNORE where only the delta_fg map says background."""
    labels = fg_map.astype(np.int64)
    labels[(fg_map == 0) & (bg_map != 0)] = IGNORE
    return labels


def image_pseudo_labels(image: np.ndarray, cams: np.ndarray, delta_bg: float, delta_fg: float,
                        crf: CrfParams | None) -> np.ndarray:
    """H x W labels (0 background, c foreground class c, IGNORE) of one image's psi-normalised CAMs
    (C x H x W, zero for classes absent from its labels)."""
    refine = argmax_labels if crf is None else (lambda img, scores: crf_refine(img, scores, crf))
    maps = []
    for background in (delta_fg, delta_bg):
        scores = np.concatenate([np.full_like(cams[:1], background), cams])
        maps.append(refine(image, scores))
    return band_labels(*maps)


def _task(args: tuple) -> np.ndarray:
    return image_pseudo_labels(*args)


def pseudo_labels(images: torch.Tensor, cams: torch.Tensor, delta_bg: float, delta_fg: float,
                  crf: CrfParams | None, pool: Executor | None = None) -> torch.Tensor:
    """B x H x W long labels of a batch: ``images`` B x H x W x 3 uint8, ``cams`` B x C x H x W in [0, 1]
    (psi-normalised, masked by the image labels). The CRF runs on the CPU, per image in ``pool``."""
    arrays = images.cpu().numpy()
    scores = cams.detach().float().cpu().numpy()
    tasks = [(arrays[i], scores[i], delta_bg, delta_fg, crf) for i in range(len(arrays))]
    results = list(pool.map(_task, tasks)) if pool is not None else [_task(t) for t in tasks]
    return torch.from_numpy(np.stack(results)).to(cams.device)
