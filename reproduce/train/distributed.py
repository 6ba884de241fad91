"""One process group set-up for every scale: a plain process, or torchrun on one or many nodes
(gloo on CPU, nccl on GPU), read from torchrun's environment variables."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils import distribute_bn
from torch import nn

from reproduce.errors import UsageError
from reproduce.params import env_rank, env_world_size


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun; pick the device of this rank."""
    world = env_world_size()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available on this machine; use --device cpu or auto")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistContext(rank, world, local_rank, dev)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather_objects(ctx: DistContext, obj: object) -> list:
    """``obj`` of every rank, in rank order (a picklable value)."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def average_bn_stats(ctx: DistContext, model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (timm's ``distribute_bn``, reduce mode).

    DDP keeps parameters in step but each rank's last forward updates its own BN buffers; after
    this every rank holds the same buffers, so distributed evaluation and the checkpoint agree."""
    if ctx.distributed:
        distribute_bn(model, ctx.world_size, reduce=True)


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in order: equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(ctx: DistContext, model: nn.Module) -> list[str]:
    """Every rank's parameter digest (rank order), to check that DDP kept the replicas identical."""
    return [str(d) for d in gather_objects(ctx, parameter_digest(model))]
