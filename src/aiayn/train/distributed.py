"""One process or many: the small layer over torch.distributed the trainer needs.

Under ``torchrun`` (WORLD_SIZE > 1) every process joins one process group — NCCL when it
trains on a GPU, gloo on CPU — and the model is wrapped in DistributedDataParallel. Each rank
reads its own share of the batches (the sampler's shard), and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must live for collectives: NCCL wants GPU tensors, gloo CPU ones."""
        return self.device if self.distributed and dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> list[float]:
        """Sum a few scalars over ranks (float64, so token counts stay exact). ``values`` may
        be a tensor on the device: then this is where the host waits for it."""
        if isinstance(values, torch.Tensor):
            t = values.to(dtype=torch.float64)
        else:
            t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            t = t.to(self.comm_device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: keeps stop decisions identical."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_error(self, message: str | None) -> None:
        """Rank 0 found a problem (e.g. the run directory): raise it on every rank."""
        if not self.distributed:
            if message:
                raise UserError(message)
            return
        # As UTF-8 bytes in a tensor: a length, then the text (no pickling).
        data = (message or "").encode("utf-8") if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        if self.is_main and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if buf.numel():
            dist.broadcast(buf, src=0)
            raise UserError(bytes(buf.cpu().tolist()).decode("utf-8"))


def resolve_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cuda":
        setting = f"cuda:{local_rank}"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"train.device: unknown device {setting!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: CUDA is not available on this machine; use device=cpu")
    return device


def setup(device_setting: str) -> DistContext:
    """Join the process group when started by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
