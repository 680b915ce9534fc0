"""One process per GPU under torchrun (DDP), a plain process otherwise: the distributed
context and the few collectives the loop needs. Every decision that one rank could take
alone (time limit, divergence, checkpoint due) is agreed by all-reduce (`agree_max`) or
rank 0's broadcast (`agree`) before anyone acts, so ranks never take different branches.

Nothing can hang: the process group has a timeout (`--dist-timeout`), and a rank that
fails writes a key to the c10d store (`report_failure`) that every other rank's watcher
thread (`Watcher`) sees within a fraction of a second: it prints one line, aborts the
group and exits, wherever its main thread is waiting. That holds without torchrun too
(its store then lives in rank 0: a rank 0 that dies is seen as lost contact)."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
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
    timeout_s: float = 300.0  # --dist-timeout

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str, timeout_s: float = 300.0) -> tuple[Dist, torch.device]:
    """torchrun (or a launcher that sets the same variables) sets WORLD_SIZE/RANK/
    LOCAL_RANK; NCCL on GPUs (bound to this rank's device), gloo on CPU; every collective
    and store access gives up after `timeout_s`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(
        int(os.environ.get("RANK", "0")),
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        timeout_s,
    )
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        kw: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
        if (
            device.type == "cuda"
            and "device_id" in inspect.signature(dist.init_process_group).parameters
        ):
            kw["device_id"] = device  # NCCL binds now: no guessing, eager communicators
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kw)
        except Exception as exc:  # noqa: BLE001 - rendezvous failures come in many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise KitsError(
                f"rank {d.rank}: the {world} ranks did not all meet within {timeout_s:g} s "
                f"({first}); start every rank (torchrun does), or raise --dist-timeout"
            ) from None
    return d, device


def from_main(d: Dist, make: Callable[[], Any]) -> Any:
    """`make()` on rank 0, its result on every rank (e.g. the run directory, which only
    rank 0 may choose: a timestamp per rank would name one per rank)."""
    if d.world == 1:
        return make()
    box = [make() if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def agree_max(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The element-wise largest of every rank's `values` (flags, counts), on every rank:
    what one rank alone saw (a NaN, its clock past the limit) is acted on by all."""
    if d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


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
        for k in (
            "connection closed by peer",
            "connection reset",
            "gloo",
            "nccl",
            "broken pipe",
            "timed out",
        )
    )


def peer_failure_error(exc: BaseException, d: Dist) -> KitsError | None:
    """One line for a rank that failed only because another one did: that rank's own
    message is the one that says why."""
    if d.world == 1 or not peer_failure(exc):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if "timed out" in first.lower() or "timeout" in first.lower():
        return KitsError(
            f"rank {d.rank}: another rank did not join a collective within --dist-timeout "
            f"({d.timeout_s:g} s): it is stuck or gone; every rank stops. Continue with "
            "--resume once the cause is fixed"
        )
    return KitsError(f"rank {d.rank}: another rank stopped ({first}); its own message says why")


def shutdown(d: Dist, failed: bool) -> None:
    """Leave the process group. After a failure never a barrier: the other ranks may be
    inside a broadcast or the gradient all-reduce, which a barrier does not match (the job
    would hang until the backend's timeout); abort instead, so peers fail at once and
    torchrun stops those that do not. After success every rank leaves together: tearing
    down gloo while a peer still holds its connection aborts that peer at exit."""
    if d.world == 1 or not dist.is_initialized():
        return
    if _watcher is not None:
        _watcher.stopping = True  # the store may go away as ranks leave: not a failure
    if failed:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        with contextlib.suppress(Exception):
            abort() if abort is not None else dist.destroy_process_group()
        return
    with contextlib.suppress(Exception):
        dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- fail fast

FAILED_KEY = "kits/failed"
POLL_S = 0.1  # how often a watcher looks at the store
WRITE_GRACE_S = 60.0  # how long a watcher lets a checkpoint being written finish
_watcher: Watcher | None = None
_writing = threading.Lock()  # held while rank 0 writes a checkpoint


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """A checkpoint being written: a watcher stopping this process waits for it to be
    complete (it is atomic either way; this keeps the newest one), up to WRITE_GRACE_S."""
    with _writing:
        yield


def _failed_key() -> str:
    # a restarted torchrun round shares the agent's store: its own key
    return f"{FAILED_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class Watcher(threading.Thread):
    """Watches the c10d store for another rank's failure; then prints one line, aborts
    the process group and ends this process (exit code 1), wherever its main thread
    waits. Losing the store (rank 0, which holds it without torchrun, died) counts too."""

    def __init__(self, d: Dist, store: Any, echo: Callable[[str], None]) -> None:
        super().__init__(name="kits-rank-watcher", daemon=True)
        self.d, self.store, self.echo = d, store, echo
        self.key = _failed_key()
        self.lock = threading.Lock()
        self.done = False  # this process's main thread reports its own failure, or ended
        self.exiting = False  # this watcher is ending the process
        self.stopping = False  # leaving normally: a vanished store is not a failure

    def run(self) -> None:
        while not self.done:
            try:
                if self.store.check([self.key]):
                    rank, _, why = self.store.get(self.key).decode().partition("\t")
                    if rank != str(self.d.rank):
                        self.stop(f"rank {self.d.rank}: stopping, rank {rank} failed: {why}")
            except Exception as exc:  # noqa: BLE001 - any store error means the job is gone
                if self.stopping or self.done:
                    return
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                self.stop(
                    f"rank {self.d.rank}: stopping, lost contact with the other ranks ({first})"
                )
            time.sleep(POLL_S)

    def claim(self) -> bool:
        """The main thread takes over (its own failure, or the end): the watcher stays
        quiet from now on. False when the watcher is already ending this process."""
        with self.lock:
            self.done = True
            return not self.exiting

    def stop(self, line: str) -> None:
        with self.lock:
            if self.done:
                return
            self.done = self.exiting = True
        with contextlib.suppress(Exception):
            self.echo(line)
            sys.stderr.flush()
            sys.stdout.flush()
        _writing.acquire(timeout=WRITE_GRACE_S)  # let a checkpoint being written finish
        _abort()
        os._exit(1)


def _abort() -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    with contextlib.suppress(Exception):
        abort() if abort is not None else dist.destroy_process_group()


def watch(d: Dist, echo: Callable[[str], None]) -> Watcher | None:
    """Start this rank's watcher (DDP only)."""
    global _watcher
    if d.world == 1 or not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    _watcher = Watcher(d, store, echo)
    _watcher.start()
    return _watcher


def report_failure(d: Dist, exc: BaseException) -> None:
    """This rank failed: say so in the store (the first failure's message stays), so the
    other ranks' watchers stop them within a fraction of a second; and keep this rank's
    own watcher quiet, since this rank's own message is the one it prints. Blocks for
    good when the watcher is already ending this process (so no second line)."""
    if d.world == 1 or _watcher is None:
        return
    if not _watcher.claim():
        time.sleep(60)  # the watcher is printing its line and ends this process now
        return
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    with contextlib.suppress(Exception):
        _watcher.store.compare_set(_watcher.key, "", f"{d.rank}\t{first}")


def finished(d: Dist) -> None:
    """The run ended normally on this rank: the watcher stops watching."""
    if _watcher is not None:
        _watcher.claim()
        _watcher.stopping = True
