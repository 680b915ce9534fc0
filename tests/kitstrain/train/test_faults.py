"""Test-only fault injection stays out of the step: nothing is installed unless asked, and
an asked-for fault fires once, at its step, on its rank."""

from __future__ import annotations

import pytest
import torch

from kitstrain.train.faults import install_faults


def test_nothing_is_installed_without_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KITS_INJECT_OOM_AT_STEP", "KITS_INJECT_ERROR_AT_STEP", "KITS_INJECT_RANK"):
        monkeypatch.delenv(var, raising=False)
    net = torch.nn.Linear(2, 2)
    assert not install_faults(net, lambda: 0, rank=0)
    assert not net._forward_pre_hooks


def test_a_fault_fires_once_at_its_step_on_its_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITS_INJECT_OOM_AT_STEP", "2")
    monkeypatch.setenv("KITS_INJECT_RANK", "1")
    assert not install_faults(torch.nn.Linear(2, 2), lambda: 2, rank=0)  # another rank
    step = [0]
    net = torch.nn.Linear(2, 2)
    assert install_faults(net, lambda: step[0], rank=1)
    x = torch.zeros(1, 2)
    net(x)  # step 0: nothing
    step[0] = 2
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        net(x)
    net(x)  # the retried step goes through
