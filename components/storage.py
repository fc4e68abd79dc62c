"""Object storage (S3 or any S3-compatible endpoint) and local folders behind a few small helpers.

Where things go is configuration (params.yaml `storage:` / `train.storage_path`, or the environment);
credentials never are: boto3, pyarrow and MLflow find them in the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY) or an instance profile, and no helper here takes or prints one.

Every S3 call goes through `with_retries`: connection errors, timeouts, throttling and 5xx answers are
retried with exponential backoff; what still fails raises one StorageError line that names the object
(s3://bucket/key), the endpoint and what to check.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pyarrow.fs
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, NoCredentialsError

from components.console import warn

RETRYABLE_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling",
                             "ThrottlingException", "RequestLimitExceeded", "InternalError",
                             "ServiceUnavailable", "500", "502", "503", "504"})
HINTS = {
    "NoSuchBucket": "create the bucket or fix the URI",
    "AccessDenied": "the credentials in the environment may not write there",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance profile)",
    "SignatureDoesNotMatch": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance profile)",
}
PROBE_NAME = ".dnlseg-write-probe"


class StorageError(RuntimeError):
    """An S3 or local storage operation that failed for good; the message names the object."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{uri}: expected s3://bucket[/prefix]")
    return parts.netloc, parts.path.lstrip("/")


def resolve_endpoint(endpoint_url: str | None = None) -> str:
    """The S3 endpoint: the one given, else $AWS_ENDPOINT_URL, else '' (AWS itself)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")


def resolve_region(region: str | None = None) -> str:
    return region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or ""


def endpoint_env(endpoint_url: str, region: str) -> dict[str, str]:
    """Environment variables that point boto3, pyarrow, s3fs and MLflow's S3 client at the endpoint."""
    env = {}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_DEFAULT_REGION"] = region
    return env


def client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client that fails fast (our own retry loop decides how long to keep trying)."""

    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.client("s3", endpoint_url=resolve_endpoint(endpoint_url) or None,
                        region_name=resolve_region(region) or "us-east-1", config=config)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _retryable(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, HTTPClientError)):   # refused, DNS, timeouts, resets
        return True
    if isinstance(error, ClientError):
        code = _error_code(error)
        status = (error.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
        return code in RETRYABLE_CODES or status >= 500
    return False


def with_retries(what: str, uri: str, call, *, attempts: int = 5, first_delay: float = 0.5,
                 max_delay: float = 8.0, endpoint_url: str | None = None, sleep=time.sleep):
    """`call()` with up to `attempts` tries, backing off first_delay, 2x, 4x ... (at most max_delay)
    between them on transient errors (each retry is reported on one stderr line). Raises StorageError."""

    endpoint = resolve_endpoint(endpoint_url) or "AWS"
    tic = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except NoCredentialsError:
            raise StorageError(f"{uri}: {what}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_"
                               f"ACCESS_KEY in the environment (or use an instance profile)") from None
        except (BotoCoreError, ClientError) as e:
            if not _retryable(e):
                code = _error_code(e)
                hint = HINTS.get(code, "")
                raise StorageError(f"{uri}: {what} failed at {endpoint} ({_first_line(e)})"
                                   + (f": {hint}" if hint else "")) from None
            if attempt == attempts:
                raise StorageError(
                    f"{uri}: {what} failed after {attempts} attempts over {time.monotonic() - tic:.1f} s "
                    f"({_first_line(e)}): is the S3 endpoint {endpoint} up, and storage.endpoint_url / "
                    f"AWS_ENDPOINT_URL right?") from None
            delay = min(max_delay, first_delay * 2 ** (attempt - 1))
            warn(f"[storage] {what} {uri}: {_first_line(e)}; retry {attempt}/{attempts - 1} "
                 f"in {delay:.1f} s")
            sleep(delay)
    raise AssertionError("unreachable")


# --- objects ---------------------------------------------------------------------------------------

def put_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None, region: str | None = None,
              **retry) -> None:
    bucket, key = split_s3_uri(uri)
    s3 = client(endpoint_url, region)
    with_retries("put", uri, lambda: s3.put_object(Bucket=bucket, Key=key, Body=data),
                 endpoint_url=endpoint_url, **retry)


def get_bytes(uri: str, *, endpoint_url: str | None = None, region: str | None = None, **retry) -> bytes:
    bucket, key = split_s3_uri(uri)
    s3 = client(endpoint_url, region)
    return with_retries("get", uri, lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read(),
                        endpoint_url=endpoint_url, **retry)


def delete(uri: str, *, endpoint_url: str | None = None, region: str | None = None, **retry) -> None:
    bucket, key = split_s3_uri(uri)
    s3 = client(endpoint_url, region)
    with_retries("delete", uri, lambda: s3.delete_object(Bucket=bucket, Key=key),
                 endpoint_url=endpoint_url, **retry)


def list_keys(uri: str, *, endpoint_url: str | None = None, region: str | None = None, **retry) -> list[str]:
    """Every key under the prefix of `uri` (s3://bucket/prefix)."""
    bucket, prefix = split_s3_uri(uri)
    s3 = client(endpoint_url, region)

    def list_all():
        keys, token = [], None
        while True:
            more = {"ContinuationToken": token} if token else {}
            page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, **more)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    return with_retries("list", uri, list_all, endpoint_url=endpoint_url, **retry)


def exists(location: str, *, endpoint_url: str | None = None, region: str | None = None, **retry) -> bool:
    """Whether a local path, or any S3 object at or under s3://bucket/prefix, exists."""
    if not is_s3(location):
        return Path(location).exists()
    bucket, prefix = split_s3_uri(location)
    s3 = client(endpoint_url, region)
    page = with_retries("list", location, lambda: s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1),
                        endpoint_url=endpoint_url, **retry)
    return page.get("KeyCount", 0) > 0


def probe_writable(location: str, *, endpoint_url: str | None = None, region: str | None = None,
                   **retry) -> None:
    """Write and delete a small probe object (S3) or file (local) under `location`; StorageError if not."""
    name = f"{PROBE_NAME}-{uuid.uuid4().hex[:8]}"
    if is_s3(location):
        uri = f"{location.rstrip('/')}/{name}"
        put_bytes(uri, b"probe", endpoint_url=endpoint_url, region=region, **retry)
        delete(uri, endpoint_url=endpoint_url, region=region, **retry)
        return
    folder = Path(location)
    # Folders made for the probe are removed again: a probe leaves nothing behind.
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{folder}: not writable ({e.strerror or _first_line(e)})") from None
    finally:
        for path in created:   # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def pyarrow_filesystem(uri: str, endpoint_url: str | None = None, region: str | None = None):
    """(filesystem, path) for pyarrow / Ray Train. s3:// URIs get an explicit S3FileSystem: with the
    custom endpoint (pyarrow's from_uri would ask AWS for the bucket's region) and a retry strategy that
    rides out a brief outage (10 attempts with backoff) instead of failing a checkpoint upload at once.
    The filesystem object carries the endpoint to Ray's controller and workers, never credentials."""

    if not is_s3(uri):
        return pyarrow.fs.FileSystem.from_uri(uri)
    bucket, key = split_s3_uri(uri)
    endpoint = resolve_endpoint(endpoint_url)
    region = resolve_region(region) or ("us-east-1" if endpoint else pyarrow.fs.resolve_s3_region(bucket))
    options = {"region": region,
               "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=10),
               "connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc + parts.path.rstrip("/"),
                       scheme=parts.scheme or "https")
    return pyarrow.fs.S3FileSystem(**options), f"{bucket}/{key}".rstrip("/")
