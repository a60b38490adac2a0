"""``method: cdds`` — Constrained Decoupling and Distribution Sampling (METHODS.md "CDDS").

Ma et al., "Aligning the True Semantics: Constrained Decoupling and Distribution Sampling for
Cross-Modal Alignment", AAAI 2026. ``L = L_s + α_m L_m + α_f L_f + α_x L_x`` (paper Eq. 15, α_s = 1).
Files: ``config.py`` (the ``cdds:`` section), ``unet.py`` (dual-path UNet), ``model.py`` (the model),
``losses.py`` (the pure maths). docs/methods.md "CDDS" lists known vs reconstructed.
"""

from __future__ import annotations

from trainables.config import JobConfig
from trainables.methods.cdds.config import CddsConfig
from trainables.methods.cdds.model import CddsModel
from trainables.methods.cdds.unet import DualPathUNet, UNetDecoder
from trainables.methods.spec import Ablation, MethodSpec

__all__ = ["SPEC", "CddsConfig", "CddsModel", "DualPathUNet", "UNetDecoder", "build"]


def build(job: JobConfig, image_dim: int) -> CddsModel:
    return CddsModel(image_dim, job.model, job.train, CddsConfig(**job.method_params))


SPEC = MethodSpec(
    name="cdds",
    build=build,
    section=CddsConfig,
    searchable=("unet_depth", "alpha_m", "alpha_f", "alpha_x", "threshold_alpha", "noise_groups",
                "noise_std", "semantic_loss", "column_temperature", "kl_temperature", "kl_scale",
                "mask_temperature", "mask_scale", "threshold_learnable"),
    ablations=(
        Ablation("full", "cdds"),
        # Capacity-matched: the UNet keeps its encoder and semantic decoder, only the modality path goes.
        Ablation("w/o decoupling", "cdds", {"decouple": False}),
        Ablation("w/o UNet", "cdds", {"use_unet": False}),
        Ablation("w/o L_m", "cdds", {"use_modality_loss": False}),
        Ablation("w/o completeness", "cdds", {"use_completeness": False}),
        Ablation("w/o noise", "cdds", {"use_noise": False}),
        Ablation("w/o sampling", "cdds", {"use_sampling": False}),
        Ablation("base", "base"),
    ),
)
