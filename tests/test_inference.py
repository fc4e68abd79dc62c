"""Whole / slide / multi-scale + flip inference with stub models whose outputs are known."""

import pytest
import torch
from torch import nn

from components.learning.models.inference import predict_logits, slide_windows


class WindowMean(nn.Module):
    """Every pixel of a window gets the window's mean of input channel 0; records the crops."""

    align_corners = False

    def __init__(self):
        super().__init__()
        self.crops = []

    def encode_decode(self, img):
        self.crops.append(tuple(img.shape[2:]))
        mean = img[:, :1].mean(dim=(2, 3), keepdim=True)
        return mean.expand(-1, -1, *img.shape[2:]).repeat(1, 2, 1, 1)


class Pointwise(nn.Module):
    """Logits = (channel 0, -channel 0) per pixel; records the input sizes."""

    align_corners = False

    def __init__(self):
        super().__init__()
        self.sizes = []

    def encode_decode(self, img):
        self.sizes.append(tuple(img.shape[2:]))
        return torch.cat([img[:, :1], -img[:, :1]], dim=1)


def test_windows_clamped_to_the_border_on_a_non_divisible_size():
    # h: grids = (11 - 4 + 3 - 1) // 3 + 1 = 4; the last window 9..13 is shifted back to 7..11.
    # w: grids = (7 - 4 + 2 - 1) // 2 + 1 = 3; the last window 4..8 is shifted back to 3..7.
    windows = slide_windows(11, 7, crop_size=(4, 4), stride=(3, 2))
    assert sorted({(y1, y2) for y1, y2, _, _ in windows}) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert sorted({(x1, x2) for _, _, x1, x2 in windows}) == [(0, 4), (2, 6), (3, 7)]
    assert len(windows) == 12
    # An image smaller than the crop: one window, the whole image.
    assert slide_windows(3, 5, crop_size=(4, 8), stride=(2, 2)) == [(0, 3, 0, 5)]


def test_slide_sums_windows_and_divides_by_overlap_count():
    # 1×7 image whose channel 0 is the column index; crop 1×4, stride 2 -> windows at columns
    # 0..3, 2..5 and (clamped) 3..6 with means 1.5, 3.5, 4.5. Per column, the average of the
    # windows covering it: counts 1, 1, 2, 3, 2, 2, 1.
    img = torch.zeros(1, 3, 1, 7)
    img[0, 0, 0] = torch.arange(7.0)
    model = WindowMean()
    out = predict_logits(model, img, mode="slide", crop_size=(1, 4), stride=(1, 2))
    expected = torch.tensor([1.5, 1.5, 2.5, (1.5 + 3.5 + 4.5) / 3, 4.0, 4.0, 4.5])
    assert out.shape == (1, 2, 1, 7)
    torch.testing.assert_close(out[0, 0, 0], expected)
    assert model.crops == [(1, 4)] * 3


def test_whole_is_one_pass_on_the_full_image():
    img = torch.randn(2, 3, 6, 10)
    model = Pointwise()
    out = predict_logits(model, img, mode="whole")
    torch.testing.assert_close(out, torch.cat([img[:, :1], -img[:, :1]], dim=1))
    assert model.sizes == [(6, 10)]


def test_flip_pass_is_flipped_back_and_probabilities_are_averaged():
    # A pointwise model commutes with flipping, so if the flipped pass is flipped back both passes
    # give softmax(logits) exactly; without the flip-back an asymmetric input would not.
    img = torch.zeros(1, 3, 4, 6)
    img[0, 0] = torch.arange(24.0).reshape(4, 6) / 4
    model = Pointwise()
    out = predict_logits(model, img, mode="whole", flip=True)
    expected = torch.cat([img[:, :1], -img[:, :1]], dim=1).softmax(dim=1)
    torch.testing.assert_close(out, expected)
    assert model.sizes == [(4, 6), (4, 6)]


