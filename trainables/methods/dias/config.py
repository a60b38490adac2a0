"""The study file's ``dias:`` section (METHODS.md "DIAS")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from trainables.config import Section


class DiasConfig(Section):
    """The study file's ``dias:`` section. Weights set by the term budget (docs/methods.md "DIAS",
    "Term budget"); every term is in L_align's units (per pair, times B for the summed triplet)."""

    lambda_dim: float = Field(1.0, ge=0)
    lambda_inter: float = Field(20.0, ge=0)
    lambda_intra: float = Field(2.0, ge=0)
    use_dim: bool = True
    use_inter: bool = True
    use_intra: bool = True
    use_sparse: bool = True  # False = the "w/o sparse" ablation: every unmatched pair counts
    # relation: keep pairs whose relation strength is high (ours); violation: keep pairs whose Δ is
    # high (the public reimplementation's rule, hard mask, summed over kept pairs).
    sparse_on: Literal["relation", "violation"] = "relation"
    sparsity_k: float = Field(1.0, ge=0, le=10)  # threshold μ + kσ, in standard deviations
    sparsity_k_max: float = Field(5.0, gt=0, le=10)  # a learnable k is k_max·sigmoid(θ), inside [0, k_max]
    sparsity_learnable: bool = True  # k is trained (relation rule and soft mask: a hard one has no gradient)
    sparsity_lr_scale: float = Field(0.1, gt=0, le=10)  # θ learns at train.lr × this
    sparsity_mode: Literal["soft", "hard"] = "soft"  # relation rule only; violation is always hard
    mask_temperature: float = Field(0.05, gt=0, le=10)  # T of the soft mask, in similarity units
    dim_loss: Literal["barlow", "diag_share", "dim_infonce", "diag_share_sum"] = "barlow"
    lambda_offdiag: float = Field(5.0e-3, ge=0)  # barlow only (Barlow Twins' value)
    dim_temperature: float = Field(0.1, gt=0, le=10)  # dim_infonce only
    attn_temperature: float = Field(0.1, gt=0, le=10)  # τ_a of the region-word attention
    dim_max_rows: PositiveInt | None = 1024  # cap on the rows of M_V, M_T (cost); None = all tokens

    @model_validator(mode="after")
    def _k_within_bound(self) -> "DiasConfig":
        if self.sparsity_k > self.sparsity_k_max:
            raise ValueError(f"sparsity_k {self.sparsity_k} exceeds sparsity_k_max {self.sparsity_k_max}")
        return self

    def learns_k(self) -> bool:
        """k is trained only when a soft mask actually weights a term it can receive gradient from."""
        spatial = self.use_inter or self.use_intra
        return (self.sparsity_learnable and self.use_sparse and self.sparse_on == "relation"
                and self.sparsity_mode == "soft" and spatial)
