"""The losses of RCM+MAM (paper 003), one function per equation.

Shapes: B images, N foreground classes (index k of a CAM = foreground class k+1), K = N + 1
region classes (index 0 = background), D feature channels, S scales, H x W the input size.
``labels`` is the B x N multi-hot foreground vector t.

Sums over pixels in eqs. 5 and 8 are taken as means over the pixels (the printed sums divided
by the pixel count, a constant), so the losses do not grow with the crop size and lambda = 1
balances them against the classification loss as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def region_masks(fused_cams: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class region masks M^k (eq. 1) and the background mask M^0 (eq. 2): B x K x H x W, 0/1.

    Eq. 1: M^k_p = 1 where k is the argmax of the SupportNet's msinf-CAM over the image's own
    classes ("obtained only for the existing classes in image-level GT") and A^k_p > threshold
    (0.20). Eq. 2: M^0_p = 1 where no foreground mask is set, i.e. where every present class is
    at or below the threshold. Each pixel belongs to exactly one of the K masks.
    """
    present = labels.to(fused_cams.dtype)[:, :, None, None]
    cams = fused_cams * present
    peak, winner = cams.max(dim=1)
    region = torch.where(peak > threshold, winner + 1, torch.zeros_like(winner))
    return F.one_hot(region, labels.shape[1] + 1).permute(0, 3, 1, 2).to(fused_cams.dtype)


def class_prototype_sums(masks: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 per image, summed over the batch: (K x D sums of per-image prototypes, K counts).

    pt^k of one image is the mean of the SupportNet features X^G over M^k (the printed
    sum_p M^k_p X^G_p is called an average in the text, so it is divided by sum_p M^k_p). The
    count of class k is the number of images whose M^k is not empty. Sums and counts (not the
    mean) are returned so that data-parallel processes can add theirs before dividing.
    """
    masks, features = masks.float(), features.float()
    area = masks.sum(dim=(2, 3))  # B x K
    totals = torch.einsum("bkhw,bdhw->bkd", masks, features)
    per_image = totals / area.clamp(min=1.0)[..., None]
    return per_image.sum(dim=0), (area > 0).float().sum(dim=0)


def mean_prototypes(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """pt-bar^k: the prototypes averaged over the images holding class k (zero where none)."""
    return sums / counts.clamp(min=1.0)[:, None]


class PrototypeMemory:
    """The latest non-empty batch prototype of every region class (paper 003 Sec. 4.2).

    ``prototypes`` K x D, ``filled`` K (bool): a class never seen yet has no prototype and is
    left out of eq. 5's denominator.
    """

    def __init__(self, num_regions: int, dim: int) -> None:
        self.prototypes = torch.zeros(num_regions, dim)
        self.filled = torch.zeros(num_regions, dtype=torch.bool)

    @torch.no_grad()
    def update(self, prototypes: torch.Tensor, present: torch.Tensor) -> None:
        """Replace the prototypes of the ``present`` classes (K bool) by ``prototypes`` (K x D)."""
        self.prototypes = torch.where(present[:, None], prototypes.detach().float(),
                                      self.prototypes.to(prototypes.device))
        self.filled = self.filled.to(present.device) | present

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["prototypes"].shape != self.prototypes.shape:
            raise ValueError(f"prototype memory of shape {tuple(state['prototypes'].shape)}, "
                             f"expected {tuple(self.prototypes.shape)}")
        self.prototypes = state["prototypes"].float().clone()
        self.filled = state["filled"].bool().clone()


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """log sim(X_p, pt^k / T) of eq. 4 = (x_p . pt^k) / T after L2-normalising both: B x K x H x W."""
    x = F.normalize(features.float(), dim=1)
    pt = F.normalize(prototypes.float(), dim=1)
    return torch.einsum("bdhw,kd->bkhw", x, pt) / temperature


def rcm_loss(features: torch.Tensor, masks: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """L_RCM = sum_k L_RCM^k (eqs. 4-5), with T = 0.5, as InfoNCE.

    Eq. 5 as printed is -sum_p M^k_p sim(X_p, pt^k/T) / sum_w sim(X_p, pt^w/T), without a log;
    the text bases it on mutual-information maximisation (InfoNCE, van den Oord et al.), so the
    ratio is taken under -log:
        L_RCM = -(1/P) sum_k sum_p M^k_p log( exp(x_p.pt^k/T) / sum_{w filled} exp(x_p.pt^w/T) )
    with x_p the MainNet features (B x D x H x W), ``masks`` B x K x H x W (``region_masks``),
    ``prototypes`` K x D and ``filled`` K (``PrototypeMemory``), P = B*H*W pixels.
    """
    logits = prototype_logits(features, prototypes, temperature)
    logits = logits.masked_fill(~filled.to(logits.device)[None, :, None, None], float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    chosen = torch.where(masks > 0, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -chosen.mean()


def cam_cosine_distance(cams_main: torch.Tensor, cams_support: torch.Tensor) -> torch.Tensor:
    """xi^k_{i:j} = 2 - cos(A_i^{F,k}, A_j^{G,k}) over vectorised CAMs (eq. 6): B x N x S x S.

    Inputs are S x B x N x H x W (scale first).
    """
    main = F.normalize(cams_main.float().flatten(3), dim=-1)
    support = F.normalize(cams_support.float().flatten(3), dim=-1)
    return 2.0 - torch.einsum("ibnp,jbnp->bnij", main, support)


def mam_targets(xi: torch.Tensor, cams_support: torch.Tensor) -> torch.Tensor:
    """A-hat_i^{G,k} = (1/3) sum_j xi^k_{i:j} A_j^{G,k} (eq. 7): S x B x N x H x W.

    The paper's 1/3 is 1/S for its S = 3 scales.
    """
    return torch.einsum("bnij,jbnhw->ibnhw", xi, cams_support.float()) / cams_support.shape[0]


def mam_loss(cams_main: torch.Tensor, cams_support: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MAM = sum_k sum_i || A-hat_i^{G,k} - A_i^{F,k} ||_1 (eq. 8), mean over the images.

    Only the image's own classes count; the target (xi included) is a stop-gradient, so only the
    MainNet CAMs ``cams_main`` (S x B x N x H x W) receive gradients. The L1 norm over pixels is
    taken as a mean over pixels.
    """
    with torch.no_grad():
        targets = mam_targets(cam_cosine_distance(cams_main, cams_support), cams_support)
    per_map = (targets - cams_main.float()).abs().mean(dim=(-2, -1))  # S x B x N
    return (per_map * labels.float()[None]).sum(dim=(0, 2)).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls of eq. 9: BCE between sigmoid(GAP of the CAMs) (B x N logits) and t, as the
    multi-label soft-margin loss of the PSA / SEAM codebases (mean over classes and images)."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


@dataclass(frozen=True)
class LossWeights:
    cls: float
    rcm: float
    mam: float


def loss_weights(epoch: int, mam_start_epoch: int = 6, cls: float = 1.0, rcm: float = 1.0,
                 mam: float = 1.0) -> LossWeights:
    """(lambda_1, lambda_2, lambda_3) of eq. 9 at ``epoch`` (counted from 0).

    Paper 003 Sec. 4.2: lambda_1 = lambda_2 = 1 throughout; lambda_3 = 0 until the RCM has
    fixed the imprecision ("epoch 6"), then 1: the first ``mam_start_epoch`` epochs run
    without MAM.
    """
    return LossWeights(cls=cls, rcm=rcm, mam=mam if epoch >= mam_start_epoch else 0.0)
