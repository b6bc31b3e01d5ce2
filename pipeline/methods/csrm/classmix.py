"""ClassMix (Olsson et al. 2021), CSRM's strong augmentation (paper 004 Sec. 3.2.4 and Sec. 4).

With probability p per image (0.5), image i receives a partner j != i drawn at random and the
pixels of half of the foreground classes (at least one) of j's teacher prediction are pasted onto
it: mixed_i = M_j * x_j + (1 - M_j) * x_i. The same masks and partners mix the teacher's
predictions (``mix``), so image and target stay aligned. Without a partner or a foreground class,
image i stays as it is.
"""

from __future__ import annotations

import torch


def classmix_masks(teacher_labels: torch.Tensor, probability: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks B x H x W bool: the pixels image i takes from its partner; partners B long).
    ``teacher_labels`` B x H x W class ids of the un-augmented batch (0 = background)."""
    batch = teacher_labels.shape[0]
    masks = torch.zeros_like(teacher_labels, dtype=torch.bool)
    partners = torch.arange(batch)
    for i in range(batch):
        if batch < 2 or float(torch.rand((), generator=generator)) >= probability:
            continue
        j = int(torch.randint(batch - 1, (), generator=generator))
        j += int(j >= i)  # any image but i
        classes = teacher_labels[j].unique()
        classes = classes[classes != 0].cpu()
        if len(classes) == 0:
            continue
        chosen = classes[torch.randperm(len(classes), generator=generator)[: max(len(classes) // 2, 1)]]
        masks[i] = torch.isin(teacher_labels[j], chosen.to(teacher_labels.device))
        partners[i] = j
    return masks, partners.to(teacher_labels.device)


def mix(tensors: torch.Tensor, masks: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """B x ... x H x W tensors mixed: the masked pixels from the partner. Works for images (B x 3 x H x W),
    probabilities (B x K x H x W) and label maps (B x H x W) alike."""
    mask = masks.reshape(masks.shape[0], *([1] * (tensors.dim() - masks.dim())), *masks.shape[1:])
    return torch.where(mask, tensors[partners], tensors)
