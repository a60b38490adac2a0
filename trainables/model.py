"""The base image-text matching model every method builds on (METHODS.md "Shared base")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import ModelConfig, TrainConfig
from trainables.encoders import ImageEncoder, TextEncoder
from trainables.losses import hinge_triplet, infonce, same_image_mask
from trainables.pooling import build_pooling
from trainables.precision import full_precision, upcast


@dataclass
class LossOutput:
    """What a method's ``loss_terms`` returns; the loop forms ``sum(weights[k] * terms[k])``.

    ``stats`` are detached 0-dim tensors on the batch's device (python floats are still accepted):
    the loop sums them on the device and reads them once per epoch, so a method never syncs the
    host for a diagnostic.
    """

    terms: dict[str, Tensor]
    weights: dict[str, float] = field(default_factory=dict)  # missing key = weight 1
    stats: dict[str, Tensor | float] = field(default_factory=dict)  # detached diagnostics, logged per epoch

    def total(self) -> Tensor:
        return sum(self.weights.get(name, 1.0) * value for name, value in self.terms.items())


class AlignmentLoss(nn.Module):
    """``L_align``: hinge triplet (all negatives during warm-up, then hardest) or InfoNCE with a
    learnable temperature. Holds the only state (the temperature); the maths is in ``losses``."""

    def __init__(self, kind: str = "triplet", margin: float = 0.2, warmup_epochs: int = 1):
        super().__init__()
        self.kind, self.margin, self.warmup_epochs = kind, margin, warmup_epochs
        if kind == "infonce":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(0.05)))

    @classmethod
    def from_config(cls, train: TrainConfig) -> "AlignmentLoss":
        return cls(train.loss, train.margin, train.warmup_epochs)

    def forward(self, sims: Tensor, image_ids: Tensor, epoch: int) -> Tensor:
        same = same_image_mask(image_ids)
        if self.kind == "infonce":
            return infonce(sims, same, self.log_temperature.exp().clamp_min(1e-3))
        return hinge_triplet(sims, same, self.margin, hardest=epoch >= self.warmup_epochs)


class ITMModel(nn.Module):
    """Image encoder + text encoder + pooling; retrieval scores are cosines of pooled embeddings.

    Methods subclass it and override ``forward`` / ``loss_terms`` (see docs/architecture.md).
    """

    def __init__(self, image_dim: int, model: ModelConfig, train: TrainConfig):
        super().__init__()
        self.image_encoder = ImageEncoder(image_dim, model.embed_dim)
        self.text_encoder = TextEncoder(model.text_encoder, model.embed_dim, freeze=model.freeze_text)
        self.image_pool = build_pooling(model.pooling)
        self.text_pool = build_pooling(model.pooling)
        self.align = AlignmentLoss.from_config(train)

    def encode_image(self, images: Tensor, region_mask: Tensor) -> dict[str, Tensor]:
        """images [B, R, D_img], region_mask [B, R] -> tokens [B, R, d], mask, emb [B, d] (unit norm)."""
        tokens = self.image_encoder(images)
        return {"tokens": tokens, "mask": region_mask, "emb": F.normalize(self.image_pool(tokens, region_mask), dim=-1)}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """input_ids, attention_mask [B, L] -> tokens [B, L, d], mask (bool), emb [B, d] (unit norm).

        With a frozen encoder ``input_ids`` may instead be its cached hidden states [B, L, H] float
        (``trainables/data/text_cache.py``); ``TextEncoder`` then skips the backbone."""
        tokens = self.text_encoder(input_ids, attention_mask)
        mask = attention_mask.bool()
        return {"tokens": tokens, "mask": mask, "emb": F.normalize(self.text_pool(tokens, mask), dim=-1)}

    def similarity(self, img_emb: Tensor, txt_emb: Tensor) -> Tensor:
        """[N, d] x [M, d] -> [N, M] retrieval scores, in float32 even under autocast: bf16 cosines
        are quantised to ~0.004 (``trainables/precision.py``), and [N, M] is cheap next to the encoders."""
        with full_precision(img_emb.device):
            return upcast(img_emb) @ upcast(txt_emb).t()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        img = self.encode_image(batch["images"], batch["region_mask"])
        txt = self.encode_text(batch["input_ids"], batch["attention_mask"])
        return {"img_emb": img["emb"], "txt_emb": txt["emb"], "img_tokens": img["tokens"],
                "img_mask": img["mask"], "txt_tokens": txt["tokens"], "txt_mask": txt["mask"]}

    def loss_terms(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> LossOutput:
        sims = self.similarity(out["img_emb"], out["txt_emb"])
        return LossOutput(terms={"align": self.align(sims, image_ids, epoch)})

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoders every loss term of every method reaches: the term budget is measured on these."""
        return [p for module in (self.image_encoder, self.text_encoder) for p in module.parameters()
                if p.requires_grad]

    def param_groups(self, lr: float, text_lr_scale: float) -> list[dict]:
        """The pretrained text backbone learns at ``lr * text_lr_scale``; everything else at ``lr``.
        Scalars (temperatures, learnable thresholds, mixing weights) are exempt from weight decay,
        which would otherwise pull them towards 0 regardless of the loss."""
        backbone = [p for p in self.text_encoder.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": [p for p in rest if p.ndim > 0], "lr": lr, "name": "main"},
                {"params": [p for p in rest if p.ndim == 0], "lr": lr, "name": "scalars", "weight_decay": 0.0},
                {"params": backbone, "lr": lr * text_lr_scale, "name": "text_backbone"}]
