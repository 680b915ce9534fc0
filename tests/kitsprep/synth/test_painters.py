"""Each painter paints its own structure, where it belongs, over what it may overwrite."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.synth import tissues as T
from kitsprep.synth.anatomy import paint_renal, tissue_classes
from kitsprep.synth.body import paint_body
from kitsprep.synth.bone import paint_ribs, paint_spine
from kitsprep.synth.bowel import paint_bowel
from kitsprep.synth.cyst import grow_cysts
from kitsprep.synth.kidney import draw_kidneys, place_kidneys
from kitsprep.synth.layout import Layout, draw_body
from kitsprep.synth.liver import paint_liver
from kitsprep.synth.muscle import paint_paraspinal, paint_psoas
from kitsprep.synth.shapes import erode2d
from kitsprep.synth.spleen import paint_spleen
from kitsprep.synth.tumour import grow_tumours
from kitsprep.synth.vessels import VESSEL_OK, paint_vessels

SHAPE = (32, 96, 96)


def a_case(seed: int = 0) -> tuple[Layout, np.ndarray, list]:
    """A layout with kidneys and tumours, as `make_case` draws them."""
    rng = np.random.default_rng(seed)
    layout = draw_body(SHAPE, ez=360 / SHAPE[0], pe=0.8 * 512 / SHAPE[1], rng=rng)
    seg, pelvis, kidneys = draw_kidneys(layout, rng)
    grow_tumours(seg, layout, kidneys, rng)
    return place_kidneys(seg, layout, kidneys), seg, pelvis


@pytest.fixture(scope="module")
def case() -> tuple[Layout, np.ndarray, list]:
    return a_case()


def changed(painter, cls: np.ndarray, layout: Layout, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Run ``painter`` on a copy of ``cls``: the classes before and after, where it changed."""
    after = cls.copy()
    painter(after, layout, np.random.default_rng(seed))
    where = after != cls
    return cls[where], after[where], np.argwhere(where)


def test_the_body_is_air_around_fat_around_muscle_around_the_cavity(case) -> None:
    layout, _, _ = case
    cls = paint_body(layout, np.random.default_rng(0))
    assert cls.dtype == np.uint8 and cls.shape == SHAPE
    assert (cls[:, 0, 0] == T.AIR).all()
    assert (cls[:, round(layout.cy), round(layout.cx)] == T.CAVITY).all()
    row = cls[SHAPE[0] // 2, round(layout.cy)]  # left to right across the middle
    order = [int(v) for i, v in enumerate(row) if i == 0 or v != row[i - 1]]
    assert order == [T.AIR, T.FAT, T.MUSCLE, T.CAVITY, T.MUSCLE, T.FAT, T.AIR]


@pytest.mark.parametrize(
    ("painter", "paints", "over"),
    [
        (paint_liver, {T.LIVER, T.FLUID}, {T.CAVITY}),
        (paint_spleen, {T.SPLEEN}, {T.CAVITY}),
        (paint_paraspinal, {T.MUSCLE}, {T.CAVITY, T.FAT}),
        (paint_psoas, {T.MUSCLE}, set(T.SOFT)),
        (paint_bowel, {T.WALL, T.GAS, T.FLUID}, {T.CAVITY}),
        (paint_vessels, {T.ARTERY, T.VEIN}, set(VESSEL_OK)),
        (paint_spine, {T.BONE, T.CORTICAL, T.DISC, T.CSF}, set(range(T.N_CLASSES))),
        (paint_ribs, {T.BONE}, {T.MUSCLE, T.FAT, T.CAVITY, T.LIVER, T.SPLEEN}),
    ],
)
def test_a_painter_paints_its_classes_over_what_it_may(case, painter, paints, over) -> None:
    layout, _, _ = case
    body = paint_body(layout, np.random.default_rng(0))
    before, after, _ = changed(painter, body, layout)
    assert before.size, f"{painter.__name__} painted nothing"
    assert set(np.unique(after).tolist()) <= paints
    assert set(np.unique(before).tolist()) <= over


def test_liver_on_the_patients_right_and_spleen_on_the_left(case) -> None:
    layout, _, _ = case
    body = paint_body(layout, np.random.default_rng(0))
    _, _, liver = changed(paint_liver, body, layout)
    _, _, spleen = changed(paint_spleen, body, layout)
    assert liver[:, 2].mean() < layout.cx < spleen[:, 2].mean()


def test_tumours_grow_out_of_a_kidney(case) -> None:
    _, seg, _ = case
    assert set(np.unique(seg).tolist()) == {0, 1, 2}
    tumour = seg == 2
    grown = tumour.copy()
    for axis in range(3):
        for shift in (1, -1):
            grown |= np.roll(tumour, shift, axis)
    assert (grown & (seg == 1)).any()


def test_cysts_sit_on_a_kidney_and_never_over_a_tumour(case) -> None:
    layout, seg, _ = case
    with_cysts = seg.copy()
    grow_cysts(with_cysts, layout, np.random.default_rng(3), beside_tumour=True)
    assert (with_cysts == 3).any()
    assert np.array_equal(with_cysts == 2, seg == 2)  # tumour untouched
    assert ((with_cysts == 3) <= (with_cysts != seg)).all()  # cysts are new voxels


def test_renal_tissue_is_painted_inside_its_label_only(case) -> None:
    layout, seg, pelvis = case
    seg = seg.copy()
    grow_cysts(seg, layout, np.random.default_rng(3), beside_tumour=False)
    cls = paint_body(layout, np.random.default_rng(0))
    mode = paint_renal(cls, seg, layout, np.random.default_rng(4), pelvis)
    assert mode in ("hypo", "iso", "hetero")
    kidney = {T.CORTEX, T.MEDULLA, T.PELVIS}
    tumour = {T.TUMOUR, T.NECROSIS}
    assert set(np.unique(cls[seg == 1]).tolist()) <= kidney
    assert set(np.unique(cls[seg == 2]).tolist()) <= tumour
    assert (cls[seg == 3] == T.CYST).all()
    outside = cls[seg == 0]
    assert not np.isin(outside, [*kidney, *tumour, T.CYST]).any()
    # Cortex on the outline (in-plane), medulla deeper in, urine where the pelvis opens.
    rim = (seg == 1) & ~erode2d(seg > 0, 1)
    assert np.isin(cls[rim], [T.CORTEX, T.PELVIS]).all()
    assert (cls[seg == 1] == T.MEDULLA).any()


def test_the_painting_order_is_deterministic_and_gives_known_classes(case) -> None:
    layout, seg, pelvis = case
    a, mode_a = tissue_classes(seg, layout, np.random.default_rng(5), pelvis)
    b, mode_b = tissue_classes(seg, layout, np.random.default_rng(5), pelvis)
    assert np.array_equal(a, b) and mode_a == mode_b
    assert int(a.max()) < T.N_CLASSES
