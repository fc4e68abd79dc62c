"""A Tune trial whose loss turns NaN fails with one line naming the trial, its learning rate, the loss and the
iteration (no Ray cluster: the loop's own NaN stop, through the fault hook's poisoned batch, then the trial
function's message for it)."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPERIMENT, REPO, as_params
from loop_hooks import poisoned

from components.learning.models import build_dnlnet
from components.learning.step import sgd, train_step
from components.learning.tuning import trial_config
from components.training.contract import NonFiniteLossError
from pipeline.config import read_raw
from pipeline.tune import non_finite_trial_error, sweep_base


def test_a_nan_in_a_trial_fails_it_with_its_one_line_message(tmp_path):
    params = as_params(read_raw(REPO / "params.yaml"))
    base = sweep_base(params.experiment(EXPERIMENT), params.tune, str(tmp_path / "trials"))
    cfg = trial_config(base, {"lr": 0.0123})           # as Tune samples it

    # The loop's stop: iteration 3's batch poisoned with NaN, as FaultHooks(nan_at=3) does in a real run.
    torch.manual_seed(0)
    model = build_dnlnet(depth=50, num_classes=19)
    batch = iter([(torch.rand(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64)))])
    optimizer = sgd(model.parameters(), lr=cfg.schedule.lr, momentum=0.9, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(FloatingPointError) as stop:
        train_step(model, optimizer, scaler, poisoned(batch), 1, torch.device("cpu"), "fp32", False, 3)
    stopped = str(stop.value)                          # what the loop returns to the trial as "stopped"

    error = non_finite_trial_error("a1b2c_00001", cfg, stopped)
    assert isinstance(error, NonFiniteLossError)
    assert str(error) == "trial a1b2c_00001 (lr 0.0123): loss is [nan, nan, nan] (loss, decode, aux) at iteration 3"
