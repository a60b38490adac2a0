"""The DIAS model: the base model plus DIAS's training-time terms (METHODS.md "DIAS"; the maths is in
``losses.py``).

Retrieval is unchanged from the base model: ``encode_image`` / ``encode_text`` pool each modality's own
tokens, so 5K images and 25K captions are encoded apart. The region-word interaction exists only on
the training path, where it feeds L_dim.

``forward`` is per-sample (under DDP the loop gathers its outputs across workers before
``loss_terms``); every in-batch quantity — the rows of L_dim, the correlation, the masks, the
spatial terms — is computed in ``loss_terms`` from the gathered batch.

Everything after the encoders runs in float32 with autocast off (``trainables/precision.py``), and
nothing reads a tensor on the host: the stats are 0-dim device tensors, the rows of L_dim have a
fixed count with 0/1 weights instead of a data-dependent one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainables.config import ModelConfig, TrainConfig
from trainables.losses import same_image_mask
from trainables.methods.dias import losses as dl
from trainables.methods.dias.config import DiasConfig
from trainables.model import ITMModel, LossOutput
from trainables.precision import full_precision, upcast


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class DiasModel(ITMModel):
    """The base model plus DIAS's training-time terms. ``forward`` adds, when L_dim is on,
    ``dim_words_for_regions`` [B, R, d] and ``dim_regions_for_words`` [B, L, d] (``cross_attend`` of
    each matched pair)."""

    def __init__(self, image_dim: int, model: ModelConfig, train: TrainConfig, params: DiasConfig):
        super().__init__(image_dim, model, train)
        self.params = params
        if params.learns_k():
            # k = k_max·sigmoid(θ): bounded, and AdamW's ≈ lr-per-step moves of θ shrink near the bounds.
            ratio = min(max(params.sparsity_k / params.sparsity_k_max, 1e-3), 1 - 1e-3)
            self.sparsity_k_logit = nn.Parameter(torch.tensor(logit(ratio)))
        else:
            self.register_buffer("sparsity_k", torch.tensor(float(params.sparsity_k)))

    def threshold_k(self) -> Tensor:
        """The current k (scalar): ``k_max·sigmoid(θ)`` when learnable, else the fixed value."""
        if self.params.learns_k():
            return self.params.sparsity_k_max * torch.sigmoid(self.sparsity_k_logit)
        return self.sparsity_k

    def param_groups(self, lr: float, text_lr_scale: float) -> list[dict]:
        """The base groups, with θ of a learnable k in its own group at ``lr × sparsity_lr_scale``
        (AdamW moves a scalar by ≈ its lr per step whatever the gradient's size), no weight decay."""
        groups = super().param_groups(lr, text_lr_scale)
        if not self.params.learns_k():
            return groups
        theta = self.sparsity_k_logit
        for group in groups:
            group["params"] = [p for p in group["params"] if p is not theta]
        return groups + [{"params": [theta], "lr": lr * self.params.sparsity_lr_scale,
                          "name": "sparsity_k", "weight_decay": 0.0}]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().forward(batch)
        if self.params.use_dim:  # within each matched pair: per-sample; softmax(cos / 0.1) in fp32
            with full_precision(out["img_tokens"].device):
                out["dim_words_for_regions"], out["dim_regions_for_words"] = dl.cross_attend(
                    upcast(out["img_tokens"]), out["img_mask"], upcast(out["txt_tokens"]), out["txt_mask"],
                    self.params.attn_temperature)
        return out

    def batch_scale(self, batch_size: int) -> int:
        """DIAS's terms are per-pair means; L_align sums the hinge over the batch's queries (B per
        direction) but averages InfoNCE. Each term is multiplied by the same factor, so a weight
        means the same at any batch size and with either alignment loss (docs/methods.md)."""
        return batch_size if self.align.kind == "triplet" else 1

    def dim_rows(self, out: dict[str, Tensor], image_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``M_V``, ``M_T`` [K, d] of the whole (gathered) batch and their rows' 0/1 weights [K]
        (``dl.dim_alignment_rows``; the random rows are keyed by the batch's image ids)."""
        return dl.dim_alignment_rows(out["img_tokens"], out["img_mask"], out["txt_tokens"], out["txt_mask"],
                                     out["dim_words_for_regions"], out["dim_regions_for_words"],
                                     self.params.dim_max_rows, dl.batch_seed(image_ids))

    @staticmethod
    def correlation(m_v: Tensor, m_t: Tensor, keep: Tensor) -> Tensor:
        """C [d, d] of the kept rows of ``M_V``, ``M_T``, in float32 with autocast off (already so
        inside the loop's fp32 island; kept for callers outside it)."""
        with full_precision(m_v.device):
            return dl.cross_correlation(upcast(m_v), upcast(m_t), keep)

    def dim_term(self, corr: Tensor) -> Tensor:
        """L_dim in the configured variant, before the batch scale; corr [d, d] -> scalar."""
        p = self.params
        if p.dim_loss == "barlow":
            return dl.barlow_dim_loss(corr, p.lambda_offdiag)
        if p.dim_loss == "diag_share":
            return dl.diag_share_dim_loss(corr)
        if p.dim_loss == "diag_share_sum":
            return dl.diag_share_sum_dim_loss(corr)
        return dl.infonce_dim_loss(corr, p.dim_temperature)

    def pair_weights(self, img: Tensor, txt: Tensor, image_ids: Tensor) -> Tensor:
        """``sparse_on: relation``: weights m_ij [B, B] of the unmatched pairs in L_inter and L_intra.

        Unmatched = i ≠ j and not the same image. The relation strength is detached: the mask
        selects pairs, it is not something the embeddings should be trained to move.
        """
        unmatched = ~same_image_mask(image_ids)
        if not self.params.use_sparse:
            return unmatched.to(img.dtype)
        r = dl.relation_strength(self.similarity(img, txt).detach())
        return dl.sparse_mask(r, unmatched, self.threshold_k(), self.params.mask_temperature,
                              hard=self.params.sparsity_mode == "hard")

    def spatial_terms(self, img: Tensor, txt: Tensor,
                      image_ids: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """L_inter, L_intra (those switched on, before the batch scale) and their mask densities.

        Computed in float32 with autocast off: Δ is a difference of two cosine distances near 1, and
        the mask thresholds are means and stds of such numbers; bf16 (8 bits of mantissa) errs by
        ~10 % there. img, txt [B, d] unit-norm.
        """
        p = self.params
        deltas = {"inter": dl.inter_delta, "intra": dl.intra_delta}
        unmatched = ~same_image_mask(image_ids)
        count = unmatched.sum().clamp_min(1)
        terms, stats = {}, {}
        with full_precision(img.device):
            img, txt = upcast(img), upcast(txt)
            if p.sparse_on == "relation":
                weight = self.pair_weights(img, txt, image_ids)  # one mask for both terms
                stats["mask_density"] = weight.detach().sum() / count
            for name, delta_fn in deltas.items():
                if not getattr(p, f"use_{name}"):
                    continue
                delta = delta_fn(img, txt)
                if p.sparse_on == "relation":
                    terms[name] = dl.spatial_loss(delta, weight)
                    continue
                mask = (dl.violation_mask(delta.detach(), unmatched, self.threshold_k()) if p.use_sparse
                        else unmatched.to(delta.dtype))
                stats[f"mask_density_{name}"] = mask.sum() / count
                terms[name] = dl.spatial_sum(delta, mask)
        return terms, stats

    def loss_terms(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> LossOutput:
        p = self.params
        img, txt = out["img_emb"], out["txt_emb"]
        scale = self.batch_scale(img.shape[0])
        terms = {"align": self.align(self.similarity(img, txt), image_ids, epoch)}
        stats = {"sparsity_k": self.threshold_k().detach()}
        if p.use_dim:
            corr = self.correlation(*self.dim_rows(out, image_ids))
            terms["dim"] = scale * self.dim_term(corr)
            stats["dim_corr_diag"] = corr.diagonal().mean().detach()
        if p.use_inter or p.use_intra:
            spatial, spatial_stats = self.spatial_terms(img, txt, image_ids)
            terms.update({name: scale * value for name, value in spatial.items()})
            stats.update(spatial_stats)
        weights = {"align": 1.0, "dim": p.lambda_dim, "inter": p.lambda_inter, "intra": p.lambda_intra}
        return LossOutput(terms=terms, weights={name: weights[name] for name in terms}, stats=stats)
