"""Carry a cluster job's small git-tracked outputs (dvc.lock, metrics/<exp>, plots/<exp>) through S3.

    python deploy/results.py push <uri> <path>...   # on the cluster, after `dvc repro`
    python deploy/results.py pull <uri>             # on your machine, into the current checkout

<uri> is s3://bucket/prefix (or a local folder). The model itself travels through the DVC remote.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow.fs


def push(uri: str, paths: list[str]) -> None:
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    for path in map(Path, paths):
        if not path.exists():
            print(f"results: {path} not found, skipped", file=sys.stderr)
            continue
        for file in [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()):
            fs.create_dir(f"{root}/{file.parent.as_posix()}", recursive=True)
            with open(file, "rb") as src, fs.open_output_stream(f"{root}/{file.as_posix()}") as dst:
                dst.write(src.read())
            print(f"results: pushed {file}")


def pull(uri: str) -> None:
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        dest = Path(info.path[len(root) + 1:])
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            data = src.read()
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        print(f"results: fetched {dest}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("push", "pull"):
        sys.exit(__doc__)
    push(sys.argv[2], sys.argv[3:]) if sys.argv[1] == "push" else pull(sys.argv[2])
