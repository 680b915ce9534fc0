"""One case's files and its id: what every source layout (`kitsprep.cases`,
`kitsprep.layouts`) hands the build, verify, score and predict."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CASE_RE = re.compile(r"^case_(\d{5})$")  # the KiTS id; other layouts may name cases otherwise


@dataclass(frozen=True)
class CaseRef:
    """One case: imaging, and segmentation when the case is labelled (else why not, for
    `kitsprep info` to say)."""

    case_id: str
    imaging: Path
    segmentation: Path | None
    unlabelled_reason: str = ""

    @property
    def labelled(self) -> bool:
        """Whether the case has a mask (the KiTS test cases have none)."""
        return self.segmentation is not None


def case_name(number: int) -> str:
    """``case_00042`` for 42: the KiTS folder name."""
    return f"case_{number:05d}"
