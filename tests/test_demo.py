"""scripts/demo.sh end to end, shrunk by its own variables: every stage runs, the score
table comes last, and one closing line gives the wall time and what the numbers mean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_runs_and_closes_with_its_wall_time_and_meaning(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    env = {
        **os.environ,
        # the commands of this interpreter's environment, running this checkout's code
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "CASES": "4",
        "SIZE": "32",
        "STEPS": "2",
        "WIDTH": "4",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "demo.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert re.match(r"demo done in \d+m\d\ds\. Kidney Dice \d\.\d\d and tumour Dice", lines[-1])
    assert "never trained on" in lines[-1] and "a real run" in lines[-1]
    assert "overlays in runs/demo/overlays" in done.stdout
    assert (tmp_path / "runs" / "demo" / "score.json").is_file()
    assert any((tmp_path / "runs" / "demo" / "predictions").iterdir())
