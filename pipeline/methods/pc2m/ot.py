"""Optimal transport of patches to classes (paper 000 Sec. 3.2, Appendices A-B).

Every equation of the area balancing has one function here:

- eq. 3 with S = -log P  -> ``sinkhorn`` (Gibbs kernel P^(1/eps), marginals (1/N, alpha));
- eq. 5                  -> ``batch_class_marginal`` (alpha from alpha-tilde, nu_b, nu_D);
- eqs. 6-7               -> ``image_class_areas`` (q) and ``ema_update`` (alpha-tilde), from
                            ``initial_class_areas`` (alpha-tilde_0); the pass over the dataset
                            that gives q is ``method.dataset_class_area_sums``;
- App. B (eps schedule)  -> ``epsilon_at``.

All sums over patches go through a ``Reducer`` so that data-parallel processes compute the plan
of the *global* batch (a 2-process run then equals the 1-process run on the same batch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from pipeline.training.distributed import LOCAL, Reducer

log = logging.getLogger(__name__)




@torch.no_grad()
def sinkhorn(
    log_probs: torch.Tensor,
    alpha: torch.Tensor,
    epsilon: float,
    iterations: int = 3,
    reduce: Reducer = LOCAL,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transport plan of eq. 3 for N patches (rows) to |C| classes, rescaled by N (rows sum to 1).

    Cost S = -log P, so the Gibbs kernel exp(-S/eps) is P^(1/eps) (Sec. 3.2); the marginals are
    delta = 1/N over patches and ``alpha`` over classes. Sinkhorn-Knopp (paper ref. [15]) in the
    log domain (P^(1/eps) underflows for eps = 0.1). Each iteration scales the columns, then the
    rows, as POT's ``sinkhorn_knopp`` does, so the rows are exact at the end and N * Q is a soft
    pseudo-label per patch. Classes with alpha = 0 (absent from the batch) get no mass.
    ``log_probs``: N_local x C; N is the sum of N_local over processes. Stop-gradient (Alg. 1).
    ``valid`` (N_local bool, all by default): the patches transported; the others (outside the
    image) are not among the N, and their rows of the plan are 0. Masked rather than selected, so
    that no device value is read on the host.
    """
    log_kernel = log_probs.float() / epsilon
    keep = torch.ones(log_kernel.shape[0], dtype=torch.bool, device=log_kernel.device) if valid is None else valid
    total = reduce.sum(keep.sum().to(log_kernel.dtype))
    log_rows = -torch.log(total)
    log_cols = torch.log(alpha.to(log_kernel))  # -inf where alpha == 0: that column stays empty
    # log u = -inf: a left-out row adds nothing to the column sums and gets no mass.
    left_out = torch.full_like(log_kernel[:, 0], -math.inf)
    log_u = torch.where(keep, torch.zeros_like(left_out), left_out)
    log_v = torch.zeros(log_kernel.shape[1], device=log_kernel.device, dtype=log_kernel.dtype)
    for _ in range(iterations):
        log_v = log_cols - _log_column_sums(log_kernel + log_u[:, None], reduce)
        log_u = torch.where(keep, log_rows - torch.logsumexp(log_kernel + log_v[None, :], dim=1), left_out)
    return torch.exp(log_kernel + log_u[:, None] + log_v[None, :] - log_rows)


def _log_column_sums(log_values: torch.Tensor, reduce: Reducer) -> torch.Tensor:
    """log sum_i exp(log_values[i, c]) over the patches of every process, stably."""
    # One shift for every process (the global maximum), so the partial sums add up exactly.
    shift = reduce.max(log_values.max(dim=0).values)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sums = reduce.sum(torch.exp(log_values - shift).sum(dim=0))
    return torch.log(sums) + shift


