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
