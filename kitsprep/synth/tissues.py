"""The tissue classes of a painted case: every voxel gets one before it becomes HU.

Each class gets a per-case mean HU and texture amplitude in `render`; the painters only
decide which class sits where.
"""

from __future__ import annotations

AIR, FAT, MUSCLE, CAVITY, LIVER, SPLEEN, WALL, FLUID, GAS = range(9)
ARTERY, VEIN, BONE, CORTICAL, DISC, CSF = range(9, 15)
CORTEX, MEDULLA, PELVIS, TUMOUR, NECROSIS = range(15, 20)
CYST = 20  # a renal cyst (KiTS21/23 label 3): water density, homogeneous
N_CLASSES = 21

# Abdominal organs that vessels and the psoas may push aside.
SOFT = (CAVITY, WALL, FLUID, GAS, LIVER, SPLEEN)
