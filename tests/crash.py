"""The crash sweep, in the spirit of SQLite's crash tests: run a command once to list its
named write/rename/fsync points (`kitsprep.failpoints`), then for every N kill a fresh
run with SIGKILL at its Nth point, run the same command with --resume, and check that the
result equals the uninterrupted run's: the same store, which `verify --src` passes
(build); the same validation Dice and exported weights, each step logged once (fit).

One process imports everything once and forks a child per run, so a point costs a fork,
not an interpreter start. Run by tests/test_crash.py; by hand:

    python -m tests.crash build WORKDIR     # or fit; prints a JSON summary
    python -m tests.crash build WORKDIR --h5-writes   # every HDF5 write of the final write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kitsprep import failpoints

CASES = [(6, 64, 64), (5, 64, 64), (7, 64, 64), (4, 64, 64)]
SIZE = 64
FIT = [
    "--device", "cpu", "--workers", "0", "--batch-size", "4", "--samples-per-epoch", "8",
    "--width", "4", "--depth", "2", "--max-steps", "3", "--val-every", "2", "--seed", "0",
    "--precision", "fp32", "--train-cases", "0-2", "--val-cases", "3", "--log-every", "1",
]  # fmt: skip


def write_source(src: Path) -> Path:
    from tests.conftest import blob_labels, write_kits_case

    rng = np.random.default_rng(0)
    for i, shape in enumerate(CASES):
        hu = rng.uniform(-300, 500, shape).astype(np.float32)
        write_kits_case(src, f"case_{i:05d}", hu, blob_labels(shape, i))
    return src


def in_child(job: Callable[[], int], kill_at: int | None = None, log: str | None = None) -> int:
    """Run `job` in a forked child (stdout and stderr to the log of the sweep); its exit code,
    or -signal when it was killed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if "torch" in sys.modules:  # one thread: the same sums in every run
                sys.modules["torch"].set_num_threads(1)
            failpoints.arm(kill_at, log)
            code = job()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported as a failed run
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def cli(main, args: list[str]) -> Callable[[], int]:
    def job() -> int:
        main([str(a) for a in args], standalone_mode=False)
        return 0

    return job


def points(job: Callable[[], int], work: Path) -> list[str]:
    log = work / "points.log"
    log.unlink(missing_ok=True)
    code = in_child(job, log=str(log))
    assert code == 0, f"the uninterrupted run failed ({code})"
    return log.read_text().splitlines()


# --------------------------------------------------------------------------- build


def build_sweep(work: Path, h5_writes: bool = False) -> dict:
    from kitsprep.cli import main

    src = write_source(work / "src")
    ref, out = work / "ref.h5", work / "s.h5"
    args = ["build", "--src", src, "--size", SIZE, "--workers", 1]
    # here, not in a child: the kernels are then loaded once, and every child has them
    assert cli(main, [*args, "--out", ref])() == 0
    if h5_writes:
        _count_h5_writes()
    names = points(cli(main, [*args, "--out", out]), work)
    results = []
    for n, name in enumerate(names, 1):
        if not h5_writes or name.startswith("h5 write"):
            _clear_build(out)
            killed = in_child(cli(main, [*args, "--out", out]), kill_at=n)
            ok = in_child(lambda: _resume_build(main, args, out, ref, src)) == 0
            results.append({"point": n, "name": name, "killed": killed, "resumed": ok})
    return {"points": len(names), "swept": results}


def _clear_build(out: Path) -> None:
    for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".lock")):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _resume_build(main, args: list, out: Path, ref: Path, src: Path) -> int:
    import h5py

    import kitsprep.store.write as write
    from kitsprep.verify import verify_store
    from tests.kitsprep.conftest import assert_same_store, read_store

    write.h5py = h5py  # the resume writes as a build does (`_count_h5_writes` is the kill's)
    main([str(a) for a in [*args, "--out", out, "--resume"]], standalone_mode=False)
    assert verify_store(out, src).ok, "verify --src fails"
    assert_same_store(read_store(out), read_store(ref))
    assert not out.with_name(out.name + ".partial").exists()
    return 0


