"""Sources laid out for nnU-Net (a raw dataset folder) and MONAI (a datalist JSON): the
cases found, the edition read from dataset.json's labels, the folds recorded in the store,
and one line for each way such a source can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cases import find_cases, folder_edition, parse_case_spec, select_cases
from kitsprep.cli import main
from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.layouts.datalist import case_id_of
from kitsprep.layouts.nnunet import label_differences, parse_labels
from kitsprep.outputs import check_output
from kitsprep.store import open_store
from tests.kitsprep.conftest import build, kits_affine, random_case, write_case, write_nifti

V2 = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
V2_REGIONS = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
V1_KITS19 = {"0": "background", "1": "Kidney", "2": "Tumor"}


def _pair(seed: int, cyst: bool = False) -> tuple[np.ndarray, np.ndarray]:
    image, seg = random_case(np.random.default_rng(seed), 3, 16, 16)
    if cyst:
        seg[1, :2, :2] = 3
    return image, seg


def write_nnunet(
    root: Path,
    labels: dict,
    train: tuple[str, ...] = ("case_00000", "case_00001"),
    test: tuple[str, ...] = ("case_00009",),
    **extra,
) -> Path:
    """An nnU-Net raw dataset: dataset.json, imagesTr/ + labelsTr/, imagesTs/."""
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    meta.update(extra)
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    cyst = any(v == 3 or (isinstance(v, list) and 3 in v) for v in labels.values())
    for k, name in enumerate(train):
        image, seg = _pair(k, cyst)
        write_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", image, kits_affine())
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", seg, kits_affine())
    for k, name in enumerate(test):
        write_nifti(root / "imagesTs" / f"{name}_0000.nii.gz", _pair(50 + k)[0], kits_affine())
    return root


def write_datalist(root: Path, training: list, test: list | None = None) -> Path:
    doc = {"training": training, **({"test": test} if test is not None else {})}
    path = root / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


def kits_cases(root: Path, n: int = 4, unlabelled: tuple[int, ...] = ()) -> Path:
    for k in range(n):
        image, seg = _pair(k)
        write_case(root, k, image, None if k in unlabelled else seg)
    return root


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- dataset.json labels


@pytest.mark.parametrize(
    "labels,order,edition",
    [(V2, None, "kits23"), (V2_REGIONS, [1, 3, 2], "kits23"), (V1_KITS19, None, "kits19")],
)
def test_dataset_labels_agree_with_one_edition_family(labels, order, edition):
    ds = parse_labels(labels, order, "dataset.json")
    assert label_differences(ds, EDITIONS[edition]) == []
    other = "kits19" if edition == "kits23" else "kits23"
    assert label_differences(ds, EDITIONS[other])


def test_label_differences_name_the_label_and_what_the_edition_expects():
    swapped = parse_labels({"background": 0, "tumor": 1, "kidney": 2}, None, "d")
    assert label_differences(swapped, EDITIONS["kits19"])[0] == (
        "label 1 is 'tumor' where kits19 has 1 = kidney"
    )
    extra = parse_labels({**V2, "artery": 4}, None, "d")
    assert "label 4 (artery) is not one of kits23's" in label_differences(extra, EDITIONS["kits23"])
    wrong_order = parse_labels(V2_REGIONS, [1, 2, 3], "d")
    (msg,) = label_differences(wrong_order, EDITIONS["kits23"])
    assert "regions" in msg and "mass [2, 3] writes 3" in msg


def test_regions_without_their_order_are_one_line():
    with pytest.raises(KitsError, match="regions_class_order"):
        parse_labels(V2_REGIONS, None, "dataset.json")


# --------------------------------------------------------------------------- nnU-Net raw dataset


@pytest.mark.parametrize(
    "labels,extra,edition",
    [
        (V2, {}, "kits23"),
        (V2_REGIONS, {"regions_class_order": [1, 3, 2]}, "kits23"),
        (V1_KITS19, {}, "kits19"),
    ],
)
def test_nnunet_dataset_builds_with_the_edition_its_labels_declare(
    tmp_path, labels, extra, edition
):
    src = write_nnunet(tmp_path / "Dataset220_KiTS2023", labels, **extra)
    refs = find_cases(src)
    assert [(r.case_id, r.labelled) for r in refs] == [
        ("case_00000", True),
        ("case_00001", True),
        ("case_00009", False),
    ]
    assert refs[0].segmentation == src / "labelsTr" / "case_00000.nii.gz"
    report = build(src, tmp_path / "s.h5")
    info = open_store(report.out)
    assert info.labels.edition == edition == report.edition
    assert "dataset.json" in info.edition_reason
    assert info.case_ids == ["case_00000", "case_00001", "case_00009"]
    assert info.cases["case_00009"].unlabelled_reason.startswith("in imagesTs")
    assert info.splits is None


def test_kits21_named_dataset_reads_as_kits21(tmp_path):
    src = write_nnunet(tmp_path / "Dataset100_KiTS2021", V2)
    assert folder_edition(src, [])[0] == "kits21"
    assert folder_edition(write_nnunet(tmp_path / "d", V2, name="KiTS21"), [])[0] == "kits21"


def test_an_output_inside_an_nnunet_dataset_is_refused(tmp_path):
    src = write_nnunet(tmp_path / "Dataset220_KiTS2023", V2)
    with pytest.raises(KitsError, match="inside the source folder"):
        check_output(src / "imagesTs" / "predictions", "--out")


def test_nnunet_labels_no_edition_has_are_one_line(tmp_path):
    src = write_nnunet(tmp_path / "d", {"background": 0, "kidney": 1, "lesion": 2})
    with pytest.raises(KitsError) as exc:
        find_cases(src)
    msg = str(exc.value)
    assert "label 2 is 'lesion' where kits19 has 2 = tumour" in msg and "\n" not in msg


def test_edition_option_must_agree_with_the_dataset_labels(tmp_path):
    src = write_nnunet(tmp_path / "d", V2)
    with pytest.raises(KitsError, match="label 3 .cyst. is not one of kits19's.*--edition kits19"):
        build(src, tmp_path / "s.h5", edition="kits19")
    assert not (tmp_path / "s.h5").exists()
    assert build(src, tmp_path / "t.h5", edition="kits21").edition == "kits21"


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: (d / "dataset.json").write_text("{nope"), "cannot be read as JSON"),
        (lambda d: _edit(d, labels=None), "has no 'labels'"),
        (lambda d: _edit(d, channel_names=None), "no 'channel_names'"),
        (lambda d: _edit(d, channel_names={"0": "CT", "1": "PET"}), "2 channels"),
        (lambda d: _edit(d, file_ending=".mha"), "file_ending '.mha'"),
        (
            lambda d: (d / "labelsTr" / "case_00001.nii.gz").unlink(),
            "imagesTr/case_00001_0000.nii.gz has no label",
        ),
        (
            lambda d: (d / "imagesTr" / "case_00001_0000.nii.gz").unlink(),
            "labelsTr/case_00001.nii.gz has no image",
        ),
        (
            lambda d: (d / "imagesTr" / "case_00001_0001.nii.gz").write_bytes(b""),
            "channel 1 of case_00001",
        ),
    ],
)
def test_nnunet_dataset_errors_name_the_file_and_the_fix(tmp_path, change, needle):
    src = write_nnunet(tmp_path / "d", V2)
    change(src)
    with pytest.raises(KitsError) as exc:
        find_cases(src)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def _edit(d: Path, **fields) -> None:
    path = d / "dataset.json"
    meta = json.loads(path.read_text())
    for k, v in fields.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def test_case_ids_not_named_case_xxxxx_work_by_name(tmp_path):
    src = write_nnunet(tmp_path / "d", V2, train=("kidney_b", "kidney_a"), test=())
    refs = find_cases(src)
    assert [r.case_id for r in refs] == ["kidney_a", "kidney_b"]
    assert [r.case_id for r in select_cases(refs, "kidney_b")] == ["kidney_b"]
    ids = tmp_path / "ids.txt"
    ids.write_text("kidney_a\nkidney_b\n")
    assert parse_case_spec(f"@{ids}", [r.case_id for r in refs]) == ["kidney_a", "kidney_b"]
    with pytest.raises(KitsError, match="names 1 case.*kidney_c; available: kidney_a, kidney_b"):
        parse_case_spec("kidney_c", [r.case_id for r in refs])
    with pytest.raises(KitsError, match="names 3 case.*case_00000"):
        parse_case_spec("0-2", [r.case_id for r in refs])
    assert EDITIONS["kits23"].prediction_file("kidney_a") == "kidney_a.nii.gz"
    assert EDITIONS["kits19"].prediction_file("case_00007") == "prediction_00007.nii.gz"


# --------------------------------------------------------------------------- MONAI datalist


def test_case_id_of_strips_endings_and_kits_file_names():
    assert case_id_of("imagesTr/case_00000_0000.nii.gz") == "case_00000"
    assert case_id_of("/data/kits23/dataset/case_00012/imaging.nii.gz") == "case_00012"
    assert case_id_of("scans/patient7.nii") == "patient7"


def test_datalist_folds_become_the_stores_recorded_splits(tmp_path):
    kits_cases(tmp_path / "data", 5)
    entry = lambda k: {  # noqa: E731
        "image": f"data/case_{k:05d}/imaging.nii.gz",
        "label": str(tmp_path / f"data/case_{k:05d}/segmentation.nii.gz"),  # absolute
    }
    datalist = write_datalist(
        tmp_path,
        [
            {**entry(0), "fold": 1},
            {**entry(1), "fold": 0, "image": [entry(1)["image"]]},  # one-element list
            {**entry(2), "fold": 1},
            entry(3),  # in no validation fold
        ],
        [{"image": "data/case_00004/imaging.nii.gz"}],
    )
    report = build(datalist, tmp_path / "s.h5")
    info = open_store(report.out)
    assert info.case_ids == [f"case_{k:05d}" for k in range(5)]
    assert not info.cases["case_00004"].labelled
    assert info.splits == [
        {"train": ["case_00000", "case_00002", "case_00003"], "val": ["case_00001"]},
        {"train": ["case_00001", "case_00003"], "val": ["case_00000", "case_00002"]},
    ]
    result = run("info", report.out)
    assert result.exit_code == 0, result.output
    assert "folds        2 recorded by the source" in result.output
    assert "4 labelled, 1 unlabelled: in the datalist's test list" in result.output
    assert json.loads(run("info", report.out, "--json").output)["folds"] == 2
    checked = run("verify", report.out, "--src", datalist)
    assert checked.exit_code == 0 and "labels equal the source masks" in checked.output


def test_datalist_splits_cover_only_the_built_cases_and_no_folds_no_attribute(tmp_path):
    kits_cases(tmp_path / "data", 3)
    entries = [
        {
            "image": f"data/case_{k:05d}/imaging.nii.gz",
            "label": f"data/case_{k:05d}/segmentation.nii.gz",
            "fold": k,
        }
        for k in range(3)
    ]
    info = open_store(build(write_datalist(tmp_path, entries), tmp_path / "a.h5", cases="0-1").out)
    assert info.splits == [
        {"train": ["case_00001"], "val": ["case_00000"]},
        {"train": ["case_00000"], "val": ["case_00001"]},
        {"train": ["case_00000", "case_00001"], "val": []},
    ]
    for e in entries:
        del e["fold"]
    info = open_store(build(write_datalist(tmp_path, entries), tmp_path / "b.h5").out)
    assert info.splits is None
    assert "folds" not in run("info", tmp_path / "b.h5").output


@pytest.mark.parametrize(
    "doc,needle",
    [
        ("[1, 2]", "is not a MONAI datalist"),
        ('{"test": []}', "is not a MONAI datalist"),
        ('{"labels": {}, "channel_names": {"0": "CT"}}', "pass its folder as --src"),
        ("{oops", "cannot be read as JSON"),
        (
            '{"training": [{"image": "data/case_00000/imaging.nii.gz"}]}',
            "training[0] has no label",
        ),
        (
            '{"training": [{"image": "data/case_00000/imaging.nii.gz", '
            '"label": "data/case_00000/missing.nii.gz"}]}',
            "training[0] label",
        ),
        ('{"training": [], "test": [{"image": "gone.nii.gz"}]}', "test[0] image"),
        (
            '{"training": [], "test": [{"image": ["data/case_00000/imaging.nii.gz", "b.nii"]}]}',
            "lists 2 files",
        ),
        (
            '{"training": [{"image": "data/case_00000/imaging.nii.gz", "label": '
            '"data/case_00000/segmentation.nii.gz"}], "test": ["data/case_00000/imaging.nii.gz"]}',
            "training[0] and test[0] both give case id case_00000",
        ),
    ],
)
def test_datalist_errors_are_one_line_naming_the_entry(tmp_path, doc, needle):
    kits_cases(tmp_path / "data", 1)
    path = tmp_path / "datalist.json"
    path.write_text(doc)
    result = run("build", "--src", path, "--out", tmp_path / "s.h5", "--size", 32)
    assert result.exit_code == 1
    assert needle in result.output and "datalist.json" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_builds_an_nnunet_dataset_and_refuses_an_out_inside_it(tmp_path):
    src = write_nnunet(tmp_path / "Dataset220_KiTS2023", V2_REGIONS, regions_class_order=[1, 3, 2])
    result = run("build", "--src", src, "--out", tmp_path / "s.h5", "--size", 32, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "edition kits23 (labels in" in result.output
    shown = run("info", tmp_path / "s.h5").output
    assert "cases        3 (2 labelled, 1 unlabelled: in imagesTs" in shown
    assert "labels       kits23" in shown and "3 cyst" in shown
    inside = run("build", "--src", src, "--out", src / "s.h5", "--size", 32)
    assert inside.exit_code == 1 and "inside --src" in inside.output
    bad = run("build", "--src", src, "--out", tmp_path / "t.h5", "--edition", "kits19")
    assert bad.exit_code == 1 and "not --edition kits19" in bad.output
