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
