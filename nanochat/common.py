"""Small shared pieces of the nanochat library: device and dtype choice, rank-aware printing, the
distributed helpers that every stage uses and a crash-safe torch.save (the base directory and
torch-free writes are in nanochat.files).

The compute dtype is decided once, at import time, so that every module agrees on it:
bf16 on CUDA GPUs of compute capability 8.0 and newer, fp32 everywhere else (CPU, MPS,
older GPUs). `NANOCHAT_DTYPE=bfloat16|float16|float32` overrides the choice.
"""

import logging
import os

import torch
import torch.distributed as dist

from nanochat.files import atomic_write

logger = logging.getLogger("nanochat")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def autodetect_device_type() -> str:
    """'cuda' when a GPU is visible, then 'mps' on Apple silicon, else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _choose_compute_dtype() -> torch.dtype:
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override.lower() not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[override.lower()]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE: torch.dtype = _choose_compute_dtype()


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_distributed, rank, local_rank, world_size) of this process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return world > 1, rank, int(os.environ.get("LOCAL_RANK", rank)), world
    return False, 0, 0, 1


def is_rank0() -> bool:
    return get_dist_info()[1] == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed at once so that Ray job logs stream."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to `path` atomically (nanochat.files.atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def peak_flops(device: torch.device | str) -> float:
    """Peak dense bf16 FLOP/s of a known GPU (looked up by name), for MFU.

    Returns 0.0 on CPU and for unknown GPUs; callers then report MFU as n/a (the CPU benchmark
    measures the machine's matmul FLOP/s instead)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device).lower()
    table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12,
             "4090": 165e12, "3090": 71e12, "b200": 2250e12}
    for key, value in table.items():
        if key in name:
            return value
    return 0.0
