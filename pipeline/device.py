"""Where training and inference run: the device, the DDP process group, mixed precision, loader workers.

Train, evaluate, promote and predict choose their device the same way (``auto``: the GPU when there
is one), and a ``workers`` setting means the same everywhere: 0 = automatic, 1 = in this process,
N > 1 = N processes.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: DataLoader processes on a GPU when ``workers`` is 0 (automatic), at most one per core
GPU_LOADER_WORKERS = 8


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` process group when there is one (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist = Dist(int(os.environ.get("RANK", "0")), world, local_rank)
    return dist, device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (:data:`AMP_MODES`) on ``device``.

    ``auto``: bf16 where the GPU supports it, fp16 (with a gradient scaler) otherwise; off on CPU.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loader_workers(workers: int, device: torch.device) -> int:
    """DataLoader ``num_workers`` for a ``workers`` setting (0 = automatic, 1 = this process, N = N processes).

    Automatic loads in this process on a CPU (loader processes would only take cores from the model)
    and with up to :data:`GPU_LOADER_WORKERS` processes, one per core at most, for a GPU.
    """
    if workers == 0:
        return 0 if device.type == "cpu" else min(GPU_LOADER_WORKERS, os.cpu_count() or 1)
    return 0 if workers == 1 else workers


def device_name(device: torch.device) -> str:
    """The device as the model card records it (GPU model, or CPU and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
