"""Getting the prepared dataset to every worker node.

On one machine (or a shared filesystem) workers read `data_dir` directly. On a cluster the job driver
holds the data and the GPU nodes do not: the driver then publishes the prepared splits once to the
run storage (`<storage_path>/_datasets/<dataset>-<manifest hash>`, S3 in practice; content-addressed,
so each dataset version is uploaded once), and a worker that lacks them downloads them to a
node-local cache (once per node: a file lock keeps co-located workers from racing).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path

import pyarrow.fs

from components.atomic import atomic_write_bytes
from components.storage import pyarrow_filesystem

SPLITS = ("train", "val")
DONE_MARKER = "_COMPLETE"


def manifest_hash(data_dir: Path | str, splits=SPLITS) -> str:
    """sha256 over the prepared splits' manifest.csv files (they list every file with its own sha256)."""
    digest = hashlib.sha256()
    for split in splits:
        path = Path(data_dir) / split / "manifest.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prepared manifest not found (run `dnlseg prepare` first)")
        digest.update(split.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _fs(uri: str):
    """pyarrow filesystem + path; the S3 endpoint comes from $AWS_ENDPOINT_URL (the train stage sets it
    from params' storage: section in the driver and the workers)."""

    return pyarrow_filesystem(uri)


def publish_dataset(data_dir: Path | str, storage_path: str, digest: str) -> str | None:
    """Driver: upload the splits to remote run storage unless already there; returns their URI.

    None when storage is a local path: then workers share the driver's filesystem view of data_dir.
    """

    if "://" not in storage_path:
        return None
    data_dir = Path(data_dir)
    uri = f"{storage_path.rstrip('/')}/_datasets/{data_dir.name}-{digest[:16]}"
    fs, root = _fs(uri)
    if fs.get_file_info(f"{root}/{DONE_MARKER}").type == pyarrow.fs.FileType.File:
        return uri
    for split in SPLITS:
        pyarrow.fs.copy_files(str(data_dir / split), f"{root}/{split}", destination_filesystem=fs,
                              use_threads=True)
    with fs.open_output_stream(f"{root}/{DONE_MARKER}") as f:   # written last: marks a complete upload
        f.write(digest.encode())
    return uri


def local_dataset(data_dir: Path | str, data_uri: str | None, digest: str | None,
                  cache_root: Path | str | None = None) -> Path:
    """Worker: `data_dir` if this node has it (same manifests), else a cached copy of `data_uri`."""

    data_dir = Path(data_dir)
    if digest is None:   # nothing to check against (the loop run outside the train stage)
        return data_dir
    try:
        if manifest_hash(data_dir) == digest:
            return data_dir
    except FileNotFoundError:
        pass
    if not data_uri:
        raise FileNotFoundError(f"{data_dir}: prepared data not found on node {socket.gethostname()} and "
                                f"train.storage_path is local: use an s3:// storage_path (the driver then "
                                f"ships the data) or put data.prepared_dir on a filesystem every node mounts")
    cache_root = Path(cache_root or os.environ.get("DNLSEG_DATA_CACHE", Path.home() / ".cache" / "dnlseg"))
    local = cache_root / "datasets" / data_uri.rstrip("/").rsplit("/", 1)[-1]
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one download per node; the others wait, then reuse it
        if not (local / DONE_MARKER).is_file():
            fs, root = _fs(data_uri)
            for split in SPLITS:
                pyarrow.fs.copy_files(f"{root}/{split}", str(local / split), source_filesystem=fs,
                                      use_threads=True)
            if manifest_hash(local) != digest:
                raise RuntimeError(f"{data_uri}: downloaded manifests do not match {digest[:16]}")
            atomic_write_bytes(local / DONE_MARKER, digest.encode())
    return local
