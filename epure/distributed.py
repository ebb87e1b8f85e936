"""Multi-process training with torch.distributed: set-up from torchrun's environment, and reductions.

    epure train --devices 2 --max-steps 20   # two local processes under torchrun

``torchrun --nproc_per_node=N -m epure train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; every process
then trains on its own share of each global batch (``train.batch_size`` examples per process), gradients
are averaged over the processes (one all-reduce per step, ``average_gradients``), and only rank 0 writes
checkpoints and talks to W&B. NCCL on GPUs, gloo on CPUs. A single process (no WORLD_SIZE) runs exactly as before.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module started the process group and must end it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device_name: str) -> tuple[Distributed, str]:
    """Join the process group torchrun describes (if any); returns it and the device name to train on."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    owns = not dist.is_initialized()
    if owns:
        # torch.optim imports torch._dynamo on first use, and imported after the group exists it holds references
        # to it: destroy_process_group could then not free the group, gloo's worker threads would outlive main,
        # and one of them, releasing its last all-reduce's tensor while Python shuts down, aborts the process
        # (SIGABRT, "terminate called without an active exception": 3 of 60 runs of benchmarks/ddp_exit.py).
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device_name = f"cuda:{local_rank % torch.cuda.device_count()}"
    elif device_name == "auto":
        device_name = "cpu"
    return Distributed(rank, world_size, local_rank, owns), device_name


def stop(ctx: Distributed) -> None:
    """Leave the process group; its worker threads end here, not while Python shuts down."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(ctx: Distributed, value):
    """Rank 0's value on every rank (e.g. the run directory it created)."""
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(ctx: Distributed, values: list[float]) -> list[float]:
    """Element-wise sum of small per-rank numbers (losses, counts, flags) over all ranks."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def average_gradients(ctx: Distributed, parameters) -> None:
    """Every parameter's ``.grad`` replaced by its mean over all ranks, in one all-reduce of one flat buffer.

    Why not DistributedDataParallel: the training step backpropagates chunk by chunk
    (``epure.model.backward``), so a parameter's gradient is ready many times per step, which DDP's hooks
    refuse; one reduction after the backward is also all a step of this model needs to overlap.
    """
    if not ctx.enabled:
        return
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def launch_command(devices: int, argv: list[str]) -> list[str]:
    """The torchrun command that re-runs this ``epure`` invocation on ``devices`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", "epure", *argv]
