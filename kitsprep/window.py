"""HU windowing presets: data, not code. The numba kernel and the numpy reference both read
a `Window`, so what is stored in the HDF5 attributes is exactly what was applied."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from kitsprep.errors import KitsError


@dataclass(frozen=True)
class Window:
    """Clip to [lo, hi] HU, then `(v - offset) / divisor`, in float32."""

    name: str
    lo: float
    hi: float
    offset: float
    divisor: float

    def normalise(self, hu: float) -> float:
        """Where a single HU value lands (e.g. air, for padding)."""
        v = np.float32(min(max(hu, self.lo), self.hi))
        return float((v - np.float32(self.offset)) / np.float32(self.divisor))

    @property
    def pad_value(self) -> float:
        """Air (-1024 HU) after windowing: what in-plane padding is filled with."""
        return self.normalise(-1024.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Window:
        return cls(**json.loads(text))


def unit_window(name: str, lo: float, hi: float) -> Window:
    """A window that maps [lo, hi] HU onto [0, 1]."""
    if not hi > lo:
        raise KitsError(
            f"window range must have HI > LO, found LO={lo} HI={hi}; "
            "pass e.g. --window-range -175 250"
        )
    return Window(name=name, lo=float(lo), hi=float(hi), offset=float(lo), divisor=float(hi - lo))


WINDOW_PRESETS: dict[str, Window] = {
    # MLPerf KiTS19 reference: clip to the 0.5/99.5 percentiles of foreground HU, z-score.
    "mlperf": Window(name="mlperf", lo=-79.0, hi=304.0, offset=101.0, divisor=76.9),
    # A soft-tissue abdomen window mapped to [0, 1].
    "abdomen": unit_window("abdomen", -175.0, 250.0),
}
DEFAULT_WINDOW = "mlperf"


def resolve_window(preset: str | None, window_range: tuple[float, float] | None) -> Window:
    """`--window PRESET` and/or `--window-range LO HI`: a range overrides the preset's clip
    limits and keeps its normalisation style (z-score or [0, 1])."""
    name = preset or DEFAULT_WINDOW
    if name not in WINDOW_PRESETS:
        raise KitsError(
            f"unknown window preset {name!r}; expected one of {sorted(WINDOW_PRESETS)}, "
            "or give --window-range LO HI"
        )
    base = WINDOW_PRESETS[name]
    if window_range is None:
        return base
    lo, hi = window_range
    if preset is None or base.offset == base.lo:
        return unit_window(f"range({lo:g},{hi:g})", lo, hi)
    if not hi > lo:
        raise KitsError(f"window range must have HI > LO, found LO={lo} HI={hi}")
    return Window(
        name=f"{name}({lo:g},{hi:g})",
        lo=float(lo),
        hi=float(hi),
        offset=base.offset,
        divisor=base.divisor,
    )
