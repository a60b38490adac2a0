"""Image and text encoders that map tokens to the joint space [.., d] (before pooling)."""

from __future__ import annotations

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
    """Hugging Face BERT-family encoder + linear: token ids [B, L] -> word embeddings [B, L, d]."""

    def __init__(self, name: str, embed_dim: int, freeze: bool = False):
        super().__init__()
        self.backbone = load_text_model(name)
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim)
        if freeze:
            self.backbone.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden)
