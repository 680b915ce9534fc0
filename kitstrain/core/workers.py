"""How many loader workers a rank starts: `--workers auto` sizes them to the machine, and a
count no machine could use is refused before a single process starts."""

from __future__ import annotations

import os

from kitsprep.errors import KitsError

__all__ = ["AUTO_WORKERS_CAP", "OVERSUBSCRIBE", "local_ranks", "resolve_workers", "usable_cores"]

AUTO_WORKERS_CAP = 16  # past this the pool's shared memory grows and gains are small
OVERSUBSCRIBE = 4  # a count above this many times the usable cores is refused


def local_ranks() -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def usable_cores(ranks: int | None = None) -> tuple[int, int]:
    """(cores this process may run on, the share of them one rank may use): the affinity
    mask (a container's or `taskset`'s limit, not the machine's count) over local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return cores, max(1, cores // (ranks or local_ranks()))


def resolve_workers(value: int | str, ranks: int | None = None) -> tuple[int, str]:
    """(worker count, why). 'auto' is the rank's cores minus one (the training process
    needs one), at least 1, at most `AUTO_WORKERS_CAP`. A count above `OVERSUBSCRIBE` x the
    rank's cores is refused in one line naming both numbers."""
    ranks = ranks or local_ranks()
    cores, mine = usable_cores(ranks)
    per = f"{cores} usable core(s)" + (f" / {ranks} local ranks = {mine}" if ranks > 1 else "")
    if value == "auto":
        n = min(AUTO_WORKERS_CAP, max(1, mine - 1))
        return n, f"auto: {per}, minus one for the training process (1..{AUTO_WORKERS_CAP})"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KitsError(f"--workers must be 'auto' or a count >= 0, found {value!r}")
    limit = OVERSUBSCRIBE * mine
    if value > limit:
        raise KitsError(
            f"--workers {value} is more than {OVERSUBSCRIBE}x the {mine} core(s) this rank may "
            f"use ({limit} at most); use --workers auto or a count up to {limit}"
        )
    return value, f"given: --workers {value} ({per})"
