"""Processes under torchrun (PyTorch's launcher, one process per GPU or per CPU worker): this process's
rank and the world, setting up and ending the process group, the collectives the rest of the
project uses (each a no-op in a plain single-process run), finiteness decided on every process
at once (as a device tensor), and the check that every process holds the same weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from errors import UserError


def is_distributed() -> bool:
    """Whether a process group is running (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the only process that prints, logs and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> tuple[torch.device, DistInfo]:
    """Under torchrun (WORLD_SIZE > 1 in the environment) the initialized process group: NCCL
    with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU; returns the device this process
    uses. A plain `python script.py` run is not distributed and is unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: start at most "
                            "that many processes per node (--nproc_per_node).")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    global _host_group
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if _host_group is None and dist.get_backend() != "gloo":
        # Host values (a stop request, a count of bad files) agree over gloo on CPU tensors: over
        # NCCL each would be copied to the GPU and back, waiting for its queue every step.
        _host_group = dist.new_group(backend="gloo")
    return device, DistInfo(rank, local, world)


_host_group = None  # a gloo group beside an NCCL one (None: the default group is gloo already)


def cleanup_distributed() -> None:
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over processes, in place (t itself when not distributed)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_max(value: float) -> float:
    """The largest of the processes' values (the value itself when not distributed): a host value
    agreed on the host, never waiting for a GPU."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return t.item()


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every process, in place (random choices made per process must agree)."""
    if is_distributed():
        dist.broadcast(t, 0)
    return t


def all_finite(losses: Sequence[torch.Tensor], grad_norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every loss and every gradient (given by its norm) is finite, on every process: a
    0-dim bool tensor on the device, never read back to the host here."""
    flags = [torch.isfinite(torch.stack([loss.detach().float() for loss in losses])).all()]
    if grad_norms:
        flags.append(torch.isfinite(torch.stack(list(grad_norms))).all())
    ok = torch.stack(flags).all()
    if is_distributed():
        agreed = ok.float().reshape(1)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        ok = agreed[0] > 0
    return ok


@torch.no_grad()
def replicas_identical(module: torch.nn.Module, buffers: bool = True) -> bool:
    """Whether every process holds exactly rank 0's parameters (and buffers) (True when not
    distributed). A discriminator's BatchNorm running statistics are each process's own (they
    are not broadcast; see training_vqgan.build_stage1), so pass buffers=False for it."""
    if not is_distributed():
        return True
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor([float(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
