"""The study file's ``cdds:`` section (METHODS.md "CDDS"; defaults in CDDS 1 and 5, the rest ours)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainables.config import ModelConfig, Section
from trainables.errors import ConfigError


class CddsConfig(Section):
    """Every CDDS knob. Loss weights: ``L = α_s L_s + α_m L_m + α_f L_f + (1 − α_f) L_x`` (paper Eq. 15)."""

    # Dual-path UNet (CDDS 1)
    unet_depth: int = Field(2, ge=1, le=6)  # encoder levels = levels per decoder
    num_heads: int = Field(8, ge=1, le=64)  # attention heads of every UNet layer; must divide embed_dim
    noise_groups: int = Field(4, ge=1, le=64)  # z noisy copies of the encoder output (training only)
    noise_std: float = Field(0.1, ge=0, le=10)  # σ of that noise, in token-feature units
    # Related-semantics identification (CDDS 2)
    threshold_alpha: float = Field(1.0, ge=-3, le=10)  # initial α: κ_i = mean_j P + α std_j P
    threshold_learnable: bool = True  # α is one nn.Parameter per column and side
    column_temperature: float = Field(1.0, gt=0, le=100)  # τ_c of the column softmax
    mask_temperature: float = Field(0.5, gt=0, le=100)  # T of the soft threshold
    mask_scale: Literal["std", "raw"] = "std"  # std: T in units of std_j P(j|i); raw: literal T
    # Losses (CDDS 4, 5)
    alpha_s: float = Field(1.0, ge=0, le=100)
    alpha_m: float = Field(0.1, ge=0, le=100)
    alpha_f: float = Field(0.5, ge=0, le=1)  # L_f weight; L_x gets 1 − alpha_f
    semantic_loss: Literal["cross", "self"] = "cross"  # cross: V^s↔T^x, V^x↔T^s; self: V^s↔V^x, T^s↔T^x
    # Ablation switches (paper Table 3)
    decouple: bool = True  # False: no UNet; V, T themselves are the semantic components
    use_modality_loss: bool = True  # L_m
    use_completeness: bool = True  # L_f and L_x
    use_noise: bool = True  # Gaussian noise groups in the UNet
    use_sampling: bool = True  # False: L_s aligns pooled V^s, T^s directly; no V^x, T^x, L_x

    def has_modality_path(self) -> bool:
        """The modality decoder exists only if a term reads V^m (else it would never learn)."""
        return self.decouple and (self.use_modality_loss or self.use_completeness)

    def check_model(self, model: ModelConfig) -> None:
        """Cross-section check the section alone cannot do; raises a one-line ConfigError."""
        if self.decouple and model.embed_dim % self.num_heads:
            raise ConfigError(f"cdds.num_heads: {self.num_heads} does not divide model.embed_dim "
                              f"{model.embed_dim}; choose a divisor of embed_dim")
