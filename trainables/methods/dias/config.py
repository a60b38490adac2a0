"""The study file's ``dias:`` section (METHODS.md "DIAS")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from trainables.config import Section


class DiasConfig(Section):
    """The study file's ``dias:`` section. Defaults: METHODS.md "DIAS" 5 (unverified) and our choices."""

    lambda_dim: float = Field(10.0, ge=0)
    lambda_inter: float = Field(0.05, ge=0)
    lambda_intra: float = Field(0.1, ge=0)
    use_dim: bool = True
    use_inter: bool = True
    use_intra: bool = True
    use_sparse: bool = True  # False = the "w/o sparse" ablation: every unmatched pair counts
    sparsity_k: float = Field(1.0, ge=0, le=5)  # threshold μ_i + kσ_i, in row standard deviations
    sparsity_learnable: bool = True  # k is an nn.Parameter (soft mode only: a hard mask has no gradient)
    sparsity_mode: Literal["soft", "hard"] = "soft"
    mask_temperature: float = Field(0.05, gt=0, le=10)  # T of the soft mask, in similarity units
    dim_loss: Literal["barlow", "diag_share", "dim_infonce"] = "barlow"
    lambda_offdiag: float = Field(5.0e-3, ge=0)  # barlow only (Barlow Twins' value)
    dim_temperature: float = Field(0.1, gt=0, le=10)  # dim_infonce only
    attn_temperature: float = Field(0.1, gt=0, le=10)  # τ_a of the region-word attention
    dim_max_rows: PositiveInt | None = 1024  # cap on the rows of M_V, M_T (cost); None = all tokens

    def learns_k(self) -> bool:
        """k is trained only when a soft mask actually weights a term it can receive gradient from."""
        spatial = self.use_inter or self.use_intra
        return self.sparsity_learnable and self.use_sparse and self.sparsity_mode == "soft" and spatial
