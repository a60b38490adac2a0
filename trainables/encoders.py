"""Image and text encoders that map tokens to the joint space [.., d] (before pooling)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.text_models import load_text_model


class ImageEncoder(nn.Module):
    """Precomputed region features [B, R, D_img] -> region embeddings [B, R, d].

    ``fc`` plus a residual 2-layer MLP on the raw features, as in VSE∞'s precomp encoder.
    """

    def __init__(self, image_dim: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(image_dim, embed_dim)
        hidden = max(embed_dim // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(image_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, embed_dim))

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(images) + self.mlp(images)


class TextEncoder(nn.Module):
    """Hugging Face BERT-family encoder + linear: token ids [B, L] -> word embeddings [B, L, d].

    Frozen (``freeze``), the backbone is a fixed feature extractor: it stays in eval mode whatever
    ``train()`` says (no dropout, so a caption always gets the same features) and runs without
    autograd. Its outputs may then come precomputed (``trainables/data/text_cache.py``): a float
    ``[B, L, H]`` tensor of hidden states in place of the int64 token ids goes straight to ``proj``.
    """

    def __init__(self, name: str, embed_dim: int, freeze: bool = False):
        super().__init__()
        self.backbone = load_text_model(name)
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim)
        self.frozen = freeze
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B, L] int64 (or cached hidden states [B, L, H] float), attention_mask [B, L]
        -> word embeddings [B, L, d]."""
        if input_ids.is_floating_point():
            if not self.frozen:
                raise ValueError("cached text features need a frozen text encoder (model.freeze_text: true)")
            return self.proj(input_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden)
