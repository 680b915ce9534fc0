"""The one progress display of both CLIs: a bar with rate and ETA on a terminal, a plain line
per finished item otherwise (a log file or CI gets lines, never carriage returns)."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Counts units (slices, steps, cases) toward `total` and reports finished items.

    `start` opens the bar; `advance(n)` counts n units; `item_done(name, detail)` reports one
    finished item (the bar's postfix on a terminal, a line otherwise); `note` prints a line
    that must not be lost (a skipped case); `close` ends it. `enabled=False` silences all
    (tests, library use); `bar` forces the choice the stream's isatty would make.
    """

    def __init__(
        self, stream: TextIO | None = None, *, bar: bool | None = None, enabled: bool = True
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = isatty() if bar is None else bar
        self.enabled = enabled
        self._tqdm = None

    def start(
        self, total: int, desc: str, unit: str = "slice", initial: int = 0, leave: bool = True
    ) -> Progress:
        """Open the bar (on a terminal). `leave=False` clears it when closed: a bar that
        comes and goes under another one (fit's validations under its steps)."""
        if self.enabled and self.bar:
            from tqdm import tqdm

            # no monitor thread (it only tunes redraw intervals): a process with a second
            # thread cannot fork safely, and `kitsprep build` forks its workers
            tqdm.monitor_interval = 0
            self._tqdm = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=leave,
            )
        return self

    @property
    def showing_bar(self) -> bool:
        return self._tqdm is not None

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        if self._tqdm is not None:
            if postfix is not None:
                self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(n)

    def item_done(self, name: str, detail: str = "") -> None:
        if not self.enabled:
            return
        line = f"{name}  {detail}".rstrip()
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(line, refresh=False)
        else:
            print(line, file=self.stream, flush=True)

    def note(self, line: str) -> None:
        """A line shown whatever the mode (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
