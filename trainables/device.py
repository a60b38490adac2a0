"""The device is chosen once per process; autocast is a no-op unless bf16 on CUDA is asked for."""

from __future__ import annotations

import contextlib

import torch


def choose_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 where it is fast and safe (CUDA), full precision elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
