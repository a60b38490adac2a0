"""The CDDS model: the base encoders, a dual-path UNet per modality, related-semantics identification
and distribution sampling (METHODS.md "CDDS"; the maths is in ``losses.py``).

``forward`` is per-sample (each UNet attends within one sample; the noise scale is each token's own
std), so under DDP the loop can gather its outputs across workers; every batch statistic (column
distributions, KL, W, quantiles, hardest negatives) is computed in ``loss_terms`` from those
outputs. Retrieval (``encode_image`` / ``encode_text``, one modality at a time) scores what cross L_s
trains, ``½(v^s·t^x + v^x·t^s)``, sampling each image and caption with running per-column quantiles
kept over the training batches instead of the batch's (reconstructed; docs/methods.md "CDDS" 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import ModelConfig, TrainConfig
from trainables.methods.cdds import losses as cl
from trainables.methods.cdds.config import CddsConfig
from trainables.methods.cdds.unet import DualPathUNet
from trainables.model import ITMModel, LossOutput
from trainables.precision import full_precision, upcast


def build_unet(width: int, params: CddsConfig) -> DualPathUNet:
    groups, std = (params.noise_groups, params.noise_std) if params.use_noise else (1, 0.0)
    return DualPathUNet(width, params.num_heads, params.unet_depth, groups, std, params.has_modality_path())


@torch.no_grad()
def token_diagnostics(out: dict[str, Tensor], side: str) -> dict[str, Tensor]:
    """Collapse detectors for one side (detached 0-dim tensors): ``sem_cos`` = mean over valid tokens
    of cos(V^s, V) (→ 1: the semantic decoder copies V through the H_0 skip) and ``mod_ratio`` = mean
    of ‖V^m‖ / ‖V‖ (→ 0: V^m vanishes and makes L_m free). Masked means, no boolean indexing: a
    data-dependent shape would make the host wait for the device every step."""
    mask, raw = out[f"{side}_mask"], upcast(out[f"{side}_raw"])
    count = mask.sum().clamp_min(1)
    cos = F.cosine_similarity(upcast(out[f"{side}_tokens"]), raw, dim=-1)
    stats = {f"sem_cos_{side}": torch.where(mask, cos, 0.0).sum() / count}
    if f"{side}_mod" in out:
        ratio = upcast(out[f"{side}_mod"]).norm(dim=-1) / raw.norm(dim=-1).clamp_min(1e-12)
        stats[f"mod_ratio_{side}"] = torch.where(mask, ratio, 0.0).sum() / count
    return stats


class CddsModel(ITMModel):
    """``forward`` returns, all per-sample: ``img_emb`` / ``txt_emb`` = v^s / t^s = n(pool(V^s)) [B, d]
    (what L_s reads; retrieval uses ``encode_*``'s ``emb`` instead), ``img_tokens`` / ``txt_tokens`` =
    V^s / T^s [B, *, d], the masks, ``img_raw`` / ``txt_raw`` (V, T) and ``img_mod`` / ``txt_mod``
    (V^m, T^m) when the modality path exists."""

    def __init__(self, image_dim: int, model: ModelConfig, train: TrainConfig, params: CddsConfig):
        super().__init__(image_dim, model, train)
        params.check_model(model)
        self.params = params
        width = model.embed_dim
        if params.use_unet:
            self.image_unet = build_unet(width, params)
            self.text_unet = build_unet(width, params)
        if params.use_sampling:
            for side in ("img", "txt"):
                self.add_threshold(f"threshold_{side}", width)
            # Running per-column quantiles of V^s and T^s (EMA over training batches, as BatchNorm
            # keeps running moments): retrieval samples captions with them (``sample_text``).
            self.register_buffer("quantiles_img", torch.zeros(params.quantile_positions, width))
            self.register_buffer("quantiles_txt", torch.zeros(params.quantile_positions, width))
            self.register_buffer("quantile_updates", torch.zeros((), dtype=torch.long))
        if params.has_modality_path() and params.use_completeness:
            # Learnable mixing weights of the reconstructions (CDDS 4), shared by both modalities.
            self.w_s = nn.Parameter(torch.tensor(1.0))
            self.w_m = nn.Parameter(torch.tensor(1.0))
            if params.use_sampling:
                self.w_x = nn.Parameter(torch.tensor(1.0))

    def add_threshold(self, name: str, width: int) -> None:
        """α [d], one per column (CDDS 2): a parameter, or a buffer (moves with ``.to(device)``)."""
        alpha = torch.full((width,), float(self.params.threshold_alpha))
        if self.params.threshold_learnable:
            self.register_parameter(name, nn.Parameter(alpha))
        else:
            self.register_buffer(name, alpha)

    # ------------------------------------------------------------------------------------------
    # Per-sample encoding (forward, retrieval)
    # ------------------------------------------------------------------------------------------

    def decompose(self, raw: Tensor, mask: Tensor, unet: DualPathUNet | None, pool: nn.Module) -> dict:
        """Tokens [B, N, d] of one modality -> tokens (semantic), raw, modality?, mask, sem_emb [B, d]."""
        out = {"raw": raw, "mask": mask}
        parts = unet(raw, mask) if unet is not None else {"semantic": raw}
        out["tokens"] = parts["semantic"]
        if "modality" in parts:
            out["modality"] = parts["modality"]
        out["sem_emb"] = F.normalize(pool(out["tokens"], mask), dim=-1)
        return out

    def image_parts(self, images: Tensor, region_mask: Tensor) -> dict[str, Tensor]:
        unet = self.image_unet if self.params.use_unet else None
        return self.decompose(self.image_encoder(images), region_mask, unet, self.image_pool)

    def text_parts(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        unet = self.text_unet if self.params.use_unet else None
        return self.decompose(self.text_encoder(input_ids, attention_mask), attention_mask.bool(), unet,
                              self.text_pool)

    def encode_image(self, images: Tensor, region_mask: Tensor) -> dict[str, Tensor]:
        """images [B, R, D_img] -> tokens V^s [B, R, d], raw V, modality V^m, mask, sem_emb v^s [B, d]
        and the retrieval embedding ``emb`` = [v^s, v^x] / √2 [B, 2d] (v^s [B, d] without sampling)."""
        out = self.image_parts(images, region_mask)
        out["emb"] = self.retrieval_embedding(out, "img")
        return out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """input_ids, attention_mask [B, L] -> tokens T^s [B, L, d], raw T, modality T^m, mask, sem_emb
        t^s and the retrieval embedding ``emb`` = [t^x, t^s] / √2 [B, 2d] (t^s without sampling)."""
        out = self.text_parts(input_ids, attention_mask)
        out["emb"] = self.retrieval_embedding(out, "txt")
        return out

    def retrieval_embedding(self, parts: dict[str, Tensor], side: str) -> Tensor:
        """What retrieval scores (docs/methods.md "CDDS" 5, reconstructed). With cross sampling L_s
        trains ½[ℓ(v^s·t^x) + ℓ(v^x·t^s)], so the score is ½(v^s·t^x + v^x·t^s): one dot product of
        ``[v^s, v^x]/√2`` with ``[t^x, t^s]/√2`` (unit norm, O(N·M) matmul). Without sampling: v^s, t^s."""
        if not self.params.use_sampling:
            return parts["sem_emb"]
        sampled = self.running_sample(parts["tokens"], parts["mask"], side)
        pair = (parts["sem_emb"], sampled) if side == "img" else (sampled, parts["sem_emb"])
        return torch.cat(pair, dim=-1) / 2 ** 0.5

    def running_sample(self, tokens: Tensor, mask: Tensor, side: str) -> Tensor:
        """v^x (side ``img``) or t^x (``txt``) of one sample at a time: CDDS 2 and 3 with the running
        per-column quantiles in place of the batch's. W comes from the running column distributions;
        each value moves to the W-mixed running quantile of the other modality at its own running
        quantile position (``apply_transport``). tokens [B, N, d], mask [B, N] -> [B, d] unit norm.
        Before the first training batch there are no quantiles and the result is the pooled tokens."""
        own, other = ((self.quantiles_img, self.quantiles_txt) if side == "img"
                      else (self.quantiles_txt, self.quantiles_img))
        alpha = self.threshold_img if side == "img" else self.threshold_txt
        k = self.params.quantile_positions
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            w, _ = cl.related_semantics(own, other, alpha.float(), *self.related_args(), num_positions=k)
            knots, values = cl.transport_table(own, other, w, k)
        with torch.autocast(tokens.device.type, enabled=False):
            mapped = cl.apply_transport(tokens.float(), knots, values).to(tokens.dtype)
        mapped = torch.where(self.quantile_updates > 0, mapped, tokens)
        pool = self.image_pool if side == "img" else self.text_pool
        return F.normalize(pool(mapped, mask), dim=-1)

    def related_args(self) -> tuple:
        """The scalar arguments of ``related_semantics`` after its three tensors."""
        p = self.params
        return (p.column_temperature, p.mask_temperature, p.mask_scale == "std", p.kl_temperature,
                p.kl_scale == "std")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        img = self.image_parts(batch["images"], batch["region_mask"])
        txt = self.text_parts(batch["input_ids"], batch["attention_mask"])
        out = {"img_emb": img["sem_emb"], "txt_emb": txt["sem_emb"]}
        for side, enc in (("img", img), ("txt", txt)):
            out.update({f"{side}_tokens": enc["tokens"], f"{side}_mask": enc["mask"],
                        f"{side}_raw": enc["raw"]})
            if "modality" in enc:
                out[f"{side}_mod"] = enc["modality"]
        return out

    # ------------------------------------------------------------------------------------------
    # Batch statistics and losses: L = L_s + α_m L_m + α_f L_f + α_x L_x (paper Eq. 15, α_s = 1)
    # ------------------------------------------------------------------------------------------

    def sample(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Related semantics (CDDS 2) + distribution sampling (CDDS 3) over the (gathered) batch's
        valid tokens -> img_x, txt_x [B, *, d] (0 at padding), their pooled unit-norm img_x_emb,
        txt_x_emb, and W of each side (w_img, w_txt [d, d]). In training it also updates the running
        per-column quantiles that retrieval samples with.

        One sort per modality (``sort_columns``) serves both W's column distributions, the other
        side's sampling and the running quantiles; padding is masked, never indexed away, so no
        shape depends on the data."""
        args, k = self.related_args(), self.params.quantile_positions
        # KL differences between columns are small; bf16 would round them away. The loop already runs
        # loss_terms in its fp32 island; this keeps any other caller's autocast out as well.
        with full_precision(out["img_tokens"].device):
            tables, sorted_, positions, counts = {}, {}, {}, {}
            for side in ("img", "txt"):
                tokens, mask = upcast(out[f"{side}_tokens"]).flatten(0, 1), out[f"{side}_mask"].flatten()
                sorted_[side], positions[side], counts[side] = cl.sort_columns(tokens, mask)
                tables[side] = cl.resample_sorted(sorted_[side], k, counts[side])  # [K, d]
            sampled = {}
            for side, other in (("img", "txt"), ("txt", "img")):
                alpha = (self.threshold_img if side == "img" else self.threshold_txt).to(tables[side].dtype)
                w, _ = cl.related_semantics_of_tables(tables[side], tables[other], alpha, *args)
                mask = out[f"{side}_mask"]
                mapped = cl.sample_sorted(sorted_[other], w, positions[side], counts[other])
                sampled[f"{side}_x"] = torch.where(mask.unsqueeze(-1), mapped.view(*mask.shape, -1), 0.0)
                sampled[f"w_{side}"] = w
            if self.training:
                self.blend_quantiles(tables["img"].detach(), tables["txt"].detach())
        for side, pool in (("img", self.image_pool), ("txt", self.text_pool)):
            sampled[f"{side}_x_emb"] = F.normalize(pool(sampled[f"{side}_x"], out[f"{side}_mask"]), dim=-1)
        return sampled

    @torch.no_grad()
    def update_quantiles(self, image: Tensor, text: Tensor) -> None:
        """Blend one batch's valid tokens (image [N_v, d], text [N_t, d]) into the running quantiles."""
        k = self.params.quantile_positions
        self.blend_quantiles(cl.resample_columns(image, k), cl.resample_columns(text, k))

    @torch.no_grad()
    def blend_quantiles(self, image: Tensor, text: Tensor) -> None:
        """Running per-column quantiles from one batch's tables (``resample_sorted`` at K positions,
        [K, d] each): the n-th batch enters with weight max(1/n, momentum), i.e. the plain average of
        the batches so far until 1/momentum batches, an EMA after that (no start-up bias towards the
        untrained first batch). A convex combination of ascending columns stays ascending. Every DDP
        rank sees the same gathered batch, so the buffers stay equal across ranks."""
        weight = (1.0 / (self.quantile_updates + 1).float()).clamp_min(self.params.quantile_momentum)
        self.quantiles_img.lerp_(image, weight.to(image.dtype))
        self.quantiles_txt.lerp_(text, weight.to(text.dtype))
        self.quantile_updates += 1

    def semantic_term(self, out: dict[str, Tensor], sampled: dict[str, Tensor], image_ids: Tensor,
                      epoch: int) -> Tensor:
        """L_s (CDDS 4): the base hinge (``self.align``) on pooled components. cross: (v^s, t^x) and
        (v^x, t^s); self: (v^s, v^x) and (t^x, t^s); averaged so L_s keeps the scale of one hinge.
        Without sampling: (v^s, t^s) directly, the "w/o sampling" row."""
        v_s, t_s = out["img_emb"], out["txt_emb"]
        if not self.params.use_sampling:
            return self.align(self.similarity(v_s, t_s), image_ids, epoch)
        if self.params.semantic_loss == "cross":
            pairs = ((v_s, sampled["txt_x_emb"]), (sampled["img_x_emb"], t_s))
        else:
            pairs = ((v_s, sampled["img_x_emb"]), (sampled["txt_x_emb"], t_s))
        return sum(self.align(self.similarity(a, b), image_ids, epoch) for a, b in pairs) / 2

    def completeness_term(self, out: dict[str, Tensor], parts: dict[str, Tensor], weight: Tensor) -> Tensor:
        """L_f (parts = V^s, T^s, weight w_s) or L_x (parts = V^x, T^x, weight w_x), both sides.

        The target V is detached: completeness asks the decomposition to keep the backbone's
        information, not the backbone to shrink towards whatever the decoders produce."""
        total = 0.0
        for side in ("img", "txt"):
            recon = weight * parts[side] + self.w_m * out[f"{side}_mod"]
            total = total + cl.completeness_loss(recon, out[f"{side}_raw"].detach(), out[f"{side}_mask"],
                                                 self.reduction())
        return total

    def reduction(self) -> str:
        """How the constraints reduce over samples: as L_s does (the hinge sums, InfoNCE averages)."""
        return "sum" if self.align.kind == "triplet" else "mean"

    def loss_terms(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> LossOutput:
        p = self.params
        sampled = self.sample(out) if p.use_sampling else {}
        terms = {"s": self.semantic_term(out, sampled, image_ids, epoch)}
        sides = ("img", "txt")
        if "img_mod" in out and p.use_modality_loss:
            terms["m"] = sum(cl.modality_consistency_loss(out[f"{s}_mod"], out[f"{s}_mask"], self.reduction())
                             for s in sides)
        if "img_mod" in out and p.use_completeness:
            terms["f"] = self.completeness_term(out, {s: out[f"{s}_tokens"] for s in sides}, self.w_s)
            if p.use_sampling:
                terms["x"] = self.completeness_term(out, {s: sampled[f"{s}_x"] for s in sides}, self.w_x)
        weights = {"s": 1.0, "m": p.alpha_m, "f": p.alpha_f, "x": p.alpha_x}
        return LossOutput(terms=terms, weights={name: weights[name] for name in terms},
                          stats=self.stats(out, sampled))

    def stats(self, out: dict[str, Tensor], sampled: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached per-step diagnostics, 0-dim device tensors (the loop reads them once per epoch):
        W's effective support per side (``support_*`` = mean over rows of exp H(W_i·), in columns),
        the mean threshold α, the reconstruction weights and, with a UNet, the collapse detectors
        ``sem_cos_*`` and ``mod_ratio_*`` (``token_diagnostics``)."""
        stats = {}
        if sampled:
            for side in ("img", "txt"):
                stats[f"support_{side}"] = cl.effective_support(sampled[f"w_{side}"].detach())
            alphas = torch.cat([self.threshold_img.detach(), self.threshold_txt.detach()])
            stats["threshold_alpha"] = alphas.mean()
        for name in ("w_s", "w_m", "w_x"):
            if hasattr(self, name):
                stats[name] = getattr(self, name).detach().clone()
        if self.params.use_unet:
            for side in ("img", "txt"):
                stats.update(token_diagnostics(out, side))
        return stats
