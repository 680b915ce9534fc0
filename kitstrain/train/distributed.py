"""One process per GPU under torchrun (DDP), a plain process otherwise: the distributed
context and the few collectives the loop needs. Every decision that depends on a clock is
rank 0's, broadcast (`agree`), so ranks never take different branches."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kitsprep.errors import KitsError
from kitstrain.core.device import resolve_device
from kitstrain.train.memory import peak_memory_mb


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP without a buffer broadcast at each forward: batch-norm statistics are broadcast
    before each validation (`broadcast_buffers`), so no collective runs inside a step but
    the gradient all-reduce."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # (torch 2.13 renamed the option; both keep the one broadcast at construction)
    sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else "broadcast_buffers"
    )
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False})


def agree(d: Dist, device: torch.device, value: int) -> int:
    """Rank 0's `value` on every rank: decisions from one clock, so ranks never diverge."""
    if d.world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def smallest(d: Dist, device: torch.device, value: int) -> int:
    """The smallest `value` of all ranks (a batch size every rank can run)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather(d: Dist, obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(net: torch.nn.Module, d: Dist) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank, so all score one model."""
    if d.world > 1:
        for buf in net.buffers():
            dist.broadcast(buf, src=0)


def rank_peaks(device: torch.device, d: Dist) -> list[float] | None:
    """Every rank's peak GPU memory (MiB) since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None
    t = torch.tensor([peak_memory_mb(device)], device=device)
    if d.world > 1:
        parts = [torch.zeros_like(t) for _ in range(d.world)]
        dist.all_gather(parts, t)
        t = torch.cat(parts)
    return [round(float(v), 1) for v in t.cpu()]


def peer_failure(exc: BaseException) -> bool:
    """An error that a collective raised because another rank went away."""
    if isinstance(exc, KitsError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text
        for k in ("connection closed by peer", "connection reset", "gloo", "nccl", "broken pipe")
    )


def peer_failure_error(exc: BaseException, d: Dist) -> KitsError | None:
    """One line for a rank that failed only because another one did: that rank's own
    message is the one that says why."""
    if d.world == 1 or not peer_failure(exc):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return KitsError(f"rank {d.rank}: another rank stopped ({first}); its own message says why")


def shutdown(d: Dist, failed: bool) -> None:
    """Leave the process group. After a failure never a barrier: the other ranks may be
    inside a broadcast or the gradient all-reduce, which a barrier does not match (the job
    would hang until the backend's timeout); abort instead, so peers fail at once and
    torchrun stops those that do not. After success every rank leaves together: tearing
    down gloo while a peer still holds its connection aborts that peer at exit."""
    if d.world == 1 or not dist.is_initialized():
        return
    if failed:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        with contextlib.suppress(Exception):
            abort() if abort is not None else dist.destroy_process_group()
        return
    with contextlib.suppress(Exception):
        dist.barrier()
    dist.destroy_process_group()
