"""``method: dias`` — Dimension Information Alignment and Sparse spatial constraint (METHODS.md "DIAS").

Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial Constraint
for Image-Text Matching", ACM MM 2024. The total is
``L = L_loc + λ_dim L_dim + λ_inter L_inter + λ_intra L_intra``; the terms are the pure functions in
``trainables/dias_losses.py``. Retrieval is unchanged from the base model: ``encode_image`` /
``encode_text`` pool each modality's own tokens, so 5K images and 25K captions are encoded apart.
The region-word interaction exists only on the training path, where it feeds L_dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from trainables import dias_losses as dl
from trainables.config import JobConfig, ModelConfig, Section, TrainConfig
from trainables.losses import same_image_mask
from trainables.methods import Ablation, MethodSpec
from trainables.model import ITMModel, LossOutput


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


class DiasModel(ITMModel):
    """The base model plus DIAS's training-time terms. ``forward`` adds, when L_dim is on,
    ``dim_img`` / ``dim_txt`` [2N, d] (the token-aligned rows ``M_V``, ``M_T``)."""

    def __init__(self, image_dim: int, model: ModelConfig, train: TrainConfig, params: DiasConfig):
        super().__init__(image_dim, model, train)
        self.params = params
        k = torch.tensor(float(params.sparsity_k))
        if params.learns_k():
            self.sparsity_k = nn.Parameter(k)
        else:
            self.register_buffer("sparsity_k", k)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().forward(batch)
        if self.params.use_dim:
            regions, region_mask = out["img_tokens"], out["img_mask"]
            words, word_mask = out["txt_tokens"], out["txt_mask"]
            words_for_regions, regions_for_words = dl.cross_attend(
                regions, region_mask, words, word_mask, self.params.attn_temperature)
            out["dim_img"], out["dim_txt"] = dl.dim_alignment_rows(
                regions, region_mask, words, word_mask, words_for_regions, regions_for_words,
                self.params.dim_max_rows)
        return out

    def correlation(self, out: dict[str, Tensor]) -> Tensor:
        """C [d, d] of the rows ``dim_img``, ``dim_txt`` in float32.

        bf16 autocast (CUDA) would wreck the raw-moment form E[xy] − E[x]E[y], which cancels; the
        context manager is a no-op where autocast is off (CPU, fp32 runs).
        """
        m_v, m_t = out["dim_img"], out["dim_txt"]
        with torch.autocast(m_v.device.type, enabled=False):
            return dl.cross_correlation(m_v.float(), m_t.float())

    def dim_term(self, corr: Tensor) -> Tensor:
        """L_dim in the configured variant; corr [d, d] -> scalar."""
        p = self.params
        if p.dim_loss == "barlow":
            return dl.barlow_dim_loss(corr, p.lambda_offdiag)
        if p.dim_loss == "diag_share":
            return dl.diag_share_dim_loss(corr)
        return dl.infonce_dim_loss(corr, p.dim_temperature)

    def pair_weights(self, sims: Tensor, image_ids: Tensor) -> Tensor:
        """Weights m_ij [B, B] of the unmatched pairs in L_inter / L_intra.

        Unmatched = i ≠ j and not the same image. The relation strength is detached: the mask
        selects pairs, it is not something the embeddings should be trained to move.
        """
        unmatched = ~same_image_mask(image_ids)
        if not self.params.use_sparse:
            return unmatched.to(sims.dtype)
        r = dl.relation_strength(sims.detach())
        return dl.sparse_mask(r, unmatched, self.sparsity_k, self.params.mask_temperature,
                              hard=self.params.sparsity_mode == "hard")

    def loss_terms(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> LossOutput:
        p = self.params
        img, txt = out["img_emb"], out["txt_emb"]
        sims = self.similarity(img, txt)
        terms = {"loc": self.align(sims, image_ids, epoch)}
        stats = {"sparsity_k": float(self.sparsity_k.detach())}
        if p.use_dim:
            corr = self.correlation(out)
            terms["dim"] = self.dim_term(corr)
            stats["dim_corr_diag"] = float(corr.diagonal().mean().detach())
        if p.use_inter or p.use_intra:
            weight = self.pair_weights(sims, image_ids)
            unmatched = ~same_image_mask(image_ids)
            stats["mask_density"] = float(weight.detach().sum() / unmatched.sum().clamp_min(1))
            if p.use_inter:
                terms["inter"] = dl.spatial_loss(dl.inter_delta(img, txt), weight)
            if p.use_intra:
                terms["intra"] = dl.spatial_loss(dl.intra_delta(img, txt), weight)
        weights = {"loc": 1.0, "dim": p.lambda_dim, "inter": p.lambda_inter, "intra": p.lambda_intra}
        return LossOutput(terms=terms, weights={name: weights[name] for name in terms}, stats=stats)


def build(job: JobConfig, image_dim: int) -> DiasModel:
    return DiasModel(image_dim, job.model, job.train, DiasConfig(**job.method_params))


SPEC = MethodSpec(
    name="dias",
    build=build,
    section=DiasConfig,
    searchable=("lambda_dim", "lambda_inter", "lambda_intra", "sparsity_k", "sparsity_mode",
                "mask_temperature", "dim_loss", "lambda_offdiag", "dim_temperature", "attn_temperature"),
    ablations=(
        Ablation("full", "dias"),
        Ablation("w/o L_dim", "dias", {"use_dim": False}),
        Ablation("w/o L_inter", "dias", {"use_inter": False}),
        Ablation("w/o L_intra", "dias", {"use_intra": False}),
        Ablation("w/o sparse", "dias", {"use_sparse": False}),
        Ablation("w/o spatial", "dias", {"use_inter": False, "use_intra": False}),
        Ablation("base", "base"),
    ),
    description="DIAS (ACM MM 2024): L_loc + dimension alignment L_dim + sparse inter/intra spatial constraints",
)
