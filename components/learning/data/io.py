"""Reading a dataset from an extracted folder or straight from its official zip archive.

A `DirTree` or `ZipTree` lists files by their path inside the dataset (posix, relative), reads them
and places a copy into a destination: a hardlink when source and destination share a filesystem,
else a copy; for an archive, the member is extracted. Sources are only ever read.
Both pickle cheaply (a zip is reopened lazily in each worker process).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path
from typing import NamedTuple

from components.learning.data.validate import DataError

MANIFEST_COLUMNS = ("image", "label", "height", "width", "sha256")  # of <split>/manifest.csv


class DirTree:
    def __init__(self, root: Path):
        self.root = Path(root)

    def where(self, rel: str) -> str:
        return str(self.root / rel)

    def files(self, prefix: str) -> list[str]:
        """Every file below `prefix` (recursive), as sorted paths relative to the root."""
        base = self.root / prefix
        out = []
        for folder, _, names in os.walk(base):
            for name in names:
                out.append((Path(folder) / name).relative_to(self.root).as_posix())
        return sorted(out)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def local_path(self, rel: str) -> Path | None:
        return self.root / rel

    def place(self, rel: str, dest: Path) -> None:
        link_or_copy(self.root / rel, dest)


class ZipTree:
    """Files of an archive below `root` (a top-level folder such as 'ADEChallengeData2016/')."""

    def __init__(self, archive: Path, root: str = ""):
        self.archive = Path(archive)
        self.root = root
        self._zip: zipfile.ZipFile | None = None
        try:
            names = self._open().namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{self.archive}: not a readable zip archive ({e})") from None
        self._names = {n[len(root) :] for n in names if n.startswith(root) and not n.endswith("/")}

    def __getstate__(self):
        return {"archive": self.archive, "root": self.root, "_names": self._names, "_zip": None}

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.archive)
        return self._zip

    def where(self, rel: str) -> str:
        return f"{self.archive}:{self.root}{rel}"

    def files(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(n for n in self._names if n.startswith(prefix))

    def exists(self, rel: str) -> bool:
        return rel in self._names

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._open().read(self.root + rel)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged member (bad CRC, truncated archive)
            raise DataError(f"{self.where(rel)}: cannot extract from the archive ({e})") from None

    def local_path(self, rel: str) -> Path | None:
        return None

    def place(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read_bytes(rel))


def open_zip(archive: Path, top_folder: str, keep_top: bool = False) -> ZipTree:
    """The archive's files below `top_folder/`, named with (keep_top) or without that folder.
    A wrong archive (no such top-level folder) is a DataError naming the archive."""
    prefix = top_folder.rstrip("/") + "/"
    tree = ZipTree(archive, "" if keep_top else prefix)
    if not tree.files(prefix if keep_top else ""):
        raise DataError(
            f"{archive}: expected a top-level '{top_folder}/' folder in the archive "
            f"(is this the right archive?)"
        )
    return tree


def link_or_copy(src: Path, dest: Path) -> None:
    """Hardlink (same filesystem, no data copied) else copy. The source is never opened for writing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # other filesystem, or links not permitted
        shutil.copyfile(src, dest)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Source(NamedTuple):
    """Where a dataset's images and labels are read from (one tree, or one per archive)."""

    images: DirTree | ZipTree
    labels: DirTree | ZipTree


class Item(NamedTuple):
    """One image of a split: its paths in the source and in the prepared split folder."""

    image: str  # in the source, e.g. leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
    label: str  # its label file in the source (polygon JSON, labelIds PNG, ADE annotation PNG)
    out_image: str  # in the prepared split folder, e.g. images/aachen/...
    out_label: str
