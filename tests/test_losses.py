"""mmseg-style cross entropy: hand-computed numbers for both reductions."""

import math

import pytest
import torch

from components.learning.losses import cross_entropy


def _three_pixels():
    # pixel 0: logits (0, 0), label 0 -> ln 2
    # pixel 1: logits (2, 0), label 1 -> ln(1 + e^2)
    # pixel 2: ignored (255)
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, -1.0]]).reshape(1, 2, 1, 3)
    label = torch.tensor([[[0, 1, 255]]])
    per_pixel_sum = math.log(2.0) + math.log(1.0 + math.exp(2.0))
    return logits, label, per_pixel_sum


def test_default_divides_by_all_pixels_including_ignored():
    logits, label, total = _three_pixels()
    assert cross_entropy(logits, label).item() == pytest.approx(total / 3, rel=1e-6)  # 0.940025


def test_avg_non_ignore_divides_by_valid_pixels():
    logits, label, total = _three_pixels()
    loss = cross_entropy(logits, label, avg_non_ignore=True)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)  # 1.410038


def test_custom_ignore_index():
    logits, label, _ = _three_pixels()
    label = label.clone()
    label[0, 0, 2] = 0  # pixel 2 now valid with label 0: logits (1, -1) -> ln(1 + e^-2)
    label[0, 0, 0] = 1  # pixel 0 ignored via ignore_index=1 ... and so is pixel 1
    loss = cross_entropy(logits, label, ignore_index=1, avg_non_ignore=False)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-2.0)) / 3, rel=1e-5)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_all_ignored_gives_zero_not_nan(avg_non_ignore):
    logits = torch.randn(2, 4, 3, 3)
    label = torch.full((2, 3, 3), 255)
    assert cross_entropy(logits, label, avg_non_ignore=avg_non_ignore).item() == 0.0


def test_bf16_logits_give_an_fp32_loss():
    logits, label, total = _three_pixels()
    loss = cross_entropy(logits.bfloat16(), label)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(total / 3, rel=1e-2)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="label N×H×W"):
        cross_entropy(torch.randn(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
