"""Installing kits keeps the torch a venv already holds (a GPU user's newer CUDA build), and
scripts/setup.sh installs the CPU build first only where the venv has none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "torch==2.13.0"


def _fake_torch(site: Path, version: str) -> None:
    """An installed distribution named torch, as pip sees one (metadata only)."""
    info = site / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def test_pip_install_keeps_a_newer_torch(tmp_path: Path) -> None:
    """`pip install -e .` in a venv holding a torch newer than any CPU wheel here (a CUDA
    build): pip resolves against it and would install kits alone, not replace torch."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    _fake_torch(site, "2.99.0+cu130")
    # every other dependency from this interpreter's environment, behind the fake torch
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no machine-wide torch cap
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            "--quiet",
            "--report",
            str(report),
            "-e",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    would = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert "torch" not in would, f"pip would replace the installed torch: {would}"
    assert "kits" in would


def _run_setup(tmp_path: Path, has_torch: bool) -> list[str]:
    """scripts/setup.sh in a copy of the repo whose .venv python is a recorder: it logs
    every call and answers `import torch` as told. The pip calls made, in order."""
    repo = tmp_path / ("with" if has_torch else "without")
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    log = repo / "calls.log"
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        'if [ "$1" = "-c" ]; then case "$2" in *"import torch"*) '
        f"exit {0 if has_torch else 1};; esac; fi\n"
        "exit 0\n"
    )
    python.chmod(0o755)
    subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], check=True, timeout=60)
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]


@pytest.mark.parametrize("has_torch", [True, False])
def test_setup_installs_cpu_torch_only_without_one(tmp_path: Path, has_torch: bool) -> None:
    calls = _run_setup(tmp_path, has_torch)
    torch_calls = [c for c in calls if "torch" in c.split()[-1]]
    project = [i for i, c in enumerate(calls) if c.endswith("-e .[test]")]
    assert project, calls
    if has_torch:
        assert torch_calls == [], calls
    else:
        assert len(torch_calls) == 1 and torch_calls[0].split()[-1] == CPU_TORCH, calls
        assert calls.index(torch_calls[0]) < project[0], "torch must go in before kits"
