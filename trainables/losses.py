"""Base alignment losses shared by every method (METHODS.md "Shared base"). Pure functions of tensors.

``sims[i, j]`` is the score of image i against caption j for a batch of B matched pairs (diagonal =
positives). ``same_image[i, j]`` is True where caption j also describes image i: such pairs are never
negatives (VSE∞ masks them by image id).
"""

from __future__ import annotations

import torch
from torch import Tensor


def same_image_mask(image_ids: Tensor) -> Tensor:
    """[B] image ids -> [B, B] bool, True where row and column share an image (diagonal included)."""
    return image_ids.unsqueeze(0) == image_ids.unsqueeze(1)


def hinge_triplet(sims: Tensor, same_image: Tensor, margin: float = 0.2, hardest: bool = True) -> Tensor:
    """Bidirectional hinge triplet loss (VSE++), summed over the batch.

    ``hardest=True`` keeps only the hardest negative per query ("max violation");
    ``hardest=False`` sums every negative (the warm-up form).
    Returns a scalar.
    """
    positives = sims.diagonal()
    cost_txt = (margin + sims - positives.unsqueeze(1)).clamp_min(0)  # image i vs. negative captions j
    cost_img = (margin + sims - positives.unsqueeze(0)).clamp_min(0)  # caption j vs. negative images i
    cost_txt = cost_txt.masked_fill(same_image, 0.0)
    cost_img = cost_img.masked_fill(same_image, 0.0)
    if hardest:
        return cost_txt.amax(1).sum() + cost_img.amax(0).sum()
    return cost_txt.sum() + cost_img.sum()


def infonce(sims: Tensor, same_image: Tensor, temperature: Tensor | float) -> Tensor:
    """Symmetric InfoNCE on ``sims / temperature``; other captions of the same image are left out of
    the denominators rather than treated as negatives. Returns the mean over both directions."""
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    logits = (sims / temperature).masked_fill(same_image & ~eye, float("-inf"))
    targets = torch.arange(sims.shape[0], device=sims.device)
    i2t = torch.nn.functional.cross_entropy(logits, targets)
    t2i = torch.nn.functional.cross_entropy(logits.t(), targets)
    return (i2t + t2i) / 2
