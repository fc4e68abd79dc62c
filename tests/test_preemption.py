"""The training loop's just-in-time checkpoint on a preemption notice, in-process with a fake Session (no
Ray): Ray Train's session answers `preempted` from ray.train.get_preemption_info()."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import SMALL_EXPERIMENT, as_params

from components.learning.loop import train


class NoticeSession:
    """One rank, CPU, a fresh run; the notice comes after iteration `notice_at` (and stays, as Ray's does)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, data_dir: Path, notice_at: int):
        self.data_dir, self.notice_at = data_dir, notice_at
        self.asked, self.checkpoints = [], []

    def wrap(self, model):
        return model

    def resume(self, model):
        return None

    def dataset_dir(self) -> Path:
        return self.data_dir

    def pretrained_weights(self) -> Path:
        raise AssertionError("random init: no weights asked for")

    def started(self, state, per_step, accum):
        state.setdefault("best", None)
        state.setdefault("curve", [])

    def stepped(self, state, it, lr, losses, seconds, is_eval):
        pass

    def evaluated(self, state, summary, result):
        pass

    def checkpoint(self, state, model, optimizer, scaler, summary):
        self.checkpoints.append((state["iteration"], dict(summary)))

    def stopped(self, message):
        raise AssertionError(message)

    def preempted(self, it: int) -> bool:
        self.asked.append(it)
        return it >= self.notice_at


def test_a_preemption_notice_checkpoints_at_once_and_once(make_params, tiny_data, tmp_path):
    """6 iterations, evaluations at 3 and 6; the notice after iteration 4: a checkpoint at 4, not
    evaluated (figures NaN, so Ray never ranks it best), and no second one at 5 while the notice stays;
    the evaluation checkpoints as before. The loop asks after every iteration that does not evaluate."""
    params = make_params(tmp_path, max_iters=6, evals_per_run=2, num_workers=1)
    cfg = as_params(params).experiment(SMALL_EXPERIMENT)
    session = NoticeSession(tiny_data / "cityscapes", notice_at=4)
    outcome = train(cfg, session)
    assert outcome.iteration == 6 and outcome.stopped is None
    assert [it for it, _ in session.checkpoints] == [3, 4, 6]
    jit = session.checkpoints[1][1]
    assert jit["iteration"] == 4 and all(math.isnan(jit[k]) for k in ("mIoU", "mAcc", "aAcc"))
    assert not any(math.isnan(s["mIoU"]) for it, s in session.checkpoints if it != 4)
    assert session.asked == [1, 2, 4]   # 3 and 6 evaluate (and checkpoint); after 4, saved already
