"""``method: dias`` — Dimension Information Alignment and Sparse spatial constraint (METHODS.md "DIAS").

Ma et al., "Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial Constraint
for Image-Text Matching", ACM MM 2024. The total is
``L = L_align + λ_dim L_dim + λ_inter L_inter + λ_intra L_intra`` (METHODS.md calls the first term
L_loc; it is the base model's alignment loss, logged as ``align`` like every method's).
Files: ``config.py`` (the ``dias:`` section), ``model.py`` (the model), ``losses.py`` (the pure maths).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainables.config import JobConfig
from trainables.methods.dias.config import DiasConfig
from trainables.methods.spec import Ablation, MethodSpec

if TYPE_CHECKING:
    from trainables.methods.dias.model import DiasModel

__all__ = ["SPEC", "DiasConfig", "DiasModel", "build"]


# The torch modules, loaded on first use, so the registry imports without torch.
LAZY = {"DiasModel": "model"}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(job: JobConfig, image_dim: int) -> DiasModel:
    from trainables.methods.dias.model import DiasModel

    return DiasModel(image_dim, job.model, job.train, DiasConfig(**job.method_params))


SPARSITY_KEYS = frozenset({"sparsity_k", "sparsity_mode", "sparsity_learnable", "sparsity_lr_scale",
                           "mask_temperature"})


def inert(params: DiasConfig) -> frozenset[str]:
    """Searchable keys nothing reads under these switches (``model.py``): L_dim's knobs (its
    attention included) without L_dim, a weight without its term, the mask's knobs without a mask
    (dense constraints) and the mask rule itself without any spatial term."""
    off = set()
    if not params.use_dim:
        off |= {"lambda_dim", "dim_loss", "lambda_offdiag", "dim_temperature", "attn_temperature"}
    off |= {f"lambda_{term}" for term in ("inter", "intra") if not getattr(params, f"use_{term}")}
    if not (params.use_inter or params.use_intra):
        off |= SPARSITY_KEYS | {"sparse_on"}
    elif not params.use_sparse:
        off |= SPARSITY_KEYS
    return frozenset(off)


SPEC = MethodSpec(
    name="dias",
    build=build,
    section=DiasConfig,
    searchable=("lambda_dim", "lambda_inter", "lambda_intra", "sparse_on", "sparsity_k", "sparsity_mode",
                "sparsity_learnable", "sparsity_lr_scale", "mask_temperature", "dim_loss", "lambda_offdiag",
                "dim_temperature", "attn_temperature"),
    ablations=(
        Ablation("full", "dias"),
        Ablation("w/o L_dim", "dias", {"use_dim": False}),
        Ablation("w/o L_inter", "dias", {"use_inter": False}),
        Ablation("w/o L_intra", "dias", {"use_intra": False}),
        Ablation("w/o sparse", "dias", {"use_sparse": False}),
        Ablation("w/o spatial", "dias", {"use_inter": False, "use_intra": False}),
        Ablation("base", "base"),
    ),
    inert=inert,
)
