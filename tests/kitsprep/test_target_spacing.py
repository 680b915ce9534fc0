"""`kitsprep build --spacing auto|MM|none`: the target's resolution, one case's transform
(crop to body and labels, resize, pad) and its inverse, the never-cut guarantee, the build
recording it all (store attributes, `info`, `verify --src`), bad input, old stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main
from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane, restore_labels
from kitsprep.kernels import label_counts, labels_resample
from kitsprep.spacing import (
    body_box,
    case_plane,
    mask_box,
    parse_spacing,
    plan_in_plane,
    resolve_spacing,
)
from kitsprep.store import open_store, summarise
from kitsprep.store.format import ATTRS_CHECKSUM, attrs_checksum
from tests.kitsprep.conftest import kits_affine, write_case
from tests.kitsprep.test_spacing import one_error_line

AIR, BODY, KIDNEY = -1000.0, 40.0, 150.0


def body_case(
    slices: int, side: int, radius: int, seed: int, centre: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A disk of soft tissue in air, a kidney box inside it, noise; (image, labels)."""
    rng = np.random.default_rng(seed)
    cy, cx = centre or (side // 2, side // 2)
    yy, xx = np.mgrid[:side, :side]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    image = np.where(disk, BODY, AIR)[None].repeat(slices, 0).astype(np.float32)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    seg = np.zeros(image.shape, np.uint8)
    half = max(1, radius // 3)
    seg[1:-1, cy - half : cy + half, cx - half : cx + 1] = 1
    seg[2:-2, cy - 1 : cy + 1, cx - half : cx - half + 2] = 2
    image[seg > 0] = KIDNEY
    return image, seg


def forward(labels: np.ndarray, plane: InPlane) -> np.ndarray:
    out, _ = labels_resample(labels, plane, label_counts(labels.shape[0], 3))
    return out


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize(
    "text, want", [("auto", "auto"), (" None ", "none"), ("0.8", "0.8"), ("0.80", "0.8")]
)
def test_parse_spacing_accepts_auto_none_and_a_number(text: str, want: str) -> None:
    assert parse_spacing(text) == want


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "abc", "0.8mm", ""])
def test_parse_spacing_refuses_in_one_line(text: str) -> None:
    with pytest.raises(KitsError, match="--spacing") as err:
        parse_spacing(text)
    assert "\n" not in str(err.value)


def test_resolve_spacing_auto_is_the_median_in_plane_spacing() -> None:
    cohort = [(0.5, 0.5), (0.8, 0.8), (1.0, 1.0)]
    assert resolve_spacing("auto", cohort).mm == pytest.approx(0.8)
    assert resolve_spacing("0.7", cohort).mm == 0.7
    assert resolve_spacing("none", cohort).mm is None
    with pytest.raises(KitsError, match="at least one readable case"):
        resolve_spacing("auto", [])


# --------------------------------------------------------------------------- one case


def test_body_box_leaves_stray_bright_voxels_in_the_air_out() -> None:
    image, _ = body_case(6, 64, 12, 0)
    image[2, 1, 1] = 500.0  # a bright speck in the air, as noise or an artefact gives
    assert body_box(image, 1.0, 0.0) == (20, 45, 20, 45)
    # raw voxels with a scale: HU = raw * 2 - 1024
    assert body_box((image + 1024) / 2, 2.0, -1024.0) == (20, 45, 20, 45)


def test_no_target_fits_the_whole_slice_as_before() -> None:
    image, seg = body_case(4, 40, 10, 0)
    plane = case_plane(image, 1.0, 0.0, (0.8, 0.8), 32, None, seg)
    assert (plane.crop_h, plane.crop_w, plane.new_h, plane.shrink) == (40, 40, 32, 1.0)


