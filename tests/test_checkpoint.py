"""Checkpoint loading / saving in mmseg's layout, with clear errors."""

import os

import pytest
import torch
from torch import nn

from components.learning.models.checkpoint import (
    CheckpointMismatchError,
    load_mmseg_checkpoint,
    load_pretrained_backbone,
)
from components.learning.models.resnet import ResNetV1c
from components.training.checkpointing import save_checkpoint


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv_seg = nn.Conv2d(4, classes, 1)


def _randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_save_then_load_round_trip_in_mmseg_layout(tmp_path):
    src = _randomised(Tiny())
    path = tmp_path / "ckpt" / "iter_100.pth"
    save_checkpoint(path, src, {"iter": 100, "classes": ["a", "b", "c"]}, optimizer={"lr": 0.01})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "meta", "optimizer"}
    assert raw["meta"] == {"iter": 100, "classes": ["a", "b", "c"]}
    dst = Tiny()
    assert load_mmseg_checkpoint(dst, path) == raw["meta"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    assert os.listdir(path.parent) == ["iter_100.pth"]  # no temp file left behind


def test_bare_and_ddp_prefixed_state_dicts_load(tmp_path):
    src = _randomised(Tiny())
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pth")
    for name in ("bare.pth", "ddp.pth"):
        dst = Tiny()
        load_mmseg_checkpoint(dst, tmp_path / name)
        torch.testing.assert_close(dst.conv.weight, src.conv.weight)


def test_strict_load_error_lists_missing_unexpected_and_shape_keys(tmp_path):
    sd = Tiny(classes=5).state_dict()
    del sd["bn.running_var"]
    sd["decode_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_mmseg_checkpoint(Tiny(classes=3), path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert "1 missing: bn.running_var" in msg
    assert "1 unexpected: decode_head.extra.weight" in msg
    assert "2 shape mismatch" in msg and "conv_seg.weight (5, 4, 1, 1) vs model (3, 4, 1, 1)" in msg


def test_many_missing_keys_are_counted_and_truncated(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"372 missing: backbone\.stem\.0\.weight, .*, \.\.\."):
        from components.learning.models import build_dnlnet

        load_mmseg_checkpoint(build_dnlnet(), path)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt: not a readable PyTorch checkpoint"):
        load_mmseg_checkpoint(Tiny(), text)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mmseg_checkpoint(Tiny(), tmp_path / "nope.pth")
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="list.pth: expected a dict with a 'state_dict'"):
        load_mmseg_checkpoint(Tiny(), listing)


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, Tiny(), {"iter": 1})
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
        save_checkpoint(path, Tiny(), {"iter": 2}, bad=lambda: None)
    assert torch.load(path, weights_only=True)["meta"] == {"iter": 1}
    assert os.listdir(tmp_path) == ["latest.pth"]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A file shaped like mmseg's resnet50_v1c ImageNet weights: stem.*, layer*.*, fc.*."""
    torch.manual_seed(2)
    sd = _randomised(ResNetV1c(depth=50)).state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path_factory.mktemp("pretrained") / "resnet50_v1c.pth"
    torch.save({"state_dict": sd}, path)
    return path, sd


def test_backbone_loader_ignores_fc(imagenet_file):
    path, sd = imagenet_file
    backbone = ResNetV1c(depth=50)
    result = load_pretrained_backbone(backbone, path)
    assert not any(k.startswith("fc.") for k in result.loaded + result.unexpected)
    assert result.missing == [] and len(result.loaded) == len(backbone.state_dict())
    torch.testing.assert_close(backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])


def test_backbone_loader_accepts_backbone_prefix(tmp_path, imagenet_file):
    _, sd = imagenet_file
    path = tmp_path / "segmentor.pth"
    full = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    full["decode_head.conv_seg.weight"] = torch.zeros(19, 512, 1, 1)
    torch.save({"state_dict": full}, path)
    backbone = ResNetV1c(depth=50)
    result = load_pretrained_backbone(backbone, path)
    assert result.unexpected == []
    torch.testing.assert_close(backbone.stem[0].weight, sd["stem.0.weight"])


def test_backbone_loader_errors(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointMismatchError, match="unrelated.pth: no key matches the backbone"):
        load_pretrained_backbone(ResNetV1c(depth=50), path)
    path = tmp_path / "wrong_shape.pth"
    torch.save({"stem.0.weight": torch.zeros(16, 3, 3, 3)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"stem\.0\.weight \(16, 3, 3, 3\) vs backbone"):
        load_pretrained_backbone(ResNetV1c(depth=50), path)


def test_backbone_loader_needs_every_weight_but_num_batches_tracked(tmp_path, imagenet_file):
    _, sd = imagenet_file
    path = tmp_path / "no_counters.pth"                # mmcv's ImageNet files may lack num_batches_tracked
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}}, path)
    backbone = ResNetV1c(depth=50)
    result = load_pretrained_backbone(backbone, path)
    assert all(k.endswith("num_batches_tracked") for k in result.missing) and result.missing
    torch.testing.assert_close(backbone.stem[4].running_var, sd["stem.4.running_var"])

    path = tmp_path / "no_layer4.pth"                  # the old loader loaded this partially, silently
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("layer4.")}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"no_layer4.pth: \d+ of \d+ backbone weights missing from "
                                                      r"the file: layer4\.0\.conv1\.weight, .*, \.\.\.$"):
        load_pretrained_backbone(ResNetV1c(depth=50), path)


def test_backbone_loader_refuses_weights_of_a_deeper_resnet(tmp_path, imagenet_file):
    _, sd = imagenet_file
    deeper = dict(sd)                                  # R-101's layer3 goes on to layer3.22
    for b in range(6, 23):
        deeper.update({k.replace("layer3.5.", f"layer3.{b}."): v for k, v in sd.items() if k.startswith("layer3.5.")})
    path = tmp_path / "r101.pth"
    torch.save({"state_dict": deeper}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained_backbone(ResNetV1c(depth=50), path)
    assert str(err.value).startswith(f"{path}: 255 backbone weights of the file have no place in the backbone "
                                     "(layer3 has blocks 0..22 in the file, 0..5 in the backbone: ResNet-101 "
                                     "weights for a ResNet-50 backbone): layer3.6.conv1.weight, ")
