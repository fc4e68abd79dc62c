"""Atomic writes: the only place in components/ that writes a temp file or folder and renames it over a target.

A reader sees the previous file or the new one, whole, never a partial one: the data goes to a hidden
`.<name>.<random>.tmp` in the target's folder (same filesystem, so os.replace is atomic), is fsynced,
and replaces the target. On an error the temp file is removed and the target left as it was; a process
killed mid-write leaves only the hidden temp file beside an intact target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what open() / mkdir() would give; tempfile's mkstemp / mkdtemp make private 0600 / 0700 entries
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to `path` (parent folder created) for the caller to write; on success it
    is fsynced, given the umask's file mode (not mkstemp's 0600) and os.replace'd onto `path`; on any
    exception it is removed and the exception re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files; outputs are meant to be shared
        finally:
            os.close(fd)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """atomic_path with the temp file already open for binary writing (e.g. for torch.save)."""
    with atomic_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` (same filesystem as the final destination, so os.replace is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, DIR_MODE)
    return path


def replace_dir(new: Path, dest: Path) -> None:
    """os.replace for a folder that may already exist (os.replace cannot overwrite a non-empty folder):
    the old one is renamed aside first, then deleted."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = make_temp_dir(dest.parent, f".{dest.name}.old-")
        os.replace(dest, old / "x")
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a folder in a temp sibling, then swap it in; on an error nothing changes."""
    dest = Path(dest)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)