def test_target_spacing_crops_to_the_body_and_resizes_to_the_target() -> None:
    image, seg = body_case(4, 120, 20, 0)  # 41 px of body at 0.5 mm: 25.6 px at 0.8 mm
    plane = case_plane(image, 1.0, 0.0, (0.5, 0.5), 32, 0.8, seg)
    assert plane.shrink == 1.0
    assert plane.crop_h == plane.crop_w == 51  # the 32 px window at 0.8 mm, in source px
    assert plane.new_h == plane.new_w == 32
    assert 0.5 * plane.crop_h / plane.new_h == pytest.approx(0.8, rel=0.01)
    rows, cols = plane.crop
    assert rows.start <= 39 and rows.stop >= 81 and cols.start <= 39 and cols.stop >= 81


@pytest.mark.parametrize("source, target", [(0.8, 0.8), (1.0, 0.5), (0.9, 0.7)])
def test_transform_and_inverse_round_trip_labels_without_forced_downscale(
    source: float, target: float
) -> None:
    image, seg = body_case(5, 48, 7, 1, centre=(20, 27))
    plane = case_plane(image, 1.0, 0.0, (source, source), 32, target, seg)
    assert plane.shrink == 1.0 and plane.crop_h <= plane.new_h
    assert (plane.crop_h, plane.crop_w) != (48, 48)  # cropped to the body
    stored = forward(seg, plane)
    np.testing.assert_array_equal(restore_labels(stored, plane), seg)


def test_labels_at_the_slice_edge_are_never_cut_and_the_forced_resize_is_recorded() -> None:
    image, seg = body_case(4, 60, 20, 2)
    seg[1, 0, :] = 1  # a labelled row along the top edge, outside the body
    seg[2, :, 59] = 2  # and a column along the right edge
    plane = case_plane(image, 1.0, 0.0, (1.0, 1.0), 32, 0.8, seg)
    assert plane.shrink < 1.0  # 60 px at 1 mm is 75 px at 0.8 mm: resized to fit 32
    assert (plane.crop_h, plane.crop_w) == (60, 60)
    stored = forward(seg, plane)
    for value in (1, 2):  # both edge labels reach the store, none left outside the crop
        assert (stored[1 if value == 1 else 2] == value).any()
    assert np.count_nonzero(seg[(slice(None), *plane.crop)]) == np.count_nonzero(seg)


def test_plan_keeps_a_box_at_the_slice_corner_inside_the_crop() -> None:
    plane = plan_in_plane(100, 100, (0.5, 0.5), 32, 0.8, (0, 10, 90, 100))
    rows, cols = plane.crop
    assert rows.start == 0 and cols.stop == 100 and plane.shrink == 1.0
    assert mask_box(np.zeros((2, 5, 5), bool)) is None


