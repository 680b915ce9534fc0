"""Tissue classes -> HU: integer HU in range, blur and interpolation that keep a constant,
and a cyst look drawn only where a cyst is."""

from __future__ import annotations

import numpy as np

from kitsprep.synth import tissues as T
from kitsprep.synth.layout import draw_body
from kitsprep.synth.render import HU_MAX, HU_MIN, blur_inplane, interp_matrix, render, tissue_looks


def test_blur_and_interpolation_keep_a_constant() -> None:
    flat = np.full((2, 5, 7), 40.0, np.float32)
    assert np.array_equal(blur_inplane(flat), flat)
    m = interp_matrix(9, 3)
    assert np.allclose(m.sum(axis=1), 1) and m[0, 0] == 1 and m[-1, -1] == 1


def test_render_gives_integer_hu_in_range_by_class() -> None:
    layout = draw_body((8, 32, 32), ez=30.0, pe=12.8, rng=np.random.default_rng(0))
    cls = np.full(layout.shape, T.AIR, np.uint8)
    cls[:, 8:24, 8:24] = T.CORTICAL
    hu = render(cls, "iso", layout, np.random.default_rng(1))
    assert hu.dtype == np.float32 and np.array_equal(hu, np.rint(hu))
    assert HU_MIN <= hu.min() and hu.max() <= HU_MAX
    assert np.median(hu[:, :3, :3]) < -950 and np.median(hu[:, 12:20, 12:20]) > 500


def test_a_cyst_look_is_drawn_only_where_a_cyst_is() -> None:
    plain = np.zeros((2, 4, 4), np.uint8)
    with_cyst = plain.copy()
    with_cyst[0, 0, 0] = T.CYST
    mean, amp = tissue_looks(plain, "hypo", np.random.default_rng(0))
    assert mean[T.CYST] == 0 and amp[T.CYST] == 0
    mean, amp = tissue_looks(with_cyst, "hypo", np.random.default_rng(0))
    assert 0 <= mean[T.CYST] <= 20 and 1 <= amp[T.CYST] <= 3
    assert 40 <= mean[T.TUMOUR] <= 80  # the 'hypo' look
