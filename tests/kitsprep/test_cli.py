"""The `kitsprep` command line: exit codes, one-line errors without tracebacks, and that the
options reach the store."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main
from kitsprep.labels import EDITIONS
from kitsprep.store import open_store
from kitsprep.synth import SYNTH_EDITIONS
from kitsprep.window import WINDOW_PRESETS
from tests.kitsprep.conftest import BAD_KINDS, write_bad_source, write_cohort


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> str:
    """Exit 1 through SystemExit, exactly one `Error: ...` line naming what is wrong, and no
    traceback anywhere."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = write_cohort(root / "src", n=3, unlabelled=(2,))
    out = root / "s.h5"
    result = run(
        "build", "--src", src, "--out", out, "--size", "32", "--workers", "1", "--no-fsync"
    )
    assert result.exit_code == 0, result.output
    return src, out, result


@pytest.mark.parametrize("cmd", [[], ["build"], ["info"], ["verify"], ["synth"]])
def test_help(cmd):
    result = run(*cmd, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_help_lists_build_options():
    out = run("build", "--help").output
    for opt in (
        "--src",
        "--out",
        "--size",
        "--window",
        "--window-range",
        "--workers",
        "--cases",
        "--resume",
        "--overwrite",
    ):
        assert opt in out


def test_choices_come_from_the_registries():
    """--edition and --window list what the code knows, not a hand-typed copy."""
    synth_help = run("synth", "--help").output
    assert all(name in synth_help for name in SYNTH_EDITIONS)
    build_help = " ".join(run("build", "--help").output.split())
    assert all(name in build_help for name in ("auto", *EDITIONS, *WINDOW_PRESETS))
    assert "mlperf (default: clip -79..304, z-score)" in build_help
    assert "abdomen (clip -175..250, -> [0,1])" in build_help


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "kitsprep" in result.output


# --------------------------------------------------------------------------- happy path


def test_build_info_verify(built):
    src, out, result = built
    assert "built" in result.output and "3 cases" in result.output
    assert "case_00001" in result.output  # a plain line per case when not on a terminal

    info = run("info", out)
    assert info.exit_code == 0, info.output
    assert (
        "3 (2 labelled, 1 unlabelled: no segmentation.nii.gz or aggregated_MAJ_seg.nii.gz)"
        in info.output
        and "mlperf" in info.output
    )
    assert "kits19 (no mask holds a label beyond kidney and tumour): 0 background" in info.output

    js = run("info", out, "--json")
    assert js.exit_code == 0
    summary = json.loads(js.stdout)
    assert summary["cases"] == 3 and summary["slices"] == 4 + 5 + 6
    assert summary["size"] == 32 and summary["window"]["name"] == "mlperf"
    assert summary["unlabelled_reasons"] == {
        "no segmentation.nii.gz or aggregated_MAJ_seg.nii.gz": 1
    }
    assert summary["per_case"]["case_00002"]["unlabelled_reason"].startswith("no seg")

    ver = run("verify", out)
    assert ver.exit_code == 0 and ver.output.startswith("ok: 3 cases, 15 slices")
    ver = run("verify", out, "--src", src)
    assert ver.exit_code == 0 and "labels equal the source masks" in ver.output


def test_build_with_two_workers(tmp_path):
    src = write_cohort(tmp_path / "src", n=3)
    result = run(
        "build",
        "--src",
        src,
        "--out",
        tmp_path / "o.h5",
        "--size",
        "16",
        "--workers",
        "2",
        "--no-fsync",
    )
    assert result.exit_code == 0, result.output
    assert run("verify", tmp_path / "o.h5", "--src", src).exit_code == 0


@pytest.mark.parametrize(
    "args,want",
    [
        (
            ["--window", "abdomen"],
            {"name": "abdomen", "lo": -175.0, "hi": 250.0, "offset": -175.0, "divisor": 425.0},
        ),
        (
            ["--window-range", "-100", "200"],
            {"lo": -100.0, "hi": 200.0, "offset": -100.0, "divisor": 300.0},
        ),
        (
            ["--window", "mlperf", "--window-range", "-50", "250"],
            {"lo": -50.0, "hi": 250.0, "offset": 101.0, "divisor": 76.9},
        ),
        (
            ["--window", "abdomen", "--window-range", "-200", "300"],
            {"lo": -200.0, "hi": 300.0, "offset": -200.0, "divisor": 500.0},
        ),
    ],
)
def test_window_options_reach_the_store(tmp_path, built, args, want):
    src, _, _ = built
    out = tmp_path / "w.h5"
    result = run(
        "build",
        "--src",
        src,
        "--out",
        out,
        "--size",
        "16",
        "--workers",
        "1",
        "--no-fsync",
        "--cases",
        "0",
        *args,
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        stored = json.loads(f.attrs["window"])
    assert {k: stored[k] for k in want} == pytest.approx(want)
    assert open_store(out).window.lo == want["lo"]


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_build_bad_input(tmp_path, kind):
    src = tmp_path / "src"
    needle = write_bad_source(kind, src)
    out = tmp_path / "o.h5"
    result = run(
        "build", "--src", src, "--out", out, "--size", "16", "--workers", "1", "--no-fsync"
    )
    assert_user_error(result, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--window", "bogus"], "bogus"),
        (["--window-range", "250", "-175"], "HI > LO"),
        (["--cases", "0-1,9"], "case_00009"),
        (["--cases", "x"], "'x'"),
        (["--cases", "3-1"], "backwards"),
    ],
)
def test_build_bad_options(tmp_path, built, args, needle):
    src, _, _ = built
    out = tmp_path / "o.h5"
    result = run("build", "--src", src, "--out", out, "--size", "16", "--workers", "1", *args)
    assert_user_error(result, needle)
    assert not out.exists()


def test_build_missing_src_and_existing_out(tmp_path, built):
    src, out, _ = built
    assert_user_error(
        run("build", "--src", tmp_path / "none", "--out", tmp_path / "o.h5"), str(tmp_path / "none")
    )
    before = out.read_bytes()
    assert_user_error(
        run("build", "--src", src, "--out", out, "--workers", "1"), str(out), "--overwrite"
    )
    assert out.read_bytes() == before


def test_info_and_verify_refuse_non_stores(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    for cmd in ("info", "verify"):
        assert_user_error(run(cmd, tmp_path / "missing.h5"), "missing.h5")
        assert_user_error(run(cmd, junk), "junk.h5")


# --------------------------------------------------------------------------- verify


def _damaged_copy(out, tmp_path, field: str, row: int, mutate) -> object:
    """Copy the store and rewrite 32 bytes of one chunk (found through the index)."""
    info = open_store(out)
    copy = tmp_path / "damaged.h5"
    shutil.copy(out, copy)
    off = int(info.index[row][field]) + 8
    with open(copy, "r+b") as fh:
        fh.seek(off)
        data = np.frombuffer(fh.read(32), np.uint8)
        fh.seek(off)
        fh.write(mutate(data).tobytes())
    return copy


def _labelled_fg_row(out) -> int:
    info = open_store(out)
    return int(np.flatnonzero(info.label_pixels("kidney") > 0)[0])


def test_verify_detects_nonfinite_image_chunk(tmp_path, built):
    src, out, _ = built
    copy = _damaged_copy(out, tmp_path, "image_offset", 2, lambda d: np.full_like(d, 0xFF))
    result = run("verify", copy)
    assert_user_error(result, "problem")
    assert "FAIL case_00000 slice 2:" in result.output


def test_verify_detects_flipped_image_bytes(tmp_path, built):
    """Bit flips that still decode as finite float16 (mantissa bits 0 and 8 of each value:
    the exponent is untouched): silent corruption that a NaN check cannot see."""
    src, out, _ = built
    copy = _damaged_copy(out, tmp_path, "image_offset", 2, lambda d: d ^ np.uint8(0x01))
    with h5py.File(copy, "r") as f:
        assert np.isfinite(f["cases/case_00000/image"][...]).all()
    result = run("verify", copy)
    assert_user_error(result, "problem")
    assert "FAIL case_00000 slice 2:" in result.output


def test_verify_detects_damaged_label_chunk(tmp_path, built):
    """A damaged deflate stream in a label chunk: a reported problem, not a traceback."""
    src, out, _ = built
    copy = _damaged_copy(
        out, tmp_path, "label_offset", _labelled_fg_row(out), lambda d: d ^ np.uint8(0xFF)
    )
    result = run("verify", copy)
    assert_user_error(result, "problem")
    assert "FAIL case_00000" in result.output


def test_verify_src_detects_changed_mask(tmp_path, built):
    src, out, _ = built
    other = tmp_path / "src"  # a different cohort under the same case ids
    write_cohort(other, n=3, seed=99, unlabelled=(2,))
    result = run("verify", out, "--src", other)
    assert_user_error(result, "problem")
    assert "differ from the source mask" in result.output


def test_verify_src_missing_case(tmp_path, built):
    src, out, _ = built
    other = tmp_path / "src"
    shutil.copytree(src, other)
    shutil.rmtree(other / "case_00001")
    result = run("verify", out, "--src", other)
    assert_user_error(result)
    assert "case_00001: not found in the source folder" in result.output


# --------------------------------------------------------------------------- synth


def test_synth_cohort_builds_and_verifies(tmp_path):
    cohort = tmp_path / "cohort"
    result = run("synth", "--out", cohort, "--cases", "3", "--size", "32", "--seed", "1")
    assert result.exit_code == 0, result.output
    # Not a terminal: a line per case, never a bar.
    assert [ln for ln in result.output.splitlines() if ln.startswith("synth ")] == [
        f"synth case_0000{i}" for i in range(3)
    ]
    assert sorted(p.name for p in cohort.iterdir()) == ["case_00000", "case_00001", "case_00002"]
    out = tmp_path / "s.h5"
    result = run(
        "build", "--src", cohort, "--out", out, "--size", "32", "--workers", "1", "--no-fsync"
    )
    assert result.exit_code == 0, result.output
    assert run("verify", out, "--src", cohort).exit_code == 0
    assert open_store(out).cases["case_00000"].axcodes == "IPL"
    assert_user_error(run("synth", "--out", cohort, "--cases", "1"), str(cohort))
    kits23 = tmp_path / "kits23"
    result = run("synth", "--out", kits23, "--cases", "1", "--size", "16", "--edition", "kits23")
    assert result.exit_code == 0 and (kits23 / "kits23.json").is_file(), result.output
    result = run("synth", "--out", tmp_path / "x", "--edition", "kits21")
    assert result.exit_code == 2 and "kits21" in result.output
