"""The run directory: its lock, preparing and dropping unstarted runs, atomic checkpoints,
and a training checkpoint's round trip (weights, optimizer, state, RNG streams)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kitsprep.errors import KitsError
from kitstrain.core import rundir
from kitstrain.core.rundir import State

ROOT = Path(__file__).resolve().parents[3]
_CONTENDER = """
import sys, time
from pathlib import Path
from kitsprep.errors import KitsError
from kitstrain.core import rundir
start = Path(sys.argv[2])
while not start.exists():
    time.sleep(0.001)
try:
    rundir.acquire_lock(Path(sys.argv[1]))
    print("took", flush=True)
except KitsError as exc:
    print("busy", exc, flush=True)
sys.stdin.read()
"""


def _contender(run_dir: Path, start: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CONTENDER, str(run_dir), str(start)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_lock_is_taken_by_one_process_of_many_and_freed_by_death(tmp_path: Path) -> None:
    """Processes released at once: exactly one takes the run directory, the others are told
    who holds it; once the holder is killed the lock is free at once, though its file (with
    the dead pid) is still there."""
    start = tmp_path / "go"
    procs = [_contender(tmp_path, start) for _ in range(6)]
    time.sleep(1.0)  # all started and polling
    start.touch()
    answers = [p.stdout.readline().strip() for p in procs]
    took = [p for p, a in zip(procs, answers, strict=True) if a == "took"]
    assert len(took) == 1, answers
    assert all(f"in use by process {took[0].pid}" in a for a in answers if a != "took")
    took[0].kill()
    took[0].wait()
    for p in procs:
        p.stdin.close()
        p.wait()
    assert (tmp_path / rundir.LOCK).read_text() == str(took[0].pid)  # left by the killed one
    rundir.acquire_lock(tmp_path)
    with pytest.raises(KitsError, match=f"in use by process {os.getpid()}"):
        rundir.acquire_lock(tmp_path)  # a record lock does not exclude its own process: kept
    rundir.release_lock(tmp_path)
    assert not (tmp_path / rundir.LOCK).exists()


def test_prepare_refuses_what_it_cannot_continue_and_drops_what_it_did_not_start(
    tmp_path: Path,
) -> None:
    run_dir = rundir.prepare(tmp_path / "new", resume=False, main=True)
    assert (run_dir / rundir.LOCK).read_text() == str(os.getpid())
    rundir.release_lock(run_dir)
    rundir.drop_unstarted(run_dir)  # refused before its config: no empty run left
    assert not run_dir.exists()
    with pytest.raises(KitsError, match="holds no run"):
        rundir.prepare(tmp_path / "none", resume=True, main=True)
    started = tmp_path / "started"
    started.mkdir()
    rundir.write_json(started / rundir.CONFIG, {})
    with pytest.raises(KitsError, match="--resume"):
        rundir.prepare(started, resume=False, main=True)
    assert rundir.prepare(started, resume=True, main=False) == started  # rank > 0: no lock
    assert not (started / rundir.LOCK).exists()


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temporary(
    tmp_path: Path,
) -> None:
    path = rundir.checkpoint_path(tmp_path, "last")
    rundir.save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for a lambda
        rundir.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "bad": lambda: 0})
    assert torch.equal(rundir.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_training_checkpoint_round_trips_and_a_ddp_oom_lowers_the_micro_batch(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = State(step=7, epoch=1, step_in_epoch=2, elapsed=3.5, best=0.4, micro_batch=8)
    rngs = [rundir.rng_state(torch.device("cpu"))]
    expected = torch.rand(3)
    payload = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": {},
        "state": json.dumps(state.__dict__),
        "rng": {"ranks": rngs},
    }
    rundir.save_training(tmp_path, ["last", "best"], payload)
    assert (tmp_path / rundir.CHECKPOINTS / rundir.WEIGHTS_FILE).is_file()

    torch.manual_seed(1)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    restored = rundir.restore_training(tmp_path, fresh, fresh_opt, None, 0, torch.device("cpu"))
    assert restored == state
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), fresh.parameters(), strict=True))
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(3), expected)  # the streams continue where they were saved
    rundir.record_oom(tmp_path, step=8, rank=1, micro_batch=4)
    restored = rundir.restore_training(tmp_path, fresh, fresh_opt, None, 0, torch.device("cpu"))
    assert restored.micro_batch == 4


def test_nonfinite_weights_never_reach_a_checkpoint(tmp_path: Path) -> None:
    rundir.append_metrics(tmp_path, {"kind": "train", "step": 3, "loss": 1.25})
    weights = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(KitsError, match=r"by step 5: .* 1 NaN/Inf .*loss 1.25 at step 3"):
        rundir.refuse_nonfinite(tmp_path, weights, 5)
    rundir.refuse_nonfinite(tmp_path, {"w": torch.ones(2)}, 5)
