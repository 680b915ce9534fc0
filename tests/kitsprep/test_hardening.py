"""What an adversarial user or the machine does to a build: a kill during finalize, a
second build at once, a huge case range, a repaired case, an --out inside the source, a full
disk, damaged stores; each ends in a working --resume or one line, exit 1."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep import locks
from kitsprep.cli import main
from kitsprep.store import open_store, superblock
from tests.kitsprep.conftest import (
    assert_same_store,
    kits_affine,
    read_store,
    write_case,
    write_cohort,
)

ROOT = Path(__file__).resolve().parents[2]


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> str:
    """Exit 1, exactly one `Error:` line holding the needles, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hard")
    src = write_cohort(root / "src", n=2)
    out = root / "s.h5"
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--no-fsync")
    assert r.exit_code == 0, r.output
    return src, out


# --------------------------------------------------------------------------- item 2


def test_resume_after_a_kill_during_finalize(built, tmp_path: Path) -> None:
    """finalize killed with the file open for write: --resume redoes it from the commit
    records, and the store equals an uninterrupted build."""
    src, reference = built
    out = tmp_path / "k.h5"
    script = textwrap.dedent("""
        import os, signal, sys
        import h5py
        import kitsprep.build.finish as finish
        def die(path, written, bad, *rest):
            f = h5py.File(path, "r+")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        finish.finalize = die
        from kitsprep.cli import main
        main(sys.argv[1:])
    """)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "build",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            "32",
            "--workers",
            "1",
            "--no-fsync",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -9, p.stderr
    partial = tmp_path / "k.h5.partial" / "store.h5"
    assert superblock.read_superblock(partial)[0][11] != 0  # left "open for write"
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert "2 cases from the interrupted run" in r.output
    volatile = ("build", "kitsprep_version")
    assert_same_store(read_store(out, volatile), read_store(reference, volatile))


def test_clearing_the_write_flags_redoes_the_superblock_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w", libver=("v110", "latest")) as f:
        f.attrs["a"] = 1
    raw, body = superblock.read_superblock(path)
    assert superblock.lookup3(bytes(raw[:body])) == int.from_bytes(raw[body : body + 4], "little")
    assert not superblock.clear_write_flags(path)  # closed cleanly: nothing to clear
    raw[11] = 1
    raw[body : body + 4] = superblock.lookup3(bytes(raw[:body])).to_bytes(4, "little")
    path.write_bytes(bytes(raw[: body + 4]) + path.read_bytes()[body + 4 :])
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    assert superblock.clear_write_flags(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["a"] == 1


# --------------------------------------------------------------------------- item 9


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock at `path` (`kitsprep.locks`) until its stdin closes."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kitsprep import locks; locks.take(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_concurrent_build_is_told_the_first_is_running(built, tmp_path: Path) -> None:
    src, _ = built
    out = tmp_path / "c.h5"
    holder = hold_lock(out.with_name("c.h5.lock"))
    try:
        r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1)
        assert_user_error(r, "a build of", f"is running (process {holder.pid})")
        assert not (tmp_path / "c.h5.partial").exists()
        # a record lock: not inherited, and this process cannot take it twice either
        with pytest.raises(locks.LockBusy):
            locks.take(out.with_name("c.h5.lock"))
    finally:
        holder.stdin.close()
        holder.wait()
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--no-fsync")
    assert r.exit_code == 0, r.output
    assert not out.with_name("c.h5.lock").exists()


def test_a_truncated_store_is_called_truncated(built, tmp_path: Path) -> None:
    _, store = built
    cut = tmp_path / "cut.h5"
    cut.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    assert_user_error(run("info", cut), "is truncated", f"holds {cut.stat().st_size} bytes")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert_user_error(run("info", empty), "is not an HDF5 file")


@pytest.mark.parametrize("command", ["info", "verify"])
def test_torn_hdf5_metadata_is_one_line(built, tmp_path: Path, command: str) -> None:
    """A metadata checksum error (KeyError from h5py) in every object header."""
    _, store = built
    data = store.read_bytes()
    for k, at in enumerate(m.start() for m in re.finditer(b"OHDR", data)):
        bad = bytearray(data)
        bad[at + 20] ^= 0xFF
        path = tmp_path / f"torn{k}.h5"
        path.write_bytes(bytes(bad))
        r = run(command, path)
        if r.exit_code == 0:  # an object `info` never opens
            continue
        assert_user_error(r, str(path))


