"""The run log on a terminal: the bar counts each step once, lines go above it."""

from __future__ import annotations

import io

import torch

from kitsprep.progress import Progress
from kitstrain.core.rundir import State
from kitstrain.train.log import LogWindow, RunLog


def test_the_bar_counts_each_step_once_and_lines_go_above_it() -> None:
    stream = io.StringIO()
    progress = Progress(stream, bar=True).start(10, "fit", unit="step", initial=2)
    lines: list[str] = []
    with RunLog(None, main=True, echo=lines.append, progress=progress) as log:
        for _ in range(3):
            log.stepped()
        window = LogWindow(steps=3, slices=12, loss=torch.tensor(3.0))
        fresh = log.flush(window, State(step=5), 0.1)
        assert (fresh.steps, fresh.slices, fresh.wait, fresh.loss) == (0, 0, 0.0, 0.0)
        log.say("warning: the model waited on the loader")
        assert progress._tqdm.n == 5  # resumed at 2, three steps: the window adds none
    assert lines == []  # with a bar showing, nothing is echoed beside it
    text = stream.getvalue()
    assert "warning: the model waited on the loader" in text and "loss=1.000" in text


def test_without_a_bar_each_window_is_a_line_and_other_ranks_stay_quiet() -> None:
    lines: list[str] = []
    main = RunLog(None, main=True, echo=lines.append, progress=Progress(bar=False))
    main.flush(LogWindow(steps=2, slices=8, loss=torch.tensor(1.0)), State(step=2), 0.1)
    assert len(lines) == 1 and lines[0].startswith("step 2 epoch 0 loss 0.5000")
    quiet: list[str] = []
    other = RunLog(None, main=False, echo=quiet.append)
    other.flush(LogWindow(steps=2, slices=8, loss=torch.tensor(1.0)), State(step=2), 0.1)
    other.say("anything")
    assert quiet == []


def test_a_validation_shows_a_bar_of_its_slices_under_the_steps_on_rank_0_only() -> None:
    from types import SimpleNamespace

    from kitstrain.metrics import CaseScore
    from kitstrain.train.evaluate import _CaseReport

    stream = io.StringIO()
    steps = Progress(stream, bar=True).start(10, "fit", unit="step")
    with RunLog(None, main=True, progress=steps) as log:
        shown = log.validation_progress()
        assert shown is not None and shown.bar and shown is not steps
        info = SimpleNamespace(cases={"case_00001": SimpleNamespace(slices=7)})
        report = _CaseReport(shown, info, ["case_00001"])
        report.slices(7)
        report.case(CaseScore("case_00001", {"kidney": 0.9, "tumour": 0.5}, 1.0, 1.0, 0, 0))
        assert shown._tqdm.n == 7 and shown._tqdm.total == 7
        report.close()
        assert steps.showing_bar  # the step bar goes on
    text = stream.getvalue()
    assert "validate:" in text and "0/7" in text and "slice/s" in text and "<" in text  # ETA
    assert RunLog(None, main=False, progress=steps).validation_progress() is None
    quiet = Progress(stream, enabled=False)
    assert RunLog(None, main=True, progress=quiet).validation_progress() is None