def test_multi_scale_resizes_input_with_mmcv_rounding_and_returns_input_size():
    img = torch.full((1, 3, 30, 50), 0.7)
    model = Pointwise()
    out = predict_logits(model, img, mode="whole", ratios=(0.5, 0.75, 1.25), flip=True)
    # int(x * r + 0.5): 30 * 0.75 = 22.5 -> 23, 50 * 0.75 = 37.5 -> 38
    assert model.sizes == [(15, 25), (15, 25), (23, 38), (23, 38), (38, 63), (38, 63)]
    assert out.shape == (1, 2, 30, 50)
    # A constant image stays constant through every resize: the average equals one softmax.
    torch.testing.assert_close(out, torch.tensor([0.7, -0.7]).softmax(0).reshape(1, 2, 1, 1).expand_as(out))


def test_multi_scale_slide_runs_windows_at_every_scale():
    img = torch.randn(1, 3, 20, 30)
    model = WindowMean()
    out = predict_logits(model, img, mode="slide", crop_size=(16, 16), stride=(8, 8), ratios=(0.5, 1.0))
    assert out.shape == (1, 2, 20, 30)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 20, 30))  # probabilities
    # ratio 0.5 -> 10×15, smaller than the crop: one window; ratio 1.0 -> 20×30: 2 × 3 windows.
    assert model.crops == [(10, 15)] + [(16, 16)] * 6


def test_bad_arguments():
    model = Pointwise()
    img = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, img, mode="sliding")
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(model, img, mode="slide")
    with pytest.raises(ValueError, match="ratios"):
        predict_logits(model, img, ratios=())


def test_real_model_slide_and_ms_flip_shapes():
    from components.learning.models import build_dnlnet

    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=3).eval()
    img = torch.randn(1, 3, 32, 48)
    slide = predict_logits(model, img, mode="slide", crop_size=(32, 32), stride=(16, 16))
    # the two windows (columns 0..31 and 16..47) are exact encode_decode outputs where unshared
    with torch.no_grad():
        left = model.encode_decode(img[:, :, :, :32])
    torch.testing.assert_close(slide[..., :16], left[..., :16])
    probs = predict_logits(model, img, mode="whole", ratios=(0.75, 1.0), flip=True)
    assert probs.shape == (1, 3, 32, 48)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 32, 48))


def test_ms_flip_takes_the_plain_pass_it_is_given():
    """The ms+flip pass at the input size, unflipped, is the single-scale pass: given those logits it
    does not run the model again, and the scores are those of running every pass."""
    img = torch.randn(1, 3, 8, 12)
    model = Pointwise()
    plain = predict_logits(model, img)
    every_pass = predict_logits(model, img, ratios=(0.5, 1.0), flip=True)
    model.sizes.clear()
    reused = predict_logits(model, img, ratios=(0.5, 1.0), flip=True, plain=plain)
    assert model.sizes == [(4, 6), (4, 6), (8, 12)]   # 0.5, 0.5 flipped, 1.0 flipped: 3 passes of 4
    torch.testing.assert_close(reused, every_pass, rtol=0, atol=0)


def test_an_evaluation_runs_the_shared_pass_once():
    """evaluate_split with single-scale and ms+flip: 1 + 3 passes per image, not 1 + 4, and each
    setting's counts as when it runs alone."""
    from components.learning.segment import InferenceSetting, evaluate_split

    img, label = torch.randn(1, 3, 8, 12), torch.randint(0, 2, (1, 8, 12))
    single, ms = InferenceSetting(), InferenceSetting(ratios=(0.5, 1.0), flip=True)
    model = Pointwise()
    both = evaluate_split(model, [(img, label)], 2, {"single": single, "ms": ms}, torch.device("cpu"))
    assert len(model.sizes) == 4
    for name, setting in (("single", single), ("ms", ms)):
        alone = evaluate_split(Pointwise(), [(img, label)], 2, {name: setting}, torch.device("cpu"))
        assert both[name].metrics() == alone[name].metrics()
