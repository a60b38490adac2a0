"""The DIAS model: the base model plus DIAS's training-time terms (METHODS.md "DIAS"; the maths is in
``losses.py``).

Retrieval is unchanged from the base model: ``encode_image`` / ``encode_text`` pool each modality's own
tokens, so 5K images and 25K captions are encoded apart. The region-word interaction exists only on
the training path, where it feeds L_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.config import ModelConfig, TrainConfig
from trainables.losses import same_image_mask
from trainables.methods.dias import losses as dl
from trainables.methods.dias.config import DiasConfig
from trainables.model import ITMModel, LossOutput


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
        terms = {"align": self.align(sims, image_ids, epoch)}
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
        weights = {"align": 1.0, "dim": p.lambda_dim, "inter": p.lambda_inter, "intra": p.lambda_intra}
        return LossOutput(terms=terms, weights={name: weights[name] for name in terms}, stats=stats)
