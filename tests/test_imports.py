"""Imports run one way: every module's imports (inside functions too) follow the order of
the rooms in scripts/imports.py, with no room or module cycle, and kitsprep imports no
kitstrain."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kits_imports", ROOT / "scripts" / "imports.py")
imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imports)


def test_the_code_follows_the_order_of_the_rooms() -> None:
    assert imports.violations() == []


def test_every_kitstrain_room_is_placed_in_the_order() -> None:
    rooms = {imports.room(m) for m in imports.modules() if imports.room(m) is not None}
    assert rooms <= set(imports.ROOMS) | imports.TOP


def test_imports_inside_functions_count(tmp_path: Path) -> None:
    """A lazy import is still an import: one inside a function body is found."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from kitstrain.report import plots\n")
    known = {"kitstrain.report.plots": mod, "kitstrain.train.m": mod}
    assert imports.imports_of("kitstrain.train.m", mod, known) == {"kitstrain.report.plots"}


def test_an_upward_import_a_room_cycle_and_a_module_cycle_are_each_caught() -> None:
    edges = {
        "kitstrain.train.log": {"kitstrain.report.plots"},  # upward
        "kitstrain.report.plots": {"kitstrain.train.log"},  # so: rooms in a circle
        "kitstrain.data.a": {"kitstrain.data.b"},
        "kitstrain.data.b": {"kitstrain.data.a"},  # modules in a circle, one room
        "kitsprep.store": {"kitstrain.data.a"},  # the wrong package direction
    }
    found = "\n".join(imports.violations(edges))
    assert (
        "kitstrain.train.log imports kitstrain.report.plots: room train sits below report" in found
    )
    assert "room cycle: report <-> train" in found
    assert "module cycle: kitstrain.data.a <-> kitstrain.data.b" in found
    assert "kitsprep must not import kitstrain" in found
