"""How a training option is declared: once, on its `TrainConfig` field. The field's
metadata (`Option`) carries its help, its command-line type and parsing, and whether a
resumed run may change it; `kitstrain fit`'s flags are generated from it, so a new option
is one field plus its test. The parsers turn flag text into field values, with one-line
errors."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field
from typing import Any

from kitsprep.errors import KitsError

__all__ = [
    "Option",
    "option",
    "option_of",
    "parse_batch",
    "parse_duration",
    "parse_label_weights",
    "parse_patch",
    "parse_workers",
]

PATCH_CHOICES = "'auto' (half the slice side), 'full' (whole slices) or a side in pixels"


@dataclass(frozen=True)
class Option:
    """A `TrainConfig` field's command-line form. `kind` is int, float, bool or str; a str
    with `parse` takes text and parses it; `low`/`high` bound numbers (`open_low`: the low
    bound itself is refused); `choices` or `registry` (module, attribute: a dict whose
    keys are the choices, read when needed so that `--help` loads no torch) limit a str;
    `off` is a bool's negative flag (`--classes` for `--regions`)."""

    help: str = ""
    kind: type = str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] | None = None
    registry: tuple[str, str] | None = None
    parse: Callable[[str], Any] | None = None
    off: str | None = None
    resumable: bool = False  # `--resume` may change it: limits and loader knobs only


def option(default: Any, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its `Option`; a dict default is copied per instance."""
    meta = {"option": Option(help=help, **kw)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_of(f: Field) -> Option | None:
    """The field's `Option`, None for a field with no flag."""
    return f.metadata.get("option")


def field_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def parse_duration(text: str | None) -> float | None:
    """`90s`, `10m`, `2h`, `1h30m` or plain seconds -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise KitsError(f"cannot read duration {text!r}; expected e.g. 90s, 10m, 2h or 1h30m")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(v) * unit[u] for v, u in parts)


def parse_batch(text: str | None) -> int | str | None:
    """A positive integer, or 'auto'."""
    if text is None:
        return None
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise KitsError(f"--batch-size must be a positive integer or 'auto', found {text!r}")


def parse_workers(text: str | None) -> int | str | None:
    """'auto' or a count >= 0 (0: batches made in the training process itself)."""
    if text is None or text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise KitsError(f"--workers must be 'auto' or a count >= 0, found {text!r}")


def parse_patch(text: str | None) -> int | str | None:
    """'auto', 'full' or a side in pixels."""
    if text is None or text in ("auto", "full"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise KitsError(f"--patch must be {PATCH_CHOICES}; found {text!r}")


def parse_label_weights(text: str | None) -> dict[str, float] | None:
    """`tumour=4,cyst=2` -> {"tumour": 4.0, "cyst": 2.0}; `none` -> {} (every foreground
    slice weighs 1). Names are checked against the store's edition when fit opens it."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or name in out or not weight > 0 or not math.isfinite(weight):
            raise KitsError(
                f"--label-weights expects distinct label=weight pairs with "
                f"positive weights, e.g. tumour=4,cyst=2 (or 'none'); found "
                f"{text!r}"
            )
        out[name] = weight
    return out
