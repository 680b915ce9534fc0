"""`kitstrain export`: the run's network runs in onnxruntime with the run's own logits (on
stored slices and at other shapes), the JSON beside it is enough to decode labels the way
`kitstrain predict` does, and an export never replaces an input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitsprep.store import SliceReader, open_store
from kitstrain.cli import main
from kitstrain.infer.engine import read_store_images, stack_context
from kitstrain.infer.inference import Inference
from kitstrain.model.load import load_model
from kitstrain.model.unet import UNet, UNetConfig
from tests.kitsprep.test_spacing import one_error_line
from tests.kitstrain.infer.test_engine import make_cohort, make_run, make_store

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CONTEXT = 1
CASE = "case_00000"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A region model's run (2.5D context 1, KiTS19 regions), exported by the CLI."""
    root = tmp_path_factory.mktemp("export")
    store = make_store(make_cohort(root), root / "slices.h5")
    torch.manual_seed(0)
    cfg = UNetConfig(
        in_channels=1 + 2 * CONTEXT, num_classes=3, width=4, depth=2, regions=True,
        region_writes=(1, 2),
    )  # fmt: skip
    model = UNet(cfg).eval()
    with torch.no_grad():  # batch-norm statistics other than the defaults, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    run = make_run(root / "run", store, model, val=[CASE], context=CONTEXT)
    out = root / "deploy" / "model.onnx"
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "model.json" in result.output
    return {"root": root, "run": run, "store": store, "onnx": out, "meta": out.with_suffix(".json")}


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def stored_batch(store: Path, case: str) -> np.ndarray:
    info = open_store(store)
    reader = SliceReader(info.path, info.size, info.case_ids)
    try:
        images = read_store_images(reader, info, case)
    finally:
        reader.close()
    return stack_context(images, CONTEXT).astype(np.float32)


def run_logits(run: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(run, "best", "cpu")
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_the_graph_is_valid_opset_17_with_dynamic_batch_height_width(exported) -> None:
    graph = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for value in (graph.graph.input[0], graph.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
        assert dims[1].dim_value == (1 + 2 * CONTEXT if value.name == "image" else 2)


def test_onnxruntime_matches_the_runs_logits_on_stored_slices(exported) -> None:
    x = stored_batch(exported["store"], CASE)
    got = session(exported["onnx"]).run(None, {"image": x})[0]
    want = run_logits(exported["run"], x)
    assert got.shape == want.shape == (len(x), 2, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert (want > 0).any() and (want < 0).any()  # both sides of the decision in play


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (5, 3, 16, 16)])
def test_onnxruntime_takes_other_batch_height_width(exported, shape) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = session(exported["onnx"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, run_logits(exported["run"], x), atol=1e-3, rtol=0)


def test_the_json_decodes_labels_as_kitstrain_does(exported) -> None:
    meta = json.loads(exported["meta"].read_text())
    info = open_store(exported["store"])
    assert meta["format"] == "kits-onnx" and meta["onnx"] == "model.onnx"
    assert meta["input"]["channels"] == 3 and meta["input"]["context"] == CONTEXT
    assert meta["input"]["divisor"] == 4
    w = meta["window"]
    assert (w["lo"], w["hi"], w["offset"], w["divisor"]) == (
        info.window.lo, info.window.hi, info.window.offset, info.window.divisor,
    )  # fmt: skip
    assert meta["slice"]["size"] == info.size == 32
    assert meta["labels"] == {"edition": "kits19", "background": 0, "names": {"kidney": 1,
                              "tumour": 2}}  # fmt: skip
    assert [r["name"] for r in meta["regions"]] == ["kidney", "tumour"]
    assert meta["write_order"] == [1, 2] and meta["output"]["kind"] == "regions"
    best = exported["run"] / "checkpoints" / "best.pt"
    assert meta["checkpoint"]["file"] == str(best)
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    # a runtime following the JSON: region logits > 0, written back in order
    logits = session(exported["onnx"]).run(None, {"image": stored_batch(exported["store"], CASE)})[
        0
    ]
    labels = np.zeros((logits.shape[0], *logits.shape[2:]), np.uint8)
    for k, value in enumerate(meta["write_order"]):
        labels[logits[:, k] > 0] = value
    model, _ = load_model(exported["run"], "best", "cpu")
    want = Inference([model], CONTEXT, torch.device("cpu")).store_case(None, info, CASE)
    assert len(np.unique(want)) > 1
    np.testing.assert_array_equal(labels, want)


def test_export_never_replaces_an_input(exported, tmp_path: Path) -> None:
    run, cli = exported["run"], CliRunner()
    config = (run / "config.json").read_bytes()
    # config.onnx is new, but its JSON would be the run's config.json
    line = one_error_line(cli.invoke(main, ["export", str(run), "--out", str(run / "config.onnx")]))
    assert "config.json is the run's own config.json" in line
    assert (run / "config.json").read_bytes() == config and not (run / "config.onnx").exists()
    # a run whose store is named like the JSON the export would write
    other = tmp_path / "run"
    shutil.copytree(run, other)
    store = tmp_path / "slices.json"
    shutil.copy(exported["store"], store)
    record = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**record, "store": str(store)}))
    line = one_error_line(
        cli.invoke(main, ["export", str(other), "--out", str(tmp_path / "slices.onnx")])
    )
    assert "slices.json would overwrite" in line and "which this command reads" in line
    line = one_error_line(cli.invoke(main, ["export", str(run), "--out", str(tmp_path / "m.pt")]))
    assert "ending in .onnx" in line
    # a new file inside the run is fine
    ok = cli.invoke(main, ["export", str(run), "--out", str(run / "model.onnx")])
    assert ok.exit_code == 0, ok.output
    assert (run / "model.onnx").is_file() and (run / "model.json").is_file()
