"""components.atomic: the one temp-file-then-rename writer (a crash mid-write: tests/test_faults.py)."""

from __future__ import annotations

import os
import stat

import pytest

from components.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_the_content_and_creates_the_parent(tmp_path):
    dest = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(dest, b"\x00bytes\xff")
    assert dest.read_bytes() == b"\x00bytes\xff"
    atomic_write_text(dest, "text é\n")   # replaces the previous file
    assert dest.read_text(encoding="utf-8") == "text é\n"
    assert os.listdir(dest.parent) == ["out.bin"]


def test_mode_follows_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import components.atomic as atomic

        atomic = importlib.reload(atomic)   # FILE_MODE is read from the umask at import
        atomic.atomic_write_bytes(tmp_path / "shared.txt", b"x")
        with atomic.atomic_path(tmp_path / "figure.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
        importlib.reload(atomic)
    assert _mode(tmp_path / "shared.txt") == 0o644
    assert _mode(tmp_path / "figure.png") == 0o644


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    dest = tmp_path / "metrics.json"
    dest.write_bytes(b"OLD")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".metrics.json.") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"NEW, half")
            raise RuntimeError("writer failed")
    assert dest.read_bytes() == b"OLD"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failing_write_of_a_new_file_leaves_nothing(tmp_path):
    dest = tmp_path / "new" / "out.bin"
    with pytest.raises(TypeError):
        atomic_write_bytes(dest, "not bytes")   # type: ignore[arg-type]
    assert os.listdir(dest.parent) == []
