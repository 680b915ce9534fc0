import errno
import os

import pytest

from kitsprep.files import atomic_path, write_atomic


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    write_atomic(p, "new", fsync=True)
    assert p.read_text() == "new"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_failed_write_keeps_old_file_removes_temporary_and_names_target(tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_text("old")
    with pytest.raises(OSError) as info:
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(p)
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("half")
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []


def test_output_under_a_file_is_refused_naming_the_option_and_the_file(tmp_path):
    from kitsprep.errors import KitsError
    from kitsprep.files import check_output_folder

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(KitsError, match=r"^--json .*a_file is a file, not a folder; choose"):
        check_output_folder(blocker / "deeper" / "out.json", "--json")
    check_output_folder(tmp_path / "new" / "deeper" / "out.json", "--json")  # creatable
