"""``method: cdds`` — Constrained Decoupling and Distribution Sampling (METHODS.md "CDDS").

Ma et al., "Aligning the True Semantics: Constrained Decoupling and Distribution Sampling for
Cross-Modal Alignment", AAAI 2026. ``L = L_s + α_m L_m + α_f L_f + α_x L_x`` (paper Eq. 15, α_s = 1).
Files: ``config.py`` (the ``cdds:`` section), ``unet.py`` (dual-path UNet), ``model.py`` (the model),
``losses.py`` (the pure maths). docs/methods.md "CDDS" lists known vs reconstructed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainables.config import JobConfig
from trainables.methods.cdds.config import CddsConfig
from trainables.methods.spec import Ablation, MethodSpec

if TYPE_CHECKING:
    from trainables.methods.cdds.model import CddsModel

__all__ = ["SPEC", "CddsConfig", "CddsModel", "DualPathUNet", "UNetDecoder", "build"]

# The torch modules, loaded on first use, so the registry imports without torch.
LAZY = {"CddsModel": "model", "DualPathUNet": "unet", "UNetDecoder": "unet"}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(job: JobConfig, image_dim: int) -> CddsModel:
    from trainables.methods.cdds.model import CddsModel

    return CddsModel(image_dim, job.model, job.train, CddsConfig(**job.method_params))


SAMPLING_KEYS = frozenset({"threshold_alpha", "threshold_learnable", "semantic_loss", "column_temperature",
                           "kl_temperature", "kl_scale", "mask_temperature", "mask_scale"})


def inert(params: CddsConfig) -> frozenset[str]:
    """Searchable keys nothing reads under these switches (``model.py``): the UNet's and the noise's
    knobs without them, a weight without its term (L_m and L_f need the modality path, L_x also
    sampling) and related-semantics identification's knobs without sampling."""
    off = set()
    if not params.use_unet:
        off |= {"unet_depth", "noise_groups", "noise_std"}
    elif not params.use_noise:
        off |= {"noise_groups", "noise_std"}
    modality = params.has_modality_path()
    if not (modality and params.use_modality_loss):
        off.add("alpha_m")
    if not (modality and params.use_completeness):
        off |= {"alpha_f", "alpha_x"}
    if not params.use_sampling:
        off |= SAMPLING_KEYS | {"alpha_x"}
    return frozenset(off)


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
    inert=inert,
)
