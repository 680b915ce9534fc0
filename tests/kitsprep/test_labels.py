"""The editions' label sets: regions, write-back order, and the decode round trip."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import (
    EDITIONS,
    LabelSet,
    decode_regions,
    edition,
    region_mask,
    region_masks,
    write_back,
)


@pytest.mark.parametrize("name", list(EDITIONS))
def test_round_trip_labels_regions_labels(name):
    ls = EDITIONS[name]
    labels = np.random.default_rng(1).integers(0, ls.num_classes, (3, 7, 9)).astype(np.uint8)
    assert np.array_equal(decode_regions(region_masks(labels, ls), ls), labels)


@pytest.mark.parametrize("name", list(EDITIONS))
def test_region_table_rows_are_the_regions_of_each_value(name):
    ls = EDITIONS[name]
    table = ls.region_table()
    assert table.dtype == bool and table.shape == (ls.num_classes, len(ls.regions))
    values = np.arange(ls.num_classes)
    assert np.array_equal(table, region_masks(values, ls).T)
    assert not table[0].any()  # background is in no region
    # extra rows (values beyond the edition) belong to no region
    wide = ls.region_table(ls.num_classes + 3)
    assert np.array_equal(wide[: ls.num_classes], table) and not wide[ls.num_classes :].any()
    with pytest.raises(ValueError, match="n_values"):
        ls.region_table(ls.num_classes - 1)


@pytest.mark.parametrize("name", list(EDITIONS))
def test_one_region_mask_is_a_row_of_region_masks(name):
    ls = EDITIONS[name]
    labels = np.random.default_rng(2).integers(0, ls.num_classes + 2, (4, 5)).astype(np.uint8)
    masks = region_masks(labels, ls)
    for k in range(len(ls.regions)):
        assert np.array_equal(region_mask(labels, ls, k), masks[k])
    # signed labels too: -1, like a value past the edition's labels, is in no region
    signed = labels.astype(np.int16) - 1
    inside = (signed >= 0) & (signed < ls.num_classes)
    want = inside & ls.region_table()[np.clip(signed, 0, ls.num_classes - 1), 0]
    assert np.array_equal(region_mask(signed, ls, 0), want)


@pytest.mark.parametrize("name", list(EDITIONS))
def test_write_order_is_the_regions_writes_and_decodes(name):
    ls = EDITIONS[name]
    assert ls.write_order == tuple(r.writes for r in ls.regions)
    masks = region_masks(np.arange(ls.num_classes), ls)
    assert write_back(masks, ls.write_order).tolist() == list(range(ls.num_classes))
    assert np.array_equal(write_back(masks, list(ls.write_order)), decode_regions(masks, ls))


def test_write_back_lets_a_later_region_overwrite_an_earlier_one():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)
    assert write_back(masks, (5, 7)).tolist() == [5, 7, 7, 0]
    assert write_back(masks, (7, 5)).tolist() == [7, 5, 5, 0]
    assert write_back(masks, (5, 7)).dtype == np.uint8
    with pytest.raises(ValueError, match="expected 3 region masks, found 2"):
        write_back(masks, (1, 2, 3))


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
