"""The painting order: body, muscles, organs, gut, vessels, bone, then the mask's own
kidneys, tumours and cysts. The order is part of the output: each painter draws from the
case's random stream and may only overwrite what the painters before it left."""

from __future__ import annotations

import numpy as np

from kitsprep.synth import cyst, kidney, tumour
from kitsprep.synth.body import paint_body
from kitsprep.synth.bone import paint_ribs, paint_spine
from kitsprep.synth.bowel import paint_bowel
from kitsprep.synth.kidney import Pelvis
from kitsprep.synth.layout import Layout
from kitsprep.synth.liver import paint_liver
from kitsprep.synth.muscle import paint_paraspinal, paint_psoas
from kitsprep.synth.spleen import paint_spleen
from kitsprep.synth.vessels import paint_vessels


def tissue_classes(
    seg: np.ndarray, layout: Layout, rng: np.random.Generator, pelvis: Pelvis
) -> tuple[np.ndarray, str]:
    """Class volume (uint8, one of the tissue constants per voxel) and the tumour's look."""
    cls = paint_body(layout, rng)
    paint_paraspinal(cls, layout, rng)
    paint_psoas(cls, layout, rng)
    paint_liver(cls, layout, rng)
    paint_spleen(cls, layout, rng)
    paint_bowel(cls, layout, rng)
    paint_vessels(cls, layout, rng)
    paint_spine(cls, layout, rng)
    paint_ribs(cls, layout, rng)
    mode = paint_renal(cls, seg, layout, rng, pelvis)
    return cls, mode


def paint_renal(
    cls: np.ndarray, seg: np.ndarray, layout: Layout, rng: np.random.Generator, pelvis: Pelvis
) -> str:
    """Kidney cortex / medulla / pelvis, tumour (+ necrosis) and cysts wherever the mask says
    so; returns the tumour's look (drawn even for a mask without a tumour)."""
    mode = tumour.draw_mode(rng)
    cortex_px = kidney.draw_cortex_px(rng, layout.pe)
    necrosis_px = tumour.draw_necrosis_px(rng, layout.pe)
    box = kidney.renal_box(seg)
    if box is None:
        return mode
    kidney.paint_kidneys(cls, seg, box, cortex_px, pelvis)
    tumour.paint_tumour(cls, seg, box, mode, necrosis_px)
    cyst.paint_cysts(cls, seg, box)
    return mode
