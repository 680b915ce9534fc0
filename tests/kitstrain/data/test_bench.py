"""The loader benchmark runs end to end on a small store and reports what it promises."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitstrain.data.bench import bench_loader, format_bench
from tests.conftest import build, write_kits_case


@pytest.mark.parametrize("workers, augment", [(0, False), (2, True)])
def test_bench_reports_throughput_ceiling_and_memory(loader_store, workers, augment):
    r = bench_loader(
        loader_store, batch_size=4, workers=workers, seconds=0.3, augment=augment, in_ram_slices=16
    )
    assert r["slices_per_s"] > 0 and r["in_ram_slices_per_s"] > 0 and r["mb_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["slices_per_s"] / r["in_ram_slices_per_s"])
    assert r["ratio_plain"] == pytest.approx(r["slices_per_s"] / r["plain_in_ram_slices_per_s"])
    assert r["batches"] >= 1 and r["main_peak_rss_mb"] > 0
    assert len(r["worker_peak_rss_mb"]) == workers
    assert all(0 < v < 4000 for v in r["worker_peak_rss_mb"])
    assert len(r["worker_shmem_mb"]) == workers
    assert r["settings"]["in_ram_slices"] == 16 and r["settings"]["augment"] is augment
    json.dumps(r)  # `--json` prints it as is
    text = format_bench(r)
    assert "in-RAM ceiling" in text and "worker peak RSS" in text
    assert "store / plain in-RAM" in text and "store / in-RAM ceiling" in text
    assert "CRC-32 of every read" in text
    assert r["crc_checked"] and 0 < r["crc_us_per_slice"] and 0 <= r["crc_share"] < 1


def test_bench_refuses_a_missing_store_or_one_without_labels(tmp_path):
    with pytest.raises(KitsError, match="does not exist"):
        bench_loader(tmp_path / "missing.h5", seconds=0.1)
    write_kits_case(tmp_path / "src", "case_00000", np.zeros((3, 16, 16), np.float32), None)
    out = tmp_path / "unlabelled.h5"
    build(tmp_path / "src", out, size=16, workers=1)
    with pytest.raises(KitsError, match="no labelled case"):
        bench_loader(out, seconds=0.1)


@pytest.mark.parametrize("side, workers", [("workers", 1), ("device", 0)])
def test_the_default_path_reports_what_feeds_a_gpu(loader_store, side, workers):
    """Patches, context 2, augmentation on the chosen side: samples/s, every loader
    process's CPU ms per sample, what auto workers feed; off CUDA the device side measures
    the workers' share and times the kernel apart on CPU torch."""
    from click.testing import CliRunner

    from kitstrain.cli import main
    from kitstrain.data.bench_train import bench_training_loader, format_training_bench

    r = bench_training_loader(
        loader_store, batch_size=4, workers=workers, seconds=0.3, augment_on=side
    )
    assert r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] > 0 and r["feeds"] > 0
    assert r["workers"] == workers and r["augment_on"] == side and r["auto_workers"] >= 1
    # the default U-Net (depth 4) takes patches of at least 32: a 32x32 store is whole slices
    assert r["settings"]["patch"] == 32 and r["settings"]["context"] == 2
    assert ("device_kernel_samples_per_s" in r) is (side == "device")
    if side == "device":
        assert r["settings"]["cut"] == 32 and r["device_kernel_samples_per_s"] > 0
        assert "reads and cuts" in r["measured"]
    json.dumps(r)
    assert "CPU ms per sample" in format_training_bench(r)
    out = CliRunner().invoke(
        main,
        [
            "bench-loader",
            str(loader_store),
            "--seconds",
            "0.5",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert {"samples_per_s", "cpu_ms_per_sample", "workers", "augment_on", "feeds"} <= set(got)
