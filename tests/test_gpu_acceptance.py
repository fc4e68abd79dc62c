"""bench/gpu_acceptance.py (the GPU acceptance script) in its CPU dry mode: its arguments, and the quick steps
(the hardware check, the three precisions' training steps) at toy sizes, ending in its one table. Its Ray and
evaluate steps are the train and evaluate stages that the integration tests cover on the CPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "bench" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module   # Ray's cloudpickle registers it by value
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_acceptance", None)


def test_arguments(acceptance):
    args = acceptance.parse_args(["--dry", "--steps", "step, hardware"])
    assert args.dry and args.steps == ["step", "hardware"]
    assert acceptance.parse_args(["--dry"]).steps == list(acceptance.STEPS)
    with pytest.raises(SystemExit):
        acceptance.parse_args(["--dry", "--steps", "hardware,warp"])
    with pytest.raises(SystemExit):   # this CPU machine: only the dry mode
        acceptance.parse_args([])


def test_dry_mode_runs_the_quick_steps_and_prints_one_table(acceptance, tmp_path, capsys):
    from components.learning.models.speedups import fp32_math

    before = fp32_math()
    status = acceptance.main(["--dry", "--steps", "hardware,step", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert status == 0, out
    assert table[0] == "| step | check | result | figures |" and len(table) == 1 + 1 + 3   # header, hardware, 3 steps
    assert "| hardware | the node check names this CPU build | PASS |" in table[1]
    for row, precision, math in zip(table[2:], ("fp32", "tf32", "bf16"), ("ieee / matmul ieee", "tf32 / matmul ieee",
                                                                          "tf32 / matmul tf32"), strict=True):
        assert row.startswith(f"| step | {precision} step, R-18-D8 32x64 batch 2 | PASS |") and f"conv {math}" in row
    import torch

    torch.backends.cudnn.conv.fp32_precision = before["conv"]
    torch.backends.cuda.matmul.fp32_precision = before["matmul"]
