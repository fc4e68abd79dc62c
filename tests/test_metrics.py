"""IoU metrics against hand-computed counts (mmseg's IoUMetric: counts summed over the dataset, then ratios)."""

import math

import pytest
import torch

from components.learning.metrics import IoUAccumulator


def _acc(pred, label, n=3):
    acc = IoUAccumulator(n)
    acc.update(torch.tensor(pred), torch.tensor(label))
    return acc


def test_counts_and_ratios_by_hand():
    # gt:   0 0 1 1 255 ; pred: 0 1 1 1 2   (last pixel ignored, pred 2 there must not count)
    acc = _acc([0, 1, 1, 1, 2], [0, 0, 1, 1, 255])
    assert acc.area_intersect.tolist() == [1, 2, 0]
    assert acc.area_pred.tolist() == [1, 3, 0]
    assert acc.area_label.tolist() == [2, 2, 0]
    assert acc.area_union.tolist() == [2, 3, 0]
    m = acc.compute()
    assert m["aAcc"] == pytest.approx(3 / 4)
    assert m["IoU"][0] == pytest.approx(1 / 2) and m["IoU"][1] == pytest.approx(2 / 3)
    assert math.isnan(m["IoU"][2])  # union 0: left out of mIoU
    assert m["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1) / 2)


def test_class_predicted_but_absent_from_gt_counts_as_zero_iou():
    acc = _acc([0, 2], [0, 0])
    m = acc.compute()
    assert m["IoU"][2] == 0.0
    assert math.isnan(m["Acc"][2])  # no gt pixels: nan, left out of mAcc
    assert m["mIoU"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["mAcc"] == pytest.approx(1 / 2)


def test_dataset_level_sums_not_mean_of_images():
    # image A: class 0 perfect on 1 pixel; image B: class 0 wrong on 3 pixels.
    acc = IoUAccumulator(2)
    acc.update(torch.tensor([0]), torch.tensor([0]))
    acc.update(torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]))
    m = acc.compute()
    assert m["IoU"][0] == pytest.approx(1 / 4)  # mean over images would give (1 + 0) / 2
    assert m["IoU"][1] == 0.0


def test_merge_equals_single_pass():
    torch.manual_seed(0)
    pred = torch.randint(0, 5, (4, 8, 8))
    label = torch.randint(0, 6, (4, 8, 8))
    label[label == 5] = 255
    whole = IoUAccumulator(5)
    whole.update(pred, label)
    a, b = IoUAccumulator(5), IoUAccumulator(5)
    a.update(pred[:2], label[:2])
    b.update(pred[2:], label[2:])
    a.merge(b)
    assert torch.equal(a.counts, whole.counts)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        _acc([0, 1], [0])
    with pytest.raises(ValueError, match="label values"):
        _acc([0], [7])