# --------------------------------------------------------------------------- item 4


def test_a_huge_case_range_is_checked_not_expanded() -> None:
    """Under a 3 GB address-space cap, so that a range expanded in full fails fast with a
    MemoryError instead of taking the machine's memory."""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from kitsprep.cases import parse_case_spec
        from kitsprep.errors import KitsError
        for available in (["case_00000", "case_00001"], None):
            try:
                parse_case_spec("0-999999999999", available)
            except KitsError as exc:
                print(exc)
        print(parse_case_spec("1-3,0", [f"case_{i:05d}" for i in range(5)]))
    """)
    p = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-500:]
    lines = p.stdout.splitlines()
    assert "names 999999999998 case(s) that are not there" in lines[0]
    assert "5 digits" in lines[1]
    assert lines[2] == "['case_00000', 'case_00001', 'case_00002', 'case_00003']"


# --------------------------------------------------------------------------- item 5


def _failed_build(tmp_path: Path) -> tuple[Path, Path]:
    """Three cases, the last one corrupt: the build stops with two committed."""
    src = write_cohort(tmp_path / "src", n=3)
    img = src / "case_00002" / "imaging.nii.gz"
    img.write_bytes(img.read_bytes()[:-40])
    out = tmp_path / "r.h5"
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--no-fsync")
    assert_user_error(r, "case_00002", "--resume")
    return src, out


def test_resume_refuses_a_repaired_case_of_another_slice_count(tmp_path: Path) -> None:
    src, out = _failed_build(tmp_path)
    rng = np.random.default_rng(1)
    write_case(
        src,
        2,
        rng.uniform(-100, 100, (9, 24, 24)),
        np.zeros((9, 24, 24), np.uint8),
        kits_affine(3.0, 0.8),
    )
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--resume")
    assert_user_error(r, "case_00002 changed", "now has 9 slices", "--overwrite")


def test_resume_redoes_a_committed_case_whose_source_changed(tmp_path: Path) -> None:
    src, out = _failed_build(tmp_path)
    rng = np.random.default_rng(2)
    write_case(
        src,
        2,
        rng.uniform(-100, 100, (6, 24, 24)),
        np.zeros((6, 24, 24), np.uint8),
        kits_affine(3.0, 0.8),
    )  # repaired, same slice count as planned
    image = rng.uniform(-100, 100, (4, 24, 24)).astype(np.float32)
    write_case(src, 0, image, np.ones((4, 24, 24), np.uint8), kits_affine(1.0, 0.7))
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert "case_00000: 4 slices" in r.output  # redone, not "done in an earlier run"
    assert run("verify", out, "--src", src).exit_code == 0


# --------------------------------------------------------------------------- items 7, 8


def test_out_inside_src_is_refused_and_the_scan_survives(built) -> None:
    src, _ = built
    scan = src / "case_00001" / "imaging.nii.gz"
    before = scan.read_bytes()
    r = run("build", "--src", src, "--out", scan, "--overwrite", "--size", 32)
    assert_user_error(r, "is inside --src")
    assert scan.read_bytes() == before


@pytest.mark.parametrize("where", ["parent_is_file", "proc"])
def test_an_unwritable_out_is_one_line(built, tmp_path: Path, where: str) -> None:
    src, store = built
    out = store / "x.h5" if where == "parent_is_file" else Path("/proc/kits-test/x.h5")
    assert_user_error(run("build", "--src", src, "--out", out, "--size", 32), str(out))


def test_a_full_disk_is_one_line_and_resume_then_works(
    built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kitsprep.build.case as case_mod

    src, _ = built
    out = tmp_path / "full.h5"
    real = case_mod._write_runs

    def full(fd, buf, offsets):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(case_mod, "_write_runs", full)
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1)
    assert_user_error(r, "is full", "--resume")
    assert not out.exists()
    monkeypatch.setattr(case_mod, "_write_runs", real)
    r = run("build", "--src", src, "--out", out, "--size", 32, "--workers", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert open_store(out).case_ids == ["case_00000", "case_00001"]


def test_a_volume_with_no_slices_is_one_line(tmp_path: Path) -> None:
    write_case(tmp_path / "src", 0, np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), np.uint8))
    r = run("build", "--src", tmp_path / "src", "--out", tmp_path / "z.h5", "--size", 32)
    assert_user_error(r, "case_00000", "empty volume")


def test_a_negative_label_is_named_as_such(tmp_path: Path) -> None:
    seg = np.zeros((3, 8, 8), np.int16)
    seg[1, 2, 2] = -1
    write_case(tmp_path / "src", 0, np.zeros((3, 8, 8), np.float32), seg, mask_dtype=np.int16)
    r = run(
        "build", "--src", tmp_path / "src", "--out", tmp_path / "n.h5", "--size", 32, "--workers", 1
    )
    assert_user_error(r, "case_00000", "holds label value(s) -1,")


# --------------------------------------------------------------------------- newcomer


def test_misnamed_case_folders_are_listed_once(built, tmp_path: Path) -> None:
    src, _ = built
    odd = tmp_path / "src"
    odd.mkdir()
    for name in ("case_00000", "case_0001", "case_00001_copy"):
        (odd / name).symlink_to(src / "case_00000", target_is_directory=True)
    r = run("build", "--src", odd, "--out", tmp_path / "m.h5", "--size", 32, "--workers", 1)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if "not named case_XXXXX" in ln]
    assert len(warnings) == 1 and "case_0001" in warnings[0] and "case_00001_copy" in warnings[0]


def test_a_size_the_default_unet_cannot_halve_warns_at_build(built, tmp_path: Path) -> None:
    src, _ = built
    r = run(
        "build",
        "--src",
        src,
        "--out",
        tmp_path / "w.h5",
        "--size",
        40,
        "--workers",
        1,
        "--cases",
        "0",
    )
    assert r.exit_code == 0, r.output
    assert "warning: --size 40 cannot be halved 4 times" in r.output
    assert "use a multiple of 16" in r.output
    r = run(
        "build",
        "--src",
        src,
        "--out",
        tmp_path / "v.h5",
        "--size",
        32,
        "--workers",
        1,
        "--cases",
        "0",
    )
    assert "cannot be halved" not in r.output


def test_the_kernels_are_warmed_with_the_builds_own_specialisations(tmp_path: Path) -> None:
    """After the warm-up the build compiles nothing more, so its rate excludes compiling."""
    from kitsprep.build import run as run_mod
    from kitsprep.cases import find_cases
    from kitsprep.kernels import image, labels, nonfinite
    from kitsprep.window import WINDOW_PRESETS

    src = write_cohort(tmp_path / "src", n=2)  # float32 + uint8 and int16 + uint16 cases
    run_mod._warm_kernels(find_cases(src), WINDOW_PRESETS["mlperf"])
    dispatchers = (image._window_resample, labels._labels_resample, nonfinite._count_nonfinite)
    before = [len(k.signatures) for k in dispatchers]
    r = run(
        "build",
        "--src",
        src,
        "--out",
        tmp_path / "s.h5",
        "--size",
        32,
        "--workers",
        1,
        "--no-fsync",
    )
    assert r.exit_code == 0, r.output
    assert [len(k.signatures) for k in dispatchers] == before


def test_compile_time_is_reported_apart_from_the_rate(
    built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kitsprep.build import run as run_mod

    src, _ = built
    monkeypatch.setattr(run_mod, "_warm_kernels", lambda refs, window: 7.5)
    r = run(
        "build",
        "--src",
        src,
        "--out",
        tmp_path / "c.h5",
        "--size",
        32,
        "--workers",
        1,
        "--no-fsync",
    )
    assert r.exit_code == 0, r.output
    assert "plus 7.5s compiling the kernels" in r.output


def test_out_below_a_file_at_any_depth_is_one_line(built, tmp_path: Path) -> None:
    src, store = built
    out = store / "deeper" / "x.h5"
    assert_user_error(
        run("build", "--src", src, "--out", out, "--size", 32), "is a file, not a folder"
    )
