"""A build that nothing loses and nothing blocks: a full disk at its final write, an
unreadable commit record, workers and locks after a kill -9, hostile NIfTI files (a
decompression bomb, a FIFO for a mask, a broken case link, a NaN affine, no read
permission), and store damage that only whole-store checks see. Each ends in a build that
--resume completes, or in one line, exit 1."""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep import lifeline
from kitsprep.cases import find_cases, read_volume
from kitsprep.cli import main
from kitsprep.errors import KitsError
from kitsprep.store import SliceReader, open_store
from kitsprep.verify import verify_store
from tests.kitsprep.conftest import (
    assert_same_store,
    kits_affine,
    read_store,
    write_case,
    write_cohort,
    write_nifti,
)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def build_cmd(src: Path, out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kitsprep.cli",
        "build",
        "--src",
        str(src),
        "--out",
        str(out),
        "--size",
        "32",
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safety")
    src = write_cohort(root / "src", n=3)
    out = root / "ref.h5"
    assert run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1).exit_code == 0
    return src, out


# --------------------------------------------------------------------------- final write


def test_a_full_disk_at_the_final_write_is_one_line_and_resume_finishes(
    built, tmp_path: Path
) -> None:
    """Killed just before finalize (the journal saved), then resumed under a file-size
    limit that the final write would pass: one line, exit 1, no crash inside HDF5; resumed
    again without the limit: the uninterrupted store."""
    src, ref = built
    out = tmp_path / "s.h5"
    names = tmp_path / "points"
    p = subprocess.run(
        build_cmd(src, out, "--workers", 1),
        env={**ENV, "KITS_FAILPOINT_LOG": str(names)},
        capture_output=True,
    )
    assert p.returncode == 0
    at = names.read_text().splitlines().index("rename finalize.journal") + 1
    out.unlink()
    p = subprocess.run(build_cmd(src, out, "--workers", 1), env={**ENV, "KITS_FAILPOINT": str(at)})
    assert p.returncode == -signal.SIGKILL
    store = out.with_name("s.h5.partial") / "store.h5"
    limit = store.stat().st_size + 64

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    p = subprocess.run(
        build_cmd(src, out, "--resume"), env=ENV, capture_output=True, text=True, preexec_fn=cap
    )
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "is full" in lines[0] and "--resume" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run(build_cmd(src, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert_same_store(read_store(out), read_store(ref))
    assert verify_store(out, src).ok


def test_an_unreadable_commit_record_is_redone_with_a_line(built, tmp_path: Path) -> None:
    src, ref = built
    out = tmp_path / "s.h5"
    names = tmp_path / "points"
    subprocess.run(
        build_cmd(src, out, "--workers", 1),
        env={**ENV, "KITS_FAILPOINT_LOG": str(names)},
        capture_output=True,
    )
    at = names.read_text().splitlines().index("rename finalize.journal")  # the point before
    out.unlink()
    p = subprocess.run(build_cmd(src, out, "--workers", 1), env={**ENV, "KITS_FAILPOINT": str(at)})
    assert p.returncode == -signal.SIGKILL
    cases = out.with_name("s.h5.partial") / "cases"
    (cases / "case_00001.npz").write_bytes(b"")  # emptied by a crash before fsync
    (cases / "case_00002.npz").write_bytes((cases / "case_00002.npz").read_bytes()[:100])
    r = run("build", "--src", src, "--out", out, "--size", 32, "--resume")
    assert r.exit_code == 0, r.output
    assert "case_00001.npz is unreadable" in r.output and "redoing case_00001" in r.output
    assert "redoing case_00002" in r.output
    assert_same_store(read_store(out), read_store(ref))


# --------------------------------------------------------------------------- orphans, locks


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_a_killed_build_leaves_no_worker_and_no_lock(tmp_path: Path) -> None:
    src = write_cohort(tmp_path / "src", n=6, shapes={i: (60, 128, 128) for i in range(6)})
    out = tmp_path / "s.h5"
    p = subprocess.Popen(
        build_cmd(src, out, "--workers", 2, "--size", 96),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.time() < deadline and p.poll() is None:
        workers = _children(p.pid)
        time.sleep(0.01)
    assert workers, "the build never started its workers"
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while not all(_gone(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert all(_gone(w) for w in workers), "workers outlived the killed build"
    r = run("build", "--src", src, "--out", out, "--size", 96, "--workers", 1, "--resume")
    assert "is running" not in r.output
    assert r.exit_code == 0, r.output  # the lock died with the build


def test_die_with_parent_ends_a_grandchild_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import os, sys, time\n"
        "from kitsprep.lifeline import die_with_parent\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    die_with_parent()\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    p.kill()
    p.wait()
    deadline = time.time() + 5
    while not _gone(child) and time.time() < deadline:
        time.sleep(0.02)
    assert _gone(child)
    assert lifeline.die_with_parent(os.getppid()) in (True, False)


# --------------------------------------------------------------------------- hostile NIfTI


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    """A header describing 4x16x16 float32 voxels followed by 256 MiB of zeros in the
    stream: refused naming the case and both sizes, having inflated no more than the
    header's size."""
    raw = write_nifti(tmp_path / "x.nii", np.zeros((4, 16, 16), np.float32), kits_affine())
    path = tmp_path / "case_00003" / "imaging.nii.gz"
    path.parent.mkdir()
    co = __import__("zlib").compressobj(6, 8, 31)
    with open(path, "wb") as f:
        f.write(co.compress(raw.read_bytes()))
        for _ in range(16):
            f.write(co.compress(bytes(16 << 20)))
        f.write(co.flush())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        KitsError, match=r"case_00003: imaging.nii.gz inflates to more than the 4448 bytes"
    ) as e:
        read_volume(path, "case_00003")
    assert "gzip trailer records" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB
    path.write_bytes(gzip.compress(raw.read_bytes() + b"\1" * 10))  # a few bytes too many
    with pytest.raises(KitsError, match="inflates to more than"):
        read_volume(path, "case_00003")


def test_masks_and_cases_that_are_not_files_or_folders_are_named(tmp_path: Path) -> None:
    src = write_cohort(tmp_path / "src", n=2)
    seg = src / "case_00001" / "segmentation.nii.gz"
    seg.unlink()
    os.mkfifo(seg)
    with pytest.raises(KitsError, match=r"case_00001: .*segmentation.nii.gz is a FIFO"):
        find_cases(src)
    seg.unlink()
    seg.mkdir()
    with pytest.raises(KitsError, match="is a folder, not a regular file"):
        find_cases(src)
    seg.rmdir()
    (src / "case_00007").symlink_to(tmp_path / "nowhere")
    (src / "case_00008").symlink_to(src / "case_00008")
    r = run("build", "--src", src, "--out", tmp_path / "s.h5", "--size", 32, "--workers", 1)
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if "not folders one can open" in ln]
    assert len(warn) == 1
    assert "case_00007 (a broken symlink)" in warn[0] and "case_00008 (a symlink loop)" in warn[0]


def test_a_nan_affine_and_an_unreadable_file_are_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(-100, 100, (4, 16, 16)).astype(np.float32)
    folder = write_case(tmp_path / "src", 0, image, np.zeros((4, 16, 16), np.uint8))
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):  # NaN slice spacing, qform only
        raw = bytearray(gzip.decompress((folder / name).read_bytes()))
        raw[80:84] = np.float32(np.nan).tobytes()  # pixdim[1]
        raw[254:256] = np.int16(0).tobytes()  # sform_code: the qform (with pixdim) rules
        (folder / name).write_bytes(gzip.compress(bytes(raw)))
    r = run("build", "--src", tmp_path / "src", "--out", tmp_path / "s.h5", "--size", 16)
    # named as the NaN spacing it is (never as "imaging and segmentation affines differ")
    msg = one_line(r, "case_00000", "voxel spacing (nan, 0.8, 0.8)")
    assert "differ" not in msg and "imaging.nii.gz" in msg
    write_case(tmp_path / "ok", 0, image, np.zeros((4, 16, 16), np.uint8))
    real = os.access
    monkeypatch.setattr(
        "kitsprep.cases.os.access",
        lambda p, mode: not str(p).endswith("imaging.nii.gz") and real(p, mode),
    )
    r = run("build", "--src", tmp_path / "ok", "--out", tmp_path / "t.h5", "--size", 16)
    one_line(r, "case_00000", "permission denied")


# --------------------------------------------------------------------------- integrity


def _damage(store: Path, tmp_path: Path, how) -> Path:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(store.read_bytes())
    with h5py.File(bad, "r+") as f:
        how(f)
    return bad


def _edit_index(col: str, row: int, value: int):
    def how(f):
        idx = f["index"][...]
        idx[col][row] = value
        del f["index"]
        f.create_dataset("index", data=idx)

    return how


@pytest.mark.parametrize(
    "how, found",
    [
        (
            lambda f: f.attrs.__setitem__("window", f.attrs["window"].replace("-79", "-89")),
            "checksum",
        ),
        (_edit_index("case", 2, 7), "names case #7"),
        (_edit_index("image_offset", 1, -4), "image offset lies outside the file"),
        (_edit_index("label_nbytes", 3, -1), "label chunk"),
        (_edit_index("image_offset", 1, 1 << 40), "image offset lies outside the file"),
    ],
)
def test_store_damage_that_only_whole_store_checks_see(built, tmp_path: Path, how, found) -> None:
    _, store = built
    bad = _damage(store, tmp_path, how)
    with pytest.raises(KitsError, match="is damaged: .*run `kitsprep verify"):
        open_store(bad)
    r = run("info", bad)
    one_line(r, "is damaged")
    r = run("verify", bad)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert any(found in ln for ln in r.output.splitlines() if ln.startswith("FAIL")), r.output


def test_a_row_pointing_at_another_slice_with_its_crc_is_caught(built, tmp_path: Path) -> None:
    _, store = built
    info = open_store(store)

    def how(f):
        idx = f["index"][...]
        idx["image_offset"][1] = idx["image_offset"][2]
        idx["image_crc"][1] = idx["image_crc"][2]
        del f["index"]
        f.create_dataset("index", data=idx)

    bad = _damage(store, tmp_path, how)
    with pytest.raises(KitsError, match="two index rows point at the same image chunk"):
        open_store(bad)
    assert info.problems == ()


def test_a_store_replaced_under_a_reader_is_named_replaced(built, tmp_path: Path) -> None:
    src, store = built
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    info = open_store(path)
    r = run("build", "--src", src, "--out", path, "--size", 32, "--overwrite", "--cases", "0-1")
    assert r.exit_code == 0, r.output
    with pytest.raises(KitsError, match="was replaced while in use"):
        SliceReader(path, info.size, info.case_ids, identity=info.identity)
    assert json.loads(json.dumps(list(info.identity)))  # plain ints: pickles to workers
