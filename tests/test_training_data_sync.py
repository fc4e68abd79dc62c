"""Shipping the prepared dataset to worker nodes through the run storage, against a real S3 API
(moto's server on loopback, which boto3 and pyarrow both talk to)."""

from __future__ import annotations

import shutil

import pytest

from components.training.data_sync import local_dataset, manifest_hash, publish_dataset


def test_manifest_hash_follows_the_manifests(tiny_data, tmp_path):
    copy = tmp_path / "cityscapes"
    shutil.copytree(tiny_data / "cityscapes", copy)
    assert manifest_hash(copy) == manifest_hash(tiny_data / "cityscapes")
    with open(copy / "val" / "manifest.csv", "a") as f:
        f.write("\n")
    assert manifest_hash(copy) != manifest_hash(tiny_data / "cityscapes")
    with pytest.raises(FileNotFoundError, match=r"missing/train/manifest.csv: prepared manifest not found"):
        manifest_hash(tmp_path / "missing")


def test_local_data_is_used_as_it_is(tiny_data):
    data_dir = tiny_data / "cityscapes"
    assert local_dataset(data_dir, None, manifest_hash(data_dir)) == data_dir


def test_missing_data_and_local_storage_is_a_clear_error(tmp_path):
    expected = r"nowhere: prepared data not found on node .* train\.storage_path is local"
    with pytest.raises(FileNotFoundError, match=expected):
        local_dataset(tmp_path / "nowhere", None, "0" * 64)


def test_local_storage_publishes_nothing(tiny_data, tmp_path):
    assert publish_dataset(tiny_data / "cityscapes", str(tmp_path / "runs"), "0" * 64) is None


@pytest.fixture
def s3(monkeypatch):
    """A bucket on moto's S3 server; AWS_ENDPOINT_URL points boto3 and pyarrow at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket="dnlseg-test")
    yield "s3://dnlseg-test/runs"
    server.stop()


@pytest.mark.integration
def test_data_goes_to_s3_once_and_down_to_a_node_cache(s3, tiny_data, tmp_path):
    import boto3

    data_dir = tiny_data / "cityscapes"
    digest = manifest_hash(data_dir)
    uri = publish_dataset(data_dir, s3, digest)
    assert uri == f"{s3}/_datasets/cityscapes-{digest[:16]}"
    listing = boto3.client("s3").list_objects_v2(Bucket="dnlseg-test")["Contents"]
    keys = {o["Key"] for o in listing if not o["Key"].endswith("/")}   # pyarrow also writes folder markers
    files = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    prefix = f"runs/_datasets/cityscapes-{digest[:16]}/"
    assert keys == {prefix + f for f in files} | {prefix + "_COMPLETE"}
    assert publish_dataset(data_dir, s3, digest) == uri     # already there: nothing uploaded again

    # A node without the data downloads it once into its cache, then reuses it.
    local = local_dataset(tmp_path / "not-on-this-node", uri, digest, cache_root=tmp_path / "cache")
    assert local.parent == tmp_path / "cache" / "datasets" and manifest_hash(local) == digest
    assert {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} == files | {"_COMPLETE"}
    assert local_dataset(tmp_path / "not-on-this-node", uri, digest, cache_root=tmp_path / "cache") == local