def _count_h5_writes() -> None:
    """The final write through a file object that counts each HDF5 write as a point (h5py's
    fileobj driver): a kill then lands between any two of HDF5's own writes."""
    import h5py

    import kitsprep.store.write as write

    class Counted:
        def __init__(self, path: Path, mode: str) -> None:
            self.f = open(path, mode)

        def write(self, b) -> int:
            failpoints.hit("h5 write")
            return self.f.write(b)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    real = h5py.File

    def file(path, mode="r", **kw):
        if mode == "r+":
            return real(Counted(path, "r+b"), mode, **kw)
        return real(path, mode, **kw)

    write.h5py = type("h5", (), {**vars(h5py), "File": staticmethod(file)})


# --------------------------------------------------------------------------- fit


def fit_sweep(work: Path) -> dict:
    import torch

    import kitstrain.report.plots as plots
    import kitstrain.train.fit  # noqa: F401 - imported once, here, for every child
    from kitsprep.cli import main as prep
    from kitsprep.files import write_atomic
    from kitstrain.cli import main

    # Drawing the curves is most of a tiny run's time and none of its state: each
    # validation still writes curves.png atomically (its two points), without matplotlib.
    def plot_curves(run_dir: Path, path: Path | None = None) -> Path:
        path = Path(path or Path(run_dir) / "curves.png")
        return write_atomic(path, f"{len(plots.runlib.read_metrics(run_dir))} records\n")

    plots.plot_curves = plot_curves
    torch.set_num_threads(1)
    src = write_source(work / "src")
    store = work / "s.h5"
    assert cli(prep, ["build", "--src", src, "--out", store, "--size", SIZE])() == 0
    ref, run = work / "ref", work / "run"
    # the reference here, not in a child: every child then starts warm
    assert cli(main, ["fit", store, "--out", ref, *FIT])() == 0
    want = fit_result(ref)
    names = points(cli(main, ["fit", store, "--out", run, *FIT]), work)
    results = []
    for n, name in enumerate(names, 1):
        shutil.rmtree(run, ignore_errors=True)
        killed = in_child(cli(main, ["fit", store, "--out", run, *FIT]), kill_at=n)
        code = in_child(cli(main, ["fit", store, "--out", run, *FIT, "--resume"]))
        got = fit_result(run) if code == 0 else None
        results.append({"point": n, "name": name, "killed": killed, "resumed": got == want})
    return {"points": len(names), "swept": results}


def fit_result(run: Path) -> dict | None:
    """What must not depend on where a run was killed: the validations' Dice, the exported
    weights, the steps logged (once each), and no temporary file left."""
    from safetensors import safe_open

    from kitstrain.core import rundir

    weights = rundir.weights_path(run)
    if not weights.is_file():
        return None
    records = rundir.read_metrics(run, warn=None)
    with safe_open(str(weights), "np") as f:  # tensors and metadata (its order varies)
        exported = (f.metadata(), {k: f.get_tensor(k).tobytes().hex() for k in f.keys()})
    return {
        "val": [(r["step"], r["mean_dice"], r.get("final")) for r in records if r["kind"] == "val"],
        "train": [r["step"] for r in records if r["kind"] == "train"],
        "weights": exported,
        "best": (run / "checkpoints" / "best.pt").is_file(),
        "temporaries": sorted(p.name for p in run.rglob("*.tmp")),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["build", "fit"])
    ap.add_argument("work", type=Path)
    ap.add_argument("--h5-writes", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    logs = open(a.work / "children.log", "w")  # the children's output, not the summary's
    summary_fd = os.dup(1)
    os.dup2(logs.fileno(), 1)
    os.dup2(logs.fileno(), 2)
    summary = build_sweep(a.work, a.h5_writes) if a.what == "build" else fit_sweep(a.work)
    os.write(summary_fd, (json.dumps(summary) + "\n").encode())


if __name__ == "__main__":
    main()
