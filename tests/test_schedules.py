import pytest

from components.learning.schedules import poly_lr


def test_poly_matches_the_spec_formula():
    # lr = (0.01 - 1e-4) * (1 - it/T)^0.9 + 1e-4
    assert poly_lr(0, 40000, 0.01) == pytest.approx(0.01)
    assert poly_lr(20000, 40000, 0.01) == pytest.approx(0.0099 * 0.5**0.9 + 1e-4)
    assert poly_lr(40000, 40000, 0.01) == pytest.approx(1e-4)


def test_warmup_ramps_linearly_then_hands_over_to_poly():
    base = poly_lr(0, 100, 0.01)
    assert poly_lr(0, 100, 0.01, warmup_iters=10, warmup_ratio=0.1) == pytest.approx(0.1 * base)
    mid = poly_lr(5, 100, 0.01, warmup_iters=10, warmup_ratio=0.1)
    assert mid == pytest.approx(0.55 * poly_lr(5, 100, 0.01))
    assert poly_lr(10, 100, 0.01, warmup_iters=10) == pytest.approx(poly_lr(10, 100, 0.01))


def test_invalid_schedule():
    with pytest.raises(ValueError, match="max_iters"):
        poly_lr(0, 0, 0.01)
