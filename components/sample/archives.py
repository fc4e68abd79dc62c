"""The official zip archives of the sample datasets (what `prepare` reads when pointed at archives).

Members are stored with fixed dates: the same seed gives byte-identical archives.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from components.atomic import atomic_path

_ZIP_DATE = (2016, 1, 1, 0, 0, 0)  # fixed member dates: the same seed gives byte-identical archives


def write_zip(
    archive: Path, root: Path, members: Iterable[str], extra: dict[str, bytes] | None = None
) -> None:
    """Zip the folders `members` (relative to root) into `archive`, stored with their paths, atomically."""
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted((extra or {}).items()):
            zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
        for member in members:
            for path in sorted((root / member).rglob("*")):
                if path.is_file():
                    info = zipfile.ZipInfo(path.relative_to(root).as_posix(), _ZIP_DATE)
                    zf.writestr(info, path.read_bytes())


def write_cityscapes_archives(root: Path, dest: Path) -> None:
    """The two official archives of a Cityscapes-format folder: leftImg8bit_trainvaltest.zip and
    gtFine_trainvaltest.zip, each with its top-level folder plus README / license.txt like the real ones."""
    extra = {"README": b"Cityscapes-format sample (generated)\n", "license.txt": b"generated sample data\n"}
    write_zip(dest / "leftImg8bit_trainvaltest.zip", root, ["leftImg8bit"], extra)
    write_zip(dest / "gtFine_trainvaltest.zip", root, ["gtFine"], extra)


def write_ade20k_archive(root: Path, dest: Path) -> None:
    write_zip(dest / "ADEChallengeData2016.zip", root, ["ADEChallengeData2016"])
