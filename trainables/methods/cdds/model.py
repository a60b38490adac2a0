"""The CDDS model: the base encoders, a dual-path UNet per modality, related-semantics identification
and distribution sampling on the training path (METHODS.md "CDDS"; the maths is in
``losses.py``).

Retrieval uses the pooled *semantic* components: ``encode_image`` / ``encode_text`` each run one
modality's UNet alone (no batch statistics, no noise in eval), so evaluation can encode 5K images and
25K captions apart and score them with ``similarity``.
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


def build_unet(width: int, params: CddsConfig) -> DualPathUNet:
    groups, std = (params.noise_groups, params.noise_std) if params.use_noise else (1, 0.0)
    return DualPathUNet(width, params.num_heads, params.unet_depth, groups, std, params.has_modality_path())


def scatter_tokens(flat: Tensor, mask: Tensor) -> Tensor:
    """Valid-token rows [N_valid, d] back to [B, N, d] (zeros at padding); inverse of ``x[mask]``."""
    return flat.new_zeros((*mask.shape, flat.shape[-1])).index_put((mask,), flat)


class CddsModel(ITMModel):
    """``forward`` returns the base keys (``img_emb`` / ``txt_emb`` = pooled semantic components,
    ``img_tokens`` / ``txt_tokens`` = V^s / T^s [B, *, d], masks) plus ``img_raw`` / ``txt_raw`` (V, T),
    ``img_mod`` / ``txt_mod`` (V^m, T^m) when the modality path exists, and with sampling
    ``img_x`` / ``txt_x`` (V^x, T^x), their pooled ``img_x_emb`` / ``txt_x_emb`` and the
    related-semantics densities ``density_img`` / ``density_txt`` (0-dim, detached)."""

    def __init__(self, image_dim: int, model: ModelConfig, train: TrainConfig, params: CddsConfig):
        super().__init__(image_dim, model, train)
        params.check_model(model)
        self.params = params
        width = model.embed_dim
        if params.decouple:
            self.image_unet = build_unet(width, params)
            self.text_unet = build_unet(width, params)
        if params.use_sampling:
            for side in ("img", "txt"):
                self.add_threshold(f"threshold_{side}", width)
        if params.decouple and params.use_completeness:
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

    def decompose(self, raw: Tensor, mask: Tensor, unet: DualPathUNet | None, pool: nn.Module) -> dict:
        """Tokens [B, N, d] of one modality -> tokens (semantic), raw, modality?, mask, emb [B, d]."""
        out = {"raw": raw, "mask": mask}
        parts = unet(raw, mask) if unet is not None else {"semantic": raw}
        out["tokens"] = parts["semantic"]
        if "modality" in parts:
            out["modality"] = parts["modality"]
        out["emb"] = F.normalize(pool(out["tokens"], mask), dim=-1)
        return out

    def encode_image(self, images: Tensor, region_mask: Tensor) -> dict[str, Tensor]:
        """images [B, R, D_img] -> tokens V^s [B, R, d], raw V, modality V^m, mask, emb (unit norm)."""
        unet = self.image_unet if self.params.decouple else None
        return self.decompose(self.image_encoder(images), region_mask, unet, self.image_pool)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """input_ids, attention_mask [B, L] -> tokens T^s [B, L, d], raw T, modality T^m, mask, emb."""
        unet = self.text_unet if self.params.decouple else None
        raw = self.text_encoder(input_ids, attention_mask)
        return self.decompose(raw, attention_mask.bool(), unet, self.text_pool)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        img = self.encode_image(batch["images"], batch["region_mask"])
        txt = self.encode_text(batch["input_ids"], batch["attention_mask"])
        out = {}
        for side, enc in (("img", img), ("txt", txt)):
            out.update({f"{side}_emb": enc["emb"], f"{side}_tokens": enc["tokens"],
                        f"{side}_mask": enc["mask"], f"{side}_raw": enc["raw"]})
            if "modality" in enc:
                out[f"{side}_mod"] = enc["modality"]
        if self.params.use_sampling:
            out.update(self.sample(img["tokens"], img["mask"], txt["tokens"], txt["mask"]))
        return out

    def sample(self, img_sem: Tensor, img_mask: Tensor, txt_sem: Tensor, txt_mask: Tensor) -> dict:
        """Related semantics (CDDS 2) + distribution sampling (CDDS 3) over the batch's valid tokens."""
        p = self.params
        relative = p.mask_scale == "std"
        # KL differences between columns are small; bf16 autocast would round them away.
        with torch.autocast(img_sem.device.type, enabled=False):
            v, t = img_sem[img_mask].float(), txt_sem[txt_mask].float()
            w_img, gate_img = cl.related_semantics(v, t, self.threshold_img.float(), p.column_temperature,
                                                   p.mask_temperature, relative)
            w_txt, gate_txt = cl.related_semantics(t, v, self.threshold_txt.float(), p.column_temperature,
                                                   p.mask_temperature, relative)
            img_x = scatter_tokens(cl.distribution_sample(v, t, w_img), img_mask).to(img_sem.dtype)
            txt_x = scatter_tokens(cl.distribution_sample(t, v, w_txt), txt_mask).to(txt_sem.dtype)
        return {"img_x": img_x, "txt_x": txt_x,
                "img_x_emb": F.normalize(self.image_pool(img_x, img_mask), dim=-1),
                "txt_x_emb": F.normalize(self.text_pool(txt_x, txt_mask), dim=-1),
                "density_img": (gate_img > 0.5).float().mean().detach(),
                "density_txt": (gate_txt > 0.5).float().mean().detach()}

    # ------------------------------------------------------------------------------------------
    # Losses: L = α_s L_s + α_m L_m + α_f L_f + (1 − α_f) L_x (paper Eq. 15)
    # ------------------------------------------------------------------------------------------

    def semantic_term(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> Tensor:
        """L_s (CDDS 4): the base hinge (``self.align``) on pooled components. cross: (V^s, T^x) and
        (V^x, T^s); self: (V^s, V^x) and (T^x, T^s); averaged so L_s keeps the scale of one hinge.
        Without sampling: (V^s, T^s) directly, the "w/o sampling" row."""
        if not self.params.use_sampling:
            return self.align(self.similarity(out["img_emb"], out["txt_emb"]), image_ids, epoch)
        if self.params.semantic_loss == "cross":
            pairs = ((out["img_emb"], out["txt_x_emb"]), (out["img_x_emb"], out["txt_emb"]))
        else:
            pairs = ((out["img_emb"], out["img_x_emb"]), (out["txt_x_emb"], out["txt_emb"]))
        return sum(self.align(self.similarity(a, b), image_ids, epoch) for a, b in pairs) / 2

    def completeness_term(self, out: dict[str, Tensor], part: str, weight: Tensor) -> Tensor:
        """L_f (part ``tokens`` = V^s, weight w_s) or L_x (part ``x`` = V^x, weight w_x), both sides.

        The target V is detached: completeness asks the decomposition to keep the backbone's
        information, not the backbone to shrink towards whatever the decoders produce."""
        total = 0.0
        for side in ("img", "txt"):
            recon = weight * out[f"{side}_{part}"] + self.w_m * out[f"{side}_mod"]
            total = total + cl.completeness_loss(recon, out[f"{side}_raw"].detach(), out[f"{side}_mask"])
        return total

    def loss_terms(self, out: dict[str, Tensor], image_ids: Tensor, epoch: int) -> LossOutput:
        p = self.params
        terms = {"s": self.semantic_term(out, image_ids, epoch)}
        if "img_mod" in out and p.use_modality_loss:
            terms["m"] = (cl.modality_consistency_loss(out["img_mod"], out["img_mask"])
                          + cl.modality_consistency_loss(out["txt_mod"], out["txt_mask"]))
        if p.decouple and p.use_completeness:
            terms["f"] = self.completeness_term(out, "tokens", self.w_s)
            if p.use_sampling:
                terms["x"] = self.completeness_term(out, "x", self.w_x)
        weights = {"s": p.alpha_s, "m": p.alpha_m, "f": p.alpha_f, "x": 1.0 - p.alpha_f}
        return LossOutput(terms=terms, weights={name: weights[name] for name in terms}, stats=self.stats(out))

    def stats(self, out: dict[str, Tensor]) -> dict[str, float]:
        """Detached per-step diagnostics: related-semantics density per side (fraction of (i, j) with
        gate > 0.5), mean threshold α, and the reconstruction weights."""
        stats = {}
        if self.params.use_sampling:
            stats["density_img"] = float(out["density_img"])
            stats["density_txt"] = float(out["density_txt"])
            alphas = torch.cat([self.threshold_img.detach(), self.threshold_txt.detach()])
            stats["threshold_alpha"] = float(alphas.mean())
        for name in ("w_s", "w_m", "w_x"):
            if hasattr(self, name):
                stats[name] = float(getattr(self, name).detach())
        return stats