# --------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def spacing_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three cases at 0.5, 0.8 and 1.0 mm in-plane (median 0.8); the 1.0 mm one's body is
    too wide for 32 px at 0.8 mm."""
    src = tmp_path_factory.mktemp("spacing") / "src"
    for case, (pixel, radius) in enumerate([(0.5, 16), (0.8, 12), (1.0, 18)]):
        image, seg = body_case(5, 40, radius, case)
        write_case(src, case, image, seg, affine=kits_affine(2.5, pixel))
    return src


def build_cli(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        main,
        ["build", "--src", str(src), "--out", str(out), "--size", "32", "--workers", "1"]
        + ["--no-fsync", *extra],
    )


@pytest.fixture(scope="module")
def auto_store(spacing_src: Path) -> tuple[Path, str]:
    out = spacing_src.parent / "auto.h5"
    result = build_cli(spacing_src, out, "--spacing", "auto")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_build_auto_records_the_target_and_each_case_transform(auto_store) -> None:
    store, output = auto_store
    assert "spacing 0.8 mm per pixel (--spacing auto)" in output
    assert "1 case(s) resized further to fit --size: case_00002" in output
    info = open_store(store)
    assert (info.spacing.option, info.spacing.mm) == ("auto", pytest.approx(0.8))
    for cid, m in info.cases.items():
        p = m.in_plane
        stored_mm = m.spacing[1] * p.crop_h / p.new_h
        if cid == "case_00002":
            assert p.shrink < 1 and stored_mm > 0.8
        else:
            assert p.shrink == 1 and stored_mm == pytest.approx(0.8, rel=0.03)
    with h5py.File(store) as f:
        assert f.attrs["spacing"] == "auto" and f.attrs["target_spacing"] == pytest.approx(0.8)
    summary = summarise(info)
    assert summary["target_spacing"] == pytest.approx(0.8)
    assert list(summary["shrunk"]) == ["case_00002"]


def test_info_shows_the_spacing_text_and_json(auto_store) -> None:
    store, _ = auto_store
    text = CliRunner().invoke(main, ["info", str(store)])
    assert text.exit_code == 0 and "spacing      0.8 mm per pixel (--spacing auto)" in text.output
    assert "case_00002 x0." in text.output
    raw = json.loads(CliRunner().invoke(main, ["info", str(store), "--json"]).output)
    assert raw["spacing"] == "auto" and raw["target_spacing"] == pytest.approx(0.8)
    assert raw["per_case"]["case_00001"]["in_plane"]["crop_h"] < 40


def test_verify_src_checks_labels_after_the_recorded_transform(auto_store, spacing_src) -> None:
    store, _ = auto_store
    result = CliRunner().invoke(main, ["verify", str(store), "--src", str(spacing_src)])
    assert result.exit_code == 0, result.output
    assert "labels equal the source masks" in result.output
    # a recorded transform that lost a labelled voxel is found
    bad = store.with_name("cut.h5")
    shutil.copy(store, bad)
    with h5py.File(bad, "r+") as f:
        a = f["cases"]["case_00001"].attrs
        plane = json.loads(a["in_plane"])
        plane.update(crop_top=plane["crop_top"] + 14, crop_h=plane["crop_h"] - 14)
        a["in_plane"] = json.dumps(plane)
    result = CliRunner().invoke(main, ["verify", str(bad), "--src", str(spacing_src)])
    assert result.exit_code == 1
    assert "case_00001:" in result.output and "outside the recorded crop" in result.output


def test_build_with_a_number_and_none(spacing_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "mm.h5"
    assert build_cli(spacing_src, out, "--spacing", "1.6").exit_code == 0
    info = open_store(out)
    assert info.spacing.mm == 1.6 and not any(m.in_plane.shrink < 1 for m in info.cases.values())
    plain = tmp_path / "none.h5"
    result = build_cli(spacing_src, plain)
    assert result.exit_code == 0 and "mm per pixel" not in result.output
    info = open_store(plain)
    assert info.spacing.mm is None
    assert all(m.in_plane.crop_h == m.in_plane.src_h for m in info.cases.values())


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "fine"])
def test_build_refuses_a_bad_spacing_in_one_line(
    spacing_src: Path, tmp_path: Path, value: str
) -> None:
    line = one_error_line(build_cli(spacing_src, tmp_path / "x.h5", "--spacing", value))
    assert f"--spacing {value}" in line or f"--spacing '{value}'" in line
    assert not (tmp_path / "x.h5").exists()


def test_a_version_2_store_still_opens_as_spacing_none(auto_store, tmp_path: Path) -> None:
    store, _ = auto_store
    old = tmp_path / "v2.h5"
    shutil.copy(store, old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 2
        for name in ("spacing", "target_spacing"):
            del f.attrs[name]
        for g in f["cases"].values():  # version 2's transform: no crop, no shrink
            plane = json.loads(g.attrs["in_plane"])
            g.attrs["in_plane"] = json.dumps(
                {k: v for k, v in plane.items() if not k.startswith("crop") and k != "shrink"}
            )
        f.attrs[ATTRS_CHECKSUM] = attrs_checksum(f.attrs)
    info = open_store(old)
    assert info.format_version == 2 and info.spacing.mm is None
    m = info.cases["case_00000"].in_plane
    assert (m.crop_top, m.crop_h, m.crop_w, m.shrink) == (0, 40, 40, 1.0)
    assert summarise(info)["target_spacing"] is None
