"""The editions' label sets: regions, write-back order, and the decode round trip."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS, LabelSet, decode_regions, edition, region_masks


@pytest.mark.parametrize("name", list(EDITIONS))
def test_round_trip_labels_regions_labels(name):
    ls = EDITIONS[name]
    labels = np.random.default_rng(1).integers(0, ls.num_classes, (3, 7, 9)).astype(np.uint8)
    assert np.array_equal(decode_regions(region_masks(labels, ls), ls), labels)


@pytest.mark.parametrize("name", list(EDITIONS))
def test_json_round_trip(name):
    assert LabelSet.from_json(EDITIONS[name].to_json()) == EDITIONS[name]


def test_kits19_regions_are_the_official_thresholds():
    ls = edition("kits19")
    labels = np.array([0, 1, 2], np.uint8)
    m = region_masks(labels, ls)
    assert ls.region_names == ("kidney", "tumour")
    assert m.tolist() == [(labels > 0).tolist(), (labels > 1).tolist()]
    assert ls.region("tumour").tolerance_mm is None
    assert ls.prediction_file("case_00042") == "prediction_00042.nii.gz"


def test_kits23_hecs_write_back_kidney_then_cyst_then_tumour():
    ls = edition("kits23")
    assert ls.region_names == ("kidney_and_mass", "mass", "tumor")
    assert [r.writes for r in ls.regions] == [
        ls.value("kidney"),
        ls.value("cyst"),
        ls.value("tumour"),
    ]
    assert [r.tolerance_mm for r in ls.regions] == [
        1.0330772532390826,
        1.1328796488598762,
        1.1498198361434828,
    ]
    # A voxel in all three regions is tumour; in kidney_and_mass and mass only, a cyst.
    masks = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]], bool)
    assert decode_regions(masks, ls).tolist() == [1, 3, 2, 0]
    assert ls.prediction_file("case_00400") == "case_00400.nii.gz"


def test_unknown_values_and_names():
    ls = edition("kits19")
    assert ls.unknown_values(np.array([0, 1, 2, 3, 5])) == [3, 5]
    assert edition("kits23").unknown_values([0, 1, 2, 3]) == []
    with pytest.raises(KitsError, match="kidney, tumour"):
        ls.value("cyst")
    with pytest.raises(KitsError, match="kits19, kits21, kits23"):
        edition("kits25")
