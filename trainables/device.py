"""The device is chosen once per process; autocast is a no-op unless bf16 is asked for where it runs.

Under Ray the device is what Ray assigned, never what happens to be visible: Ray 2.60 no longer hides
the GPUs from a worker given none, so "CUDA if available" put every ``gpus_per_worker: 0`` trial on a
GPU node onto cuda:0, unaccounted. ``resolve_device`` is that decision as a pure function (the Ray
calls that feed it live in ``trainables/ray_train.py``); ``choose_device`` serves plain processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from functools import lru_cache

import torch

from trainables.errors import ITMError

CPU = torch.device("cpu")
# cuBLAS needs a fixed workspace to be deterministic; it reads this once, when it first starts.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def choose_device() -> torch.device:
    """A plain process (tests, benchmarks; no Ray): the current CUDA device when there is one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU


def resolve_device(gpu_ids: Sequence[int | str], cuda_available: bool, visible_devices: str | None = None,
                   ray_device: torch.device | None = None) -> torch.device:
    """The device of a process Ray gave ``gpu_ids`` (``ray.get_gpu_ids()``): the CPU when it was
    given none, whatever the node has; else ``ray_device`` (Ray Train's ``get_device()``) or, in a
    Tune trial, the first assigned GPU as CUDA numbers it here (its place in ``visible_devices``,
    the ``CUDA_VISIBLE_DEVICES`` Ray set; the id itself when Ray set none). A GPU assigned to a torch
    without CUDA is an error: falling back to the CPU would be as silent as the bug above."""
    if not gpu_ids:
        return CPU
    if not cuda_available:
        raise ITMError(f"Ray assigned GPU {', '.join(map(str, gpu_ids))} to this worker, but torch "
                       f"{torch.__version__} here cannot use CUDA; install a CUDA build of torch on the "
                       "GPU nodes, or set resources.gpus_per_worker: 0")
    if ray_device is not None:
        return ray_device
    first = str(gpu_ids[0])
    visible = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
    if not visible or visible == ["NoDevFiles"]:
        return torch.device("cuda", int(first))
    if first not in visible:
        raise ITMError(f"Ray assigned GPU {first}, but CUDA_VISIBLE_DEVICES={visible_devices} hides it; "
                       "do not set CUDA_VISIBLE_DEVICES for Ray workers")
    return torch.device("cuda", visible.index(first))


def memory_fraction(gpus_per_worker: float) -> float | None:
    """The share of its GPU a worker may allocate: its fraction of one GPU, or None (no cap) for
    whole GPUs and CPU workers. Ray only books fractions; without the cap two 0.5-GPU trials on one
    GPU each grow until one of them fails."""
    return gpus_per_worker if 0 < gpus_per_worker < 1 else None


def cap_memory(device: torch.device, gpus_per_worker: float) -> None:
    """Hold this process to its fraction of the GPU (``memory_fraction``); CUDA only."""
    fraction = memory_fraction(gpus_per_worker)
    if fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def set_deterministic(enabled: bool) -> None:
    """``train.deterministic``: deterministic kernels or an error where there are none, no cuDNN
    autotuning, a fixed cuBLAS workspace. Set before any CUDA work (the loop calls it first), and
    switched off again for a job without it (a reused worker process keeps torch's global state)."""
    if enabled:
        os.environ.setdefault(*CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    # Only when it changes anything: the call imports torch._inductor's config: seconds in a fresh process.
    if enabled or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(enabled, warn_only=False)


@lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CUDA from Ampere on); older GPUs only emulate it.
    Cached: autocast asks every step."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, precision: str,
                   bf16_native: bool | None = None) -> torch.dtype | None:
    """``bf16`` always; ``auto`` only on a GPU with native bf16 (full precision on the CPU, where
    it is slower, and on GPUs that emulate it); ``fp32`` never. ``bf16_native`` defaults to asking
    the device."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if (native_bf16(device) if bf16_native is None else bf16_native) else None
    return None


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
