"""Pretrained weights as an input (components.weights): resolve, fetch once into a cache, verify; and the
strict backbone loader on the fetched file. Every download comes from a loopback HTTP server the test
starts and stops itself."""

from __future__ import annotations

import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from components.learning.models.checkpoint import CheckpointMismatchError, load_pretrained_backbone
from components.learning.models.resnet import ResNetV1c
from components.weights import (
    OPEN_MMLAB_URLS,
    WeightsError,
    expected_sha256_prefix,
    fetch,
    resolve_source,
    sha256_file,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashed(folder: Path, stem: str, data: bytes) -> Path:
    """`data` written as `<stem>-<first 8 hex of its sha256>.pth` (the mmcv naming)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


@pytest.fixture
def blob(tmp_path) -> Path:
    """A small file with a correct hash name, for the failure paths."""
    return _hashed(tmp_path / "served", "blob", os.urandom(300_000))


@pytest.fixture(scope="module")
def v1c50(imagenet_v1c50):
    return imagenet_v1c50



# --- resolve / names ---------------------------------------------------------------------------------

def test_open_mmlab_names_resolve_to_mmcvs_urls_without_downloading(tmp_path):
    url = "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"
    assert resolve_source("open-mmlab://resnet50_v1c", tmp_path) == url
    assert resolve_source("openmmlab://resnet50_v1c", tmp_path) == url   # mmcv accepts both prefixes
    assert resolve_source("open-mmlab://resnet101_v1c", tmp_path) == (
        "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth")
    assert resolve_source("open-mmlab://resnet18_v1c", tmp_path) == (   # R-18-D8's, as mmseg's r18-d8 configs
        "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth")
    assert expected_sha256_prefix(OPEN_MMLAB_URLS["resnet50_v1c"].rsplit("/", 1)[1]) == "2cccc1ad"
    assert resolve_source("https://example.org/w/x.pth", tmp_path) == "https://example.org/w/x.pth"
    assert os.listdir(tmp_path) == []


def test_unknown_open_mmlab_name_lists_the_known_ones(tmp_path):
    with pytest.raises(WeightsError) as err:
        resolve_source("open-mmlab://resnet50_v1d", tmp_path)
    msg = str(err.value)
    assert "open-mmlab://resnet50_v1d: unknown model-zoo name" in msg and "\n" not in msg
    assert "open-mmlab://resnet50_v1c" in msg and "open-mmlab://resnet101_v1c" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(WeightsError, match="none given"):
        resolve_source("", tmp_path)
    with pytest.raises(WeightsError, match="unsupported scheme 'torchvision://'.*ResNet-V1b"):
        resolve_source("torchvision://resnet50", tmp_path)


def test_hash_prefix_in_file_names():
    assert expected_sha256_prefix("resnet50_v1c-2cccc1ad.pth") == "2cccc1ad"
    assert expected_sha256_prefix("dnl_r50-d8_512x1024_40k_cityscapes_20200904_233629-53d4ea93.pth") == "53d4ea93"
    assert expected_sha256_prefix("/some/dir/x-0123456789abcdef.pth") == "0123456789abcdef"
    for name in ("resnet50_v1c.pth", "dnl_r50-d8.pth", "x-2cccc1a.pth", "x-2CCCC1AD.pth", "x-2cccc1ad.zip"):
        assert expected_sha256_prefix(name) is None, name


# --- fetch -------------------------------------------------------------------------------------------

def test_download_once_into_the_cache_then_reuse(file_server, v1c50, tmp_path, capsys):
    served, _ = v1c50
    url = file_server.add(served.name, served)
    cache = tmp_path / "cache"
    path = fetch(url, root=tmp_path, cache_dir=cache, progress=True)
    assert path == cache / served.name
    assert _sha256(path) == _sha256(served) and sha256_file(path) == _sha256(served)
    assert served.name in capsys.readouterr().err                      # the tqdm bar, on stderr
    assert file_server.requests == [f"/{served.name}"]
    assert fetch(url, root=tmp_path, cache_dir=cache, progress=False) == path
    assert len(file_server.requests) == 1                                   # verified cache hit: no request
    assert os.listdir(cache) == [served.name]


def test_cache_dir_defaults_to_dnlseg_cache(file_server, blob, tmp_path, monkeypatch):
    monkeypatch.setenv("DNLSEG_CACHE", str(tmp_path / "envcache"))
    path = fetch(file_server.add(blob.name, blob), root=tmp_path, progress=False)
    assert path == tmp_path / "envcache" / blob.name and path.read_bytes() == blob.read_bytes()


def test_a_corrupt_cache_entry_is_fetched_again(file_server, blob, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / blob.name).write_bytes(b"half a file")
    path = fetch(file_server.add(blob.name, blob), root=tmp_path, cache_dir=cache, progress=False)
    assert path.read_bytes() == blob.read_bytes() and len(file_server.requests) == 1


def test_checksum_mismatch_is_an_error_and_leaves_the_cache_empty(file_server, blob, tmp_path):
    url = file_server.add("blob-deadbeef.pth", blob)                       # right bytes, wrong name
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        fetch(url, root=tmp_path, cache_dir=cache, progress=False)
    assert str(err.value) == (f"weights: {url}: sha256 {_sha256(blob)[:16]}... does not start with deadbeef "
                              "(corrupt or wrong file): removed")
    assert os.listdir(cache) == []


@pytest.mark.parametrize("hashed", [True, False])
def test_truncated_download_is_an_error_and_leaves_the_cache_empty(file_server, blob, tmp_path, hashed):
    name = blob.name if hashed else "plain.pth"                       # caught by length, not only by hash
    url = file_server.add(name, blob, send=1000)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        fetch(url, root=tmp_path, cache_dir=cache, progress=False)
    assert str(err.value) == f"weights: {url}: truncated (got 1000 of {blob.stat().st_size} bytes)"
    assert os.listdir(cache) == []


def test_http_404_is_one_line(file_server, tmp_path):
    url = f"{file_server.base}/resnet50_v1c-2cccc1ad.pth"
    with pytest.raises(WeightsError) as err:
        fetch(url, root=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert str(err.value) == f"weights: {url}: HTTP 404 Not Found"
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


def test_server_down_is_one_line(tmp_path):
    with socket.socket() as sock:                   # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/resnet50_v1c-2cccc1ad.pth"
        with pytest.raises(WeightsError) as err:
            fetch(url, root=tmp_path, cache_dir=tmp_path / "cache", progress=False, timeout=10)
    msg = str(err.value)
    assert msg.startswith(f"weights: {url}: unreachable (ConnectionRefusedError") and "\n" not in msg
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


def test_concurrent_fetches_of_one_file_agree(file_server, blob, tmp_path):
    url = file_server.add(blob.name, blob)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: fetch(url, root=tmp_path, cache_dir=cache, progress=False), range(4)))
    assert set(paths) == {cache / blob.name}
    assert os.listdir(cache) == [blob.name] and (cache / blob.name).read_bytes() == blob.read_bytes()


def test_relative_local_path_resolves_against_root(blob, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "served")                             # not the root: cwd must not matter
    root = tmp_path
    rel = f"served/{blob.name}"
    assert resolve_source(rel, root) == str(tmp_path / rel)
    assert fetch(rel, root=root, progress=False) == tmp_path / rel
    assert fetch(str(blob), root=tmp_path / "elsewhere", progress=False) == blob    # absolute: as is
    with pytest.raises(WeightsError) as err:
        fetch("served/nope.pth", root=root)
    assert str(err.value) == f"weights: {tmp_path / 'served/nope.pth'}: no such file (given as 'served/nope.pth')"


def test_local_file_with_a_wrong_hash_in_its_name_is_refused_and_kept(blob, tmp_path):
    wrong = blob.with_name("blob-deadbeef.pth")
    wrong.write_bytes(blob.read_bytes())
    with pytest.raises(WeightsError) as err:
        fetch(str(wrong), root=tmp_path)
    assert str(err.value) == (f"weights: {wrong}: sha256 {_sha256(blob)[:16]}... does not start with deadbeef "
                              "(corrupt or wrong file)")
    assert wrong.exists()                                              # the user's file is not deleted


# --- the fetched file into the backbone (strict) -----------------------------------------------------

def test_served_resnet50_v1c_file_loads_every_backbone_tensor(file_server, v1c50, tmp_path):
    served, sd = v1c50
    path = fetch(file_server.add(served.name, served), root=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    backbone = ResNetV1c(depth=50)
    result = load_pretrained_backbone(backbone, path)
    assert result.unexpected == [] and result.missing == []
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_missing_stem_keys_are_named(v1c50, tmp_path):
    _, sd = v1c50
    partial = {k: v for k, v in sd.items() if k not in ("stem.0.weight", "stem.4.running_var")}
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": partial}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_backbone(ResNetV1c(depth=50), path)
    required = sum(not k.endswith("num_batches_tracked") for k in ResNetV1c(depth=50).state_dict())
    assert str(err.value) == (f"{path}: 2 of {required} backbone weights missing from the file: "
                              "stem.0.weight, stem.4.running_var")


def test_torchvision_layout_is_named_resnet_v1b(v1c50, tmp_path):
    _, sd = v1c50
    tv = {k: v for k, v in sd.items() if not k.startswith("stem.")}     # layer*/fc.* have the same names
    tv["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    tv.update({f"bn1.{n}": torch.ones(64) for n in ("weight", "bias", "running_mean", "running_var")})
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(tv, path)                                               # torchvision: a bare state dict
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_backbone(ResNetV1c(depth=50), path)
    msg = str(err.value)
    assert "ResNet-V1b weights (torchvision layout: a 7x7 conv1.weight (64, 3, 7, 7), bn1.*)" in msg
    assert "not the ResNet-V1c deep stem" in msg and "open-mmlab://resnet50_v1c" in msg
    assert "missing from the file: stem.0.weight, stem.1.weight" in msg and "\n" not in msg


def test_resnet50_weights_into_resnet101_name_the_missing_layer3_blocks(v1c50):
    served, _ = v1c50
    backbone = ResNetV1c(depth=101)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_backbone(backbone, served)
    msg = str(err.value)
    assert "layer3 has blocks 0..5 in the file, 0..22 in the backbone" in msg
    assert "ResNet-50 weights for a ResNet-101 backbone" in msg
    assert "missing from the file" in msg and ": layer3.6.conv1.weight, layer3.6.bn1.weight" in msg


# --- to every node: through the run storage when a node lacks the driver's file ---------------------

def test_weights_reach_a_node_without_the_file_through_s3_storage(moto_s3, tmp_path, blob, monkeypatch):
    """The driver publishes its verified file to the run storage once per content; a worker on a node
    that lacks the driver's path takes a copy from there into its own cache, checked by sha256; a copy
    whose content changed in storage is refused."""
    from components.weights import on_this_node, publish

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    bucket = moto_s3.bucket("weights")
    sha = sha256_file(blob)
    assert publish(blob, str(tmp_path / "runs"), sha) is None          # local storage: nodes read the path
    uri = publish(blob, f"s3://{bucket}/runs", sha)
    assert uri == f"s3://{bucket}/runs/_weights/{sha[:16]}-{blob.name}"
    assert publish(blob, f"s3://{bucket}/runs", sha) == uri            # once per content
    assert on_this_node(blob, uri, sha, cache_dir=tmp_path / "node") == blob   # this node has it
    elsewhere = on_this_node(tmp_path / "not-here" / blob.name, uri, sha, cache_dir=tmp_path / "node")
    assert elsewhere.parent == tmp_path / "node" and elsewhere.read_bytes() == blob.read_bytes()
    with pytest.raises(WeightsError, match="not on this node and train.storage_path is local"):
        on_this_node(tmp_path / "not-here" / blob.name, None, sha, cache_dir=tmp_path / "other")
    moto_s3.client().put_object(Bucket=bucket, Key=uri.split(f"{bucket}/", 1)[1], Body=b"changed")
    with pytest.raises(WeightsError, match="does not have sha256"):
        on_this_node(tmp_path / "not-here" / blob.name, uri, sha, cache_dir=tmp_path / "fresh")
    assert not list((tmp_path / "fresh").glob("*"))                    # nothing unverified left
