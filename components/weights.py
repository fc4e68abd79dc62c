"""Pretrained weights as an input: resolve a spec (local path, http(s) URL or mmcv model-zoo name), fetch
it once into a cache and verify it.

mmcv / mmseg / torch.hub name their files `<name>-<first 8+ hex of the sha256>.pth`
(`resnet50_v1c-2cccc1ad.pth`): the hex in the name is checked against the file's content, for downloads
and local files alike. A download goes to a temp file in the cache folder that is renamed to its final
name only once complete and verified, so the cache only ever holds complete verified files and two
processes fetching the same file at once cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.fs
from tqdm import tqdm

from components.atomic import atomic_open
from components.storage import pyarrow_filesystem

# From mmcv 1.x's mmcv/model_zoo/open_mmlab.json (github.com/open-mmlab/mmcv): only the entries DNLNet's
# configs use (`pretrained='open-mmlab://resnet{50,101}_v1c'`), and mmseg's r18-d8 configs' for R-18-D8.
OPEN_MMLAB_URLS = {
    "resnet18_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
# mmcv/runner/checkpoint.py (load_from_openmmlab) accepts both prefixes.
OPEN_MMLAB_PREFIXES = ("open-mmlab://", "openmmlab://")

# torch.hub's check_hash convention (HASH_REGEX there is r"-([a-f0-9]*)\."), anchored to the end here.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20
_DEFAULT_TIMEOUT_S = 60.0

# sha256 of files already hashed in this process, by (path, size, mtime, inode): fetch() hashes each
# file, and the caller hashes it again for the run identity.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


class WeightsError(ValueError):
    """Weights that cannot be resolved, fetched or verified; the message is one line naming the source."""


def _fail(source: object, what: str) -> WeightsError:
    return WeightsError(" ".join(f"weights: {source}: {what}".split()))


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def resolve_source(spec: str, root: str | os.PathLike) -> str:
    """The URL or absolute local path that `spec` names.

    `spec`: `open-mmlab://<name>` / `openmmlab://<name>` (mmcv's model zoo; only the names DNLNet uses are
    known here), an http(s) URL (returned unchanged), or a local path (relative paths resolve against
    `root`, the repo the stage runs in; symlinks are kept, so the file name stays the one given).
    """
    spec = (os.fspath(spec) if spec is not None else "").strip()
    if not spec:
        raise WeightsError("weights: none given: expected a local path, an http(s) URL or "
                           f"{', '.join(OPEN_MMLAB_PREFIXES[0] + n for n in OPEN_MMLAB_URLS)}")
    for prefix in OPEN_MMLAB_PREFIXES:
        if spec.startswith(prefix):
            name = spec[len(prefix):]
            if name not in OPEN_MMLAB_URLS:
                known = ", ".join(prefix + n for n in OPEN_MMLAB_URLS)
                raise _fail(spec, f"unknown model-zoo name (known: {known}; give a URL or a local path for "
                                  "other weights)")
            return OPEN_MMLAB_URLS[name]
    if _is_url(spec):
        return spec
    scheme = _SCHEME.match(spec)
    if scheme:
        hint = (": torchvision's ResNets are ResNet-V1b (7x7 stem), DNLNet's table was trained from "
                "open-mmlab://resnet50_v1c / open-mmlab://resnet101_v1c" if scheme[1] == "torchvision" else "")
        raise _fail(spec, f"unsupported scheme '{scheme[1]}://' (expected a local path, http(s):// or "
                          f"open-mmlab://){hint}")
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    return os.path.abspath(path)


def expected_sha256_prefix(filename: str | os.PathLike) -> str | None:
    """The sha256 prefix a file name carries (`resnet50_v1c-2cccc1ad.pth` -> '2cccc1ad'), or None.

    mmcv / mmseg / torch.hub convention: the name ends in `-<8 or more lowercase hex>.pth`.
    """
    match = _HASH_IN_NAME.search(os.path.basename(os.fspath(filename)))
    return match[1] if match else None


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (remembered per path, size and mtime within this process)."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _hash_error(source: object, digest: str, prefix: str, removed: bool) -> WeightsError:
    return _fail(source, f"sha256 {digest[:16]}... does not start with {prefix} (corrupt or wrong file)"
                         + (": removed" if removed else ""))


def _check_local(path: Path, spec: str) -> Path:
    if not path.is_file():
        given = f" (given as '{spec}')" if os.fspath(spec) != str(path) else ""
        what = "not a file" if path.exists() else "no such file"
        raise _fail(path, f"{what}{given}")
    prefix = expected_sha256_prefix(path.name)
    if prefix:
        digest = sha256_file(path)
        if not digest.startswith(prefix):
            raise _hash_error(path, digest, prefix, removed=False)
    return path


def default_cache_dir() -> Path:
    """`$DNLSEG_CACHE`, else `~/.cache/dnlseg`."""
    return Path(os.environ.get("DNLSEG_CACHE") or "~/.cache/dnlseg").expanduser()


def fetch(spec: str, *, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
          progress: bool = True, timeout: float = _DEFAULT_TIMEOUT_S) -> Path:
    """The local file for `spec` (see resolve_source), verified.

    A local path is checked (it exists; a hash prefix in its name matches its sha256) and returned as is.
    A URL is downloaded once into `cache_dir` (default_cache_dir()) under its file name; a file already
    there is verified and reused without any request. Every failure is one WeightsError line; the cache
    then holds no partial or unverified file.
    """
    source = resolve_source(spec, root)
    if not _is_url(source):
        return _check_local(Path(source), spec)

    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
    if not name or name in (".", ".."):
        raise _fail(source, "the URL names no file")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = folder / name
    prefix = expected_sha256_prefix(name)
    if dest.is_file():
        if not prefix or sha256_file(dest).startswith(prefix):
            return dest
        dest.unlink(missing_ok=True)  # a corrupted cache entry: fetch it again
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail(source, f"cannot create the cache folder {folder} ({_reason(e)})") from e
    _download(source, dest, prefix, progress=progress, timeout=timeout)
    return dest


def _download(url: str, dest: Path, prefix: str | None, *, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "dnlseg-weights"})  # noqa: S310 - http(s) only
    try:   # S310: only http(s) URLs get here (resolve() refuses any other scheme)
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as e:
        e.close()
        raise _fail(url, f"HTTP {e.code}" + (f" {e.reason}" if e.reason else "")) from None
    except urllib.error.URLError as e:
        reason = e.reason if isinstance(e.reason, BaseException) else e
        raise _fail(url, f"unreachable ({_reason(reason)})") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad status lines
        raise _fail(url, f"unreachable ({_reason(e)})") from e

    got = 0
    # atomic_open: a concurrent fetch of the same file replaces it with the same bytes; a failure leaves
    # nothing but complete verified files in the cache.
    with response, atomic_open(dest) as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                  file=sys.stderr, disable=not progress, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _fail(url, f"download failed after {got} bytes ({_reason(e)})") from e
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got < total:
            raise _fail(url, f"truncated (got {got} of {total} bytes)")
        hexdigest = digest.hexdigest()
        if prefix and not hexdigest.startswith(prefix):
            raise _hash_error(url, hexdigest, prefix, removed=True)
    _DIGESTS[_stat_key(dest)] = hexdigest


# --- to every worker node -------------------------------------------------------------------------

def publish(path: str | os.PathLike, storage_path: str, sha256: str) -> str | None:
    """Driver: copy the verified file to the run storage (`<storage_path>/_weights/<sha256[:16]>-<name>`,
    once per content) for nodes that lack it; None when storage is a local folder (one machine or a
    shared filesystem: the workers read `path` itself)."""

    if "://" not in storage_path:
        return None
    uri = f"{storage_path.rstrip('/')}/_weights/{sha256[:16]}-{Path(path).name}"
    fs, remote = pyarrow_filesystem(uri)
    if fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
        pyarrow.fs.copy_files(str(path), remote, destination_filesystem=fs)
    return uri


def on_this_node(path: str | os.PathLike, uri: str | None, sha256: str,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """Worker: the weights on this node: `path` when it is here with that content, else a verified copy
    of `uri` (what `publish` returned) in this node's cache."""

    path = Path(path)
    if path.is_file() and sha256_file(path) == sha256:
        return path
    if not uri:
        raise _fail(path, "not on this node and train.storage_path is local: use an s3:// storage_path "
                          "(the driver then ships the file) or a URL / a path every node mounts")
    local = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / uri.rsplit("/", 1)[-1]
    if not (local.is_file() and sha256_file(local) == sha256):
        fs, remote = pyarrow_filesystem(uri)
        with atomic_open(local) as out, fs.open_input_stream(remote) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        if sha256_file(local) != sha256:
            local.unlink(missing_ok=True)
            raise _fail(uri, f"the copy in storage does not have sha256 {sha256[:16]}...")
    return local