def class_frequencies(label_sets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """nu_D: relative frequency of each class among the image labels (background, class 0, is in
    every image), normalised to sum 1 so that it is a distribution, as alpha-tilde_0 = nu_D must be.

    In eq. 5 only the ratio nu_b / nu_D matters (Z absorbs any common factor).
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for labels in label_sets:
        counts[0] += 1
        for label in set(labels):
            counts[label] += 1
    return counts / counts.sum().clamp_min(1.0)


def multi_hot_frequencies(targets: torch.Tensor, reduce: Reducer = LOCAL) -> torch.Tensor:
    """nu_b of eq. 5 from a B x C multi-hot target batch (over all processes), normalised."""
    counts = reduce.sum(targets.float().sum(dim=0))
    return counts / counts.sum()


def absent_classes(nu_dataset: torch.Tensor) -> list[int]:
    """Classes that no training image is labelled with (nu_D = 0)."""
    return [int(c) for c in torch.nonzero(nu_dataset <= 0).flatten()]


def batch_class_marginal(
    alpha_tilde: torch.Tensor, nu_batch: torch.Tensor, nu_dataset: torch.Tensor
) -> torch.Tensor:
    """Eq. 5: alpha = (1/Z) * alpha_tilde * nu_b / nu_D, element-wise.

    A class with nu_D = 0 never occurs in the labels, so it can never occur in a batch either
    (nu_b = 0): its area is 0 rather than 0/0. ``absent_classes`` reports such classes once.
    """
    nu_dataset = nu_dataset.to(alpha_tilde)
    ratio = torch.where(
        nu_dataset > 0, nu_batch.to(alpha_tilde) / nu_dataset.clamp_min(1e-12), torch.zeros_like(nu_dataset)
    )
    unnormalised = alpha_tilde * ratio
    return unnormalised / unnormalised.sum()


def image_class_areas(probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6: q(X) = (1/K) sum_k p(y_k = c | u_k), per image: B x C x gh x gw -> B x C.

    ``valid`` (B x gh x gw bool): the K patches that show the image; those outside it (a rotated
    view's zero-padded corners, ``augment.patches_in_source``) are left out. All by default.
    """
    if valid is None:
        return probs.float().mean(dim=(2, 3))
    weight = valid[:, None].float()
    return (probs.float() * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1.0)


def ema_update(alpha_tilde: torch.Tensor, mean_area: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 7: alpha_m = (1 - gamma) alpha_{m-1} + gamma * (1/T) sum_X q_{m-1}(X).

    ``mean_area`` is (1/T) sum_X q(X); it is renormalised as Algorithm 1 does (q / q.sum()), a
    no-op up to rounding since every q(X) is a distribution.
    """
    mean_area = mean_area.to(alpha_tilde)
    return (1.0 - gamma) * alpha_tilde + gamma * mean_area / mean_area.sum()


# App. B's readings of the eps schedule (train.epsilon_schedule) and its "for 40 epochs".
EPSILON_SCHEDULES = ("exponential", "reach_at_40", "scaled")
APP_B_RAMP_EPOCHS = 40
# How q_{m-1} of eq. 7 is estimated (train.class_area_update): Algorithm 1's offline pass over the
# dataset after each epoch, or the mean over the epoch's training (global) views.
CLASS_AREA_UPDATES = ("offline", "online")
# alpha-tilde_0 (train.alpha_init): nu_D (Sec. 3.2 text, App. A eq. after 10) or 1/|C| (Algorithm 1).
ALPHA_INITS = ("dataset_frequencies", "uniform")


def epsilon_at(epoch: int, start: float, end: float, rate: float, schedule: str = "exponential",
               epochs: int | None = None) -> float:
    """Entropy weight eps of epoch ``epoch`` (0-based) of ``epochs``, App. B.

    "eps = 0.1 ... we increase the value of eps with an exponential growth of 0.05 rate for 40
    epochs until reaching the final value of eps = 0.9". No reading satisfies all four numbers
    exactly (0.1 e^(0.05*40) = 0.74, and 0.1 * 1.05^40 = 0.70):

    - ``exponential``: eps_m = min(end, start * e^(rate * m)); keeps start, rate and end, reaches
      0.9 at epoch 44 (within VOC's 45 epochs, "40" read as approximate);
    - ``reach_at_40``: eps_m = min(end, start * (end/start)^(m/40)); keeps start, end and the 40
      epochs, its rate ln(9)/40 = 0.055 being the stated 0.05 to its one significant figure;
    - ``scaled``: the same growth stretched to meet ``end`` at the last epoch (epochs - 1).
    """
    if schedule == "exponential":
        return min(end, start * math.exp(rate * epoch))
    if schedule == "reach_at_40":
        ramp = APP_B_RAMP_EPOCHS
    elif schedule == "scaled" and epochs is not None:
        ramp = max(epochs - 1, 1)
    else:
        raise ValueError(f"epsilon schedule {schedule!r} (epochs {epochs}): one of {EPSILON_SCHEDULES}, "
                         "'scaled' with the number of epochs")
    return min(end, start * (end / start) ** (epoch / ramp))


def initial_class_areas(kind: str, nu_dataset: torch.Tensor) -> torch.Tensor:
    """alpha-tilde_0: the dataset's class frequencies nu_D (Sec. 3.2) or uniform (Algorithm 1)."""
    if kind == "dataset_frequencies":
        return nu_dataset.clone()
    if kind == "uniform":
        return torch.full_like(nu_dataset, 1.0 / nu_dataset.numel())
    raise ValueError(f"unknown alpha-tilde initialisation {kind!r}; one of {ALPHA_INITS}")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (natural log) between two distributions (App. A.1, Fig. 10)."""
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log()).sum()

    return float((kl(p, m) + kl(q, m)) / 2)
