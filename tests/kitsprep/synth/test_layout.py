"""A case's geometry: the body in the field of view, the spine behind, kidneys beside it."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import body_rho, draw_body, inner_body, layout_from_mask


def test_a_drawn_body_fits_the_field_of_view_with_the_spine_behind_its_centre() -> None:
    for seed in range(5):
        layout = draw_body((20, 64, 80), ez=15.0, pe=6.4, rng=np.random.default_rng(seed))
        assert layout.cx - layout.a >= 0 and layout.cx + layout.a <= 80
        assert layout.cy - layout.b >= 0 and layout.cy + layout.b <= 64
        assert layout.spine_y > layout.cy  # posterior: higher row indices
        assert layout.spine_x == layout.cx
        assert layout.kidney_span == 1.0  # no kidneys placed yet


def test_body_rho_is_below_one_inside_the_body_and_inner_body_excludes_spine_and_wall() -> None:
    layout = draw_body((20, 64, 64), ez=15.0, pe=6.4, rng=np.random.default_rng(0))
    _, _, rho = body_rho(layout)
    assert rho[round(layout.cy), round(layout.cx)] < 0.1
    assert rho[0, 0] > 1 and rho[-1, -1] > 1
    inner = inner_body(layout)
    assert not inner[round(layout.spine_y), round(layout.spine_x)]
    assert not inner[0, 0]
    assert (inner <= (rho < 1)).all()


def test_a_layout_from_a_mask_puts_the_spine_between_its_kidneys() -> None:
    seg = np.zeros((12, 64, 64), np.uint8)
    seg[3:10, 30:40, 14:24] = 1
    seg[3:10, 30:40, 40:50] = 1
    layout = layout_from_mask(seg, (3.0, 0.8, 0.8), np.random.default_rng(0))
    assert layout.spine_x == (18.5 + 44.5) / 2
    assert (layout.kz_lo, layout.kz_hi) == (3.0, 10.0)
    assert sorted(k[3] for k in layout.kidneys) == [-1, 1]  # one each side
    assert layout.cy + layout.b < 64  # the back inside the field of view
    empty = layout_from_mask(
        np.zeros((9, 32, 32), np.uint8), (5.0, 1.0, 1.0), np.random.default_rng(1)
    )
    assert (empty.kz_lo, empty.kz_hi) == (3.0, 6.0) and empty.kidneys == ()
