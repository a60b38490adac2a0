"""The study file's ``cdds:`` section (METHODS.md "CDDS"; defaults in CDDS 1 and 5, the rest ours)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainables.config import ModelConfig, Section
from trainables.errors import ConfigError


class CddsConfig(Section):
    """Every CDDS knob. Loss: ``L = L_s + α_m L_m + α_f L_f + α_x L_x`` (paper Eq. 15 with α_s = 1 and
    its ``1 − α_f`` freed as α_x; docs/methods.md "CDDS" 4 says why)."""

    # Dual-path UNet (CDDS 1)
    unet_depth: int = Field(2, ge=1, le=6)  # encoder levels = levels per decoder
    num_heads: int = Field(8, ge=1, le=64)  # attention heads of every UNet layer; must divide embed_dim
    noise_groups: int = Field(4, ge=1, le=64)  # z noisy copies of the encoder output (training only)
    noise_std: float = Field(0.5, ge=0, le=10)  # σ, in units of each token's feature std (relative)
    # Related-semantics identification (CDDS 2)
    threshold_alpha: float = Field(1.0, ge=-3, le=10)  # initial α: κ_i = mean_j P + α std_j P
    threshold_learnable: bool = True  # α is one nn.Parameter per column and side
    column_temperature: float = Field(1.0, gt=0, le=100)  # τ_c of the column softmax
    kl_temperature: float = Field(1.0, gt=0, le=100)  # τ_S of P = softmax(−S/τ_S) (units: see kl_scale)
    kl_scale: Literal["std", "raw"] = "std"  # std: τ_S in units of the row's std_j S_ij; raw: literal τ_S
    mask_temperature: float = Field(0.1, gt=0, le=100)  # T of the soft threshold (→ 0: a hard gate)
    mask_scale: Literal["std", "raw"] = "std"  # std: T in units of std_j P(j|i); raw: literal T
    # Quantiles: K positions per column for the column distributions (CDDS 2) and the running
    # per-column quantiles that retrieval samples with (CDDS 5)
    quantile_positions: int = Field(64, ge=2, le=4096)
    quantile_momentum: float = Field(0.01, gt=0, le=1)  # EMA weight of a batch's quantiles (after 1/momentum)
    # Losses (CDDS 4, 5): L_s has weight 1, fixed (under Adam only the ratios matter). α_f and α_x are
    # independent (Eq. 15's α_f and 1 − α_f divided by its free α_s); 0.5 each is the paper's α_f = 0.5.
    alpha_m: float = Field(1.0, ge=0, le=1000)
    alpha_f: float = Field(0.5, ge=0, le=1000)
    alpha_x: float = Field(0.5, ge=0, le=1000)
    semantic_loss: Literal["cross", "self"] = "cross"  # cross: V^s↔T^x, V^x↔T^s; self: V^s↔V^x, T^s↔T^x
    # Ablation switches (paper Table 3; one thing per row)
    use_unet: bool = True  # False: no UNet at all; V, T themselves are the semantic components
    decouple: bool = True  # False: the UNet keeps its encoder and semantic decoder, no modality path
    use_modality_loss: bool = True  # L_m
    use_completeness: bool = True  # L_f and L_x
    use_noise: bool = True  # Gaussian noise groups in the UNet
    use_sampling: bool = True  # False: L_s aligns pooled V^s, T^s directly; no V^x, T^x, L_x

    def has_modality_path(self) -> bool:
        """The modality decoder exists only if a term reads V^m (else it would never learn)."""
        return self.use_unet and self.decouple and (self.use_modality_loss or self.use_completeness)

    def check_model(self, model: ModelConfig) -> None:
        """Cross-section check the section alone cannot do; raises a one-line ConfigError."""
        if self.use_unet and model.embed_dim % self.num_heads:
            raise ConfigError(f"cdds.num_heads: {self.num_heads} does not divide model.embed_dim "
                              f"{model.embed_dim}; choose a divisor of embed_dim")
