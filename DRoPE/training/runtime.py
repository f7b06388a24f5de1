"""Process-level setup for training: distributed context, device, precision, seeding, optimizer.

Distributed training is detected from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``): gloo on CPU, nccl on CUDA. Without those variables the run is a single process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """rank / world_size / local_rank of this process (0 / 1 / 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_gather(self, value):
        """[value of rank 0, value of rank 1, ...] (any picklable value); [value] when not distributed."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def dist_from_env() -> DistContext:
    """The context torchrun describes in the environment (single process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def training_device(preference: str, dist: DistContext) -> torch.device:
    """``DRoPE.device.select_device(preference)``; with several processes on CUDA, cuda:LOCAL_RANK.

    A requested device that is missing raises ``DeviceError`` (no silent fallback).
    """
    from DRoPE.device import DeviceError, select_device

    device = select_device(preference)
    if device.type == "cuda":
        index = dist.local_rank if dist.distributed else (device.index or 0)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if dist.distributed and device.type != "cpu":
        raise DeviceError(f"distributed training runs on CPU (gloo) or CUDA (nccl), not on {device.type}")
    return device


def init_distributed(dist: DistContext, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) when running under torchrun."""
    if dist.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
        log.info("process %d of %d joined (%s)", dist.rank, dist.world_size, backend)


def close_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def precision(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use GradScaler): bf16 on CUDA if supported, else fp16 with a scaler; fp32 on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def no_weight_decay(name: str, param: torch.nn.Parameter, extra: set[str]) -> bool:
    """Biases, norm weights (1-D), tokens and embeddings named by the model are not decayed."""
    return param.ndim <= 1 or name in extra or name.endswith("token")


def build_optimizer(
    model: torch.nn.Module, *, lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW with two groups: "decay" (``apply_weight_decay`` True) and "no_decay" (biases, norms, tokens).

    The learning rate and weight decay are set per step by the engine from the schedules.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name, param, extra) else decay).append(param)
    groups = [
        {"params": decay, "name": "decay", "apply_weight_decay": True, "weight_decay": 0.0},
        {"params": plain, "name": "no_decay", "apply_weight_decay": False, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state tensor's name, dtype, shape and bytes (bitwise identity check)."""
    model = model.module if hasattr(model, "module") else model
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()
