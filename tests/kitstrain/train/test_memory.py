"""The batch-size search and the lr scaling for the batch chosen."""

from __future__ import annotations

import pytest
import torch

from kitstrain.train.memory import find_batch_size, scale_lr

CPU = torch.device("cpu")


def _curve(sps_of, peak_of=lambda n: None, oom_at=None):
    """An injected throughput curve and memory model for the batch search."""
    seen = []

    def run_step(n):
        seen.append(n)
        if oom_at is not None and n >= oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return sps_of(n), peak_of(n)

    return run_step, seen


def test_auto_batch_stops_where_per_sample_throughput_flattens() -> None:
    # saturates around batch 32: 2->4->...->32 each gain > 10 %, 64 gains ~3 %
    run_step, seen = _curve(lambda n: 1000 * n / (n + 4) if n < 64 else 1000 * 32 / 36 * 1.03)
    found = find_batch_size(run_step, cap=1024, total_bytes=None)
    assert found["batch_size"] == 32 and seen[-1] == 64
    assert "flattened" in found["reason"]


def test_auto_batch_respects_memory_margin_oom_cap_and_2_31_elements() -> None:
    linear = lambda n: 100.0 * n  # noqa: E731 - never flattens: another limit must stop it
    gib = 2**30
    run_step, _ = _curve(linear, peak_of=lambda n: n * gib)
    found = find_batch_size(run_step, cap=1024, total_bytes=20 * gib, margin=0.85)
    assert found["batch_size"] == 16 and "peaked above" in found["reason"]  # 32 GiB > 17
    run_step, _ = _curve(linear, oom_at=64)
    found = find_batch_size(run_step, cap=1024)
    assert found["batch_size"] == 32 and found["tried"][-1]["result"] == "oom"
    run_step, seen = _curve(linear)
    assert find_batch_size(run_step, cap=128)["batch_size"] == 128 and seen[-1] == 128
    # 64 channels of 256x256 per sample: batch 512 would make a 2**31-element tensor
    run_step, seen = _curve(linear)
    found = find_batch_size(run_step, cap=4096, elements_per_sample=64 * 256 * 256)
    assert found["batch_size"] == 256 and max(seen) == 256 and "2**31" in found["reason"]


def test_lr_scaling_rules() -> None:
    assert scale_lr(3e-3, 16, 16, "adamw") == (3e-3, "none")
    lr, rule = scale_lr(3e-3, 64, 16, "adamw")
    assert rule == "sqrt" and lr == pytest.approx(6e-3)
    lr, rule = scale_lr(0.01, 64, 16, "sgd")
    assert rule == "linear" and lr == pytest.approx(0.04)
