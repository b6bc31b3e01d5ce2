"""L_m, CSRM's contrast of reliable and unreliable pixel representations (paper 004 Sec. 3.2.5,
eq. 13; the sampling of U2PL, Wang et al. 2022, which the paper follows).

Per class c of the K segmentation classes (background included: the bank holds |C| lists, one per
class the segmentation predicts):

- entropy groups of the teacher's pixels: *low* = entropy at most the alpha-quantile of the batch,
  *high* = at least the (1 - alpha)-quantile (alpha 0.2 -> 0, the same ramp as L_u);
- query candidates: low-entropy pixels whose CAM pseudo-label (eq. 6, reliable band only) is c and
  whose teacher probability of c exceeds 0.30; the queries are P of them drawn with replacement,
  their *student* representations (the gradient flows through the queries only);
- positive anchor: the mean *teacher* representation over the candidates (the class prototype);
- negatives: high-entropy teacher pixels where c has probability below 1% and either (a) c ranks
  within the top gamma_l classes and is not among the image's labels, or (b) gamma_l < rank < gamma_h;
  pushed into c's FIFO bank (N vectors), from which each query draws N with replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods.csrm.losses import entropy, info_nce, lower_quantile


@dataclass(frozen=True)
class ContrastSettings:
    queries: int = 50  # P (paper 004 Sec. 4, from U2PL)
    negatives: int = 256  # N, also the bank size per class
    temperature: float = 0.5  # tau
    query_threshold: float = 0.30  # "segmented with confidence higher than 30%"
    negative_threshold: float = 0.01  # "confidence lower than 1%"
    rank_low: int = 3  # gamma_l
    rank_high: int = 6  # gamma_h


class NegativeBank:
    """Per class, the last ``size`` negative anchors pushed (FIFO), as a ring buffer."""

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        self.vectors = torch.zeros(num_classes, size, dim)
        self.pushed = torch.zeros(num_classes, dtype=torch.long)  # ever pushed, per class
        self.size = size

    def to(self, device: torch.device) -> NegativeBank:
        self.vectors = self.vectors.to(device)
        return self

    def count(self, c: int) -> int:
        return min(int(self.pushed[c]), self.size)

    def push(self, c: int, vectors: torch.Tensor) -> None:
        """Append ``vectors`` (n x D, oldest first) to class c's list, dropping the oldest beyond ``size``."""
        vectors = vectors.detach()[-self.size :].to(self.vectors)
        start = int(self.pushed[c]) % self.size
        slots = (torch.arange(len(vectors)) + start) % self.size
        self.vectors[c, slots.to(self.vectors.device)] = vectors
        self.pushed[c] += len(vectors)

    def contents(self, c: int) -> torch.Tensor:
        """Class c's anchors, oldest first."""
        count = self.count(c)
        if count < self.size:
            return self.vectors[c, :count]
        start = int(self.pushed[c]) % self.size
        return torch.cat([self.vectors[c, start:], self.vectors[c, :start]])

    def sample(self, c: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """``shape`` x D anchors of class c drawn uniformly with replacement."""
        index = torch.randint(self.count(c), shape, generator=generator)
        return self.contents(c)[index.to(self.vectors.device)]

    def state_dict(self) -> dict:
        return {"vectors": self.vectors.cpu(), "pushed": self.pushed.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.vectors = state["vectors"].to(self.vectors.device)
        self.pushed = state["pushed"].clone()


def class_ranks(probs: torch.Tensor) -> torch.Tensor:
    """B x K x H x W probabilities -> the 1-based rank of every class at every pixel (1 = most probable)."""
    order = probs.argsort(dim=1, descending=True)
    return order.argsort(dim=1) + 1


def entropy_groups(entropies: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) entropy masks: at most the alpha-quantile / at least the (1 - alpha)-quantile."""
    return entropies <= lower_quantile(entropies, alpha), entropies >= lower_quantile(entropies, 1.0 - alpha)


def negative_mask(probs: torch.Tensor, ranks: torch.Tensor, image_labels: torch.Tensor, high: torch.Tensor,
                  c: int, settings: ContrastSettings) -> torch.Tensor:
    """B x H x W: the pixels that are hard negatives of class c (see the module docstring).
    ``image_labels`` B x K multi-hot (background always present)."""
    rank = ranks[:, c]
    absent = image_labels[:, c, None, None] == 0
    hard = ((rank <= settings.rank_low) & absent) | ((rank > settings.rank_low) & (rank < settings.rank_high))
    return high & (probs[:, c] < settings.negative_threshold) & hard


def contrast_loss(student_reps: torch.Tensor, teacher_reps: torch.Tensor, teacher_probs: torch.Tensor,
                  cam_labels: torch.Tensor, image_labels: torch.Tensor, alpha: float,
                  bank: NegativeBank, settings: ContrastSettings, generator: torch.Generator) -> torch.Tensor:
    """Eq. 13: the InfoNCE of each class's P queries, summed over the classes that have query
    candidates and a non-empty bank and divided by the K classes (eq. 13's 1 / (|C| P), as CSRM's
    code averages); pushes this batch's negatives into ``bank`` first. ``student_reps`` /
    ``teacher_reps`` B x D x H x W, ``teacher_probs`` B x K x H x W, ``cam_labels`` B x H x W (eq. 6's
    labels, IGNORE in the band), ``image_labels`` B x K multi-hot; all at the same H x W."""
    low, high = entropy_groups(entropy(teacher_probs), alpha)
    ranks = class_ranks(teacher_probs)
    student = student_reps.permute(0, 2, 3, 1)  # B x H x W x D
    teacher = teacher_reps.detach().permute(0, 2, 3, 1)
    with torch.no_grad():
        for c in range(teacher_probs.shape[1]):
            chosen = negative_mask(teacher_probs, ranks, image_labels, high, c, settings)
            if chosen.any():
                bank.push(c, teacher[chosen])
    losses = []
    for c in range(teacher_probs.shape[1]):
        candidates = low & (cam_labels == c) & (teacher_probs[:, c] > settings.query_threshold)
        count = int(candidates.sum())
        if count == 0 or bank.count(c) == 0:
            continue
        picks = torch.randint(count, (settings.queries,), generator=generator).to(student.device)
        queries = student[candidates][picks]
        prototype = teacher[candidates].mean(dim=0, keepdim=True).expand_as(queries)
        negatives = bank.sample(c, (settings.queries, settings.negatives), generator)
        losses.append(info_nce(queries.float(), prototype.float(), negatives.float(), settings.temperature))
    if not losses:
        return student_reps.sum() * 0.0
    return torch.stack(losses).sum() / teacher_probs.shape[1]
