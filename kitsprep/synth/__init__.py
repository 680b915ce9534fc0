"""The synthetic KiTS19 cohort: the project's embedded default data set.

Real KiTS19 CT cannot be downloaded here, so this package writes a cohort in the exact KiTS19
layout and geometry conventions (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``,
arrays ``(slices, rows, cols)``, orientation ``I P L`` with the anti-diagonal affine) and with
the storage variety that breaks naive readers: float32 and int16-with-intercept imaging,
uint8 masks with an sform and uint16 masks with only a qform, one non-square case and one
unlabelled case.

The anatomy is built so that a model has to learn shape and context rather than a threshold:
liver, spleen, bowel wall, vessels and bone all share the kidney's intensity range, kidneys
have an enhanced cortex around a darker medulla, and tumours of varying size and contrast
grow out of a kidney's surface. Everything is drawn from ``np.random.default_rng([seed,
index])``, so a configuration always gives identical arrays and byte-identical files: the
painters draw in a fixed order (`anatomy`), which is part of the output.

``edition="kits23"`` adds KiTS21/23's renal cysts (label 3: round, homogeneous, near-water
density, on or in a kidney), drawn from a stream of their own (``[seed, index, 3]``) so the
anatomy around them is the KiTS19 cohort's, and writes the release's ``kits23.json``.

Conventions used throughout: axis 0 runs superior -> inferior, axis 1 anterior -> posterior,
axis 2 patient right -> left. So the liver (patient right) sits at low column indices, the
spine at high row indices. Pure functions (``make_case``, ``paint_imaging``,
``encode_case``) are kept apart from the one function that touches the disk
(``write_cohort``).

Modules: `case` (one case's draws, in order), `layout` (the case's geometry), `shapes`
(ellipsoids, tubes, masked fills), `tissues` (the class constants), one painter per structure
(`body`, `muscle`, `liver`, `spleen`, `bowel`, `vessels`, `bone`, `kidney`, `tumour`,
`cyst`), `anatomy` (the painting order), `render` (classes -> HU) and `write` (NIfTI, disk).
"""

from kitsprep.synth.case import (
    SYNTH_EDITIONS,
    SynthCase,
    SynthConfig,
    kits_affine,
    make_case,
    paint_imaging,
)
from kitsprep.synth.write import encode_case, write_cohort

__all__ = [
    "SYNTH_EDITIONS",
    "SynthCase",
    "SynthConfig",
    "encode_case",
    "kits_affine",
    "make_case",
    "paint_imaging",
    "write_cohort",
]
