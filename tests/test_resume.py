"""A damaged checkpoint never blocks a run: every checkpoint records its files' sha256 when written; on
resume a damaged one (truncated, bit-flipped, missing file) is named in one warning line and the run
continues from the newest intact checkpoint, or starts fresh, saying so, when there is none. Local
folders and S3 (moto on loopback) alike, then through the real train stage on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_EXPERIMENT, as_params
from loop_hooks import FaultHooks

from components.training.checkpointing import damage, resume_state, save_train_checkpoint, write_checksums


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))


def _write_run(run: Path) -> None:
    """Two checkpoints of one run, as the loop writes them: iterations 2 and 4 (weights seeded 2, 4)."""
    for index, iteration in enumerate((2, 4)):
        folder = run / f"checkpoint_00000{index}"
        folder.mkdir(parents=True)
        model = _model(iteration)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        state = {"iteration": iteration, "train_time_s": 1.0, "best": None, "curve": [{"iteration": iteration}]}
        save_train_checkpoint(folder, model, optimizer, scaler, state, {"iteration": iteration})
        (folder / "summary.json").write_text(json.dumps({"iteration": iteration}))
        write_checksums(folder)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _resume(checkpoint) -> tuple[dict | None, list[str], torch.nn.Module]:
    lines, model = [], _model(0)
    state, _ = resume_state(checkpoint, model, lines.append)
    return state, lines, model


def _local(run: Path, name: str):
    import pyarrow.fs
    from ray.train import Checkpoint

    return Checkpoint(str(run / name), filesystem=pyarrow.fs.LocalFileSystem())


def _weights_equal(model, seed: int) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model(seed).state_dict().values(),
                                                  strict=True))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "missing"])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_intact_one(tmp_path, how):
    run = tmp_path / "run"
    _write_run(run)
    latest = run / "checkpoint_000001"
    state, lines, model = _resume(_local(run, "checkpoint_000001"))
    assert state["iteration"] == 4 and lines == [] and _weights_equal(model, 4)   # intact: no word

    {"truncated": _truncate, "bit-flipped": _flip, "missing": Path.unlink}[how](latest / "train_state.pt")
    assert damage(latest) is not None and damage(run / "checkpoint_000000") is None
    state, lines, model = _resume(_local(run, "checkpoint_000001"))
    assert state["iteration"] == 2 and _weights_equal(model, 2)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"checkpoint {latest} is damaged (train_state.pt ")
    assert lines[0].endswith(f"resuming from {run / 'checkpoint_000000'} (iteration 2)")


def test_with_no_intact_checkpoint_the_run_starts_fresh_saying_so(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    _truncate(run / "checkpoint_000001" / "model.pt")
    _flip(run / "checkpoint_000000" / "model.pt")
    state, lines, model = _resume(_local(run, "checkpoint_000001"))
    assert state is None and _weights_equal(model, 0)            # the model left as it was built
    assert len(lines) == 2 and all(line.endswith("no intact checkpoint left, starting fresh") for line in lines)
    assert "checkpoint_000001 is damaged (model.pt does not match its sha256" in lines[0]


def test_a_checkpoint_from_before_checksums_is_judged_by_loading_it(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    for folder in run.iterdir():
        (folder / "checksums.json").unlink()
    assert _resume(_local(run, "checkpoint_000001"))[0]["iteration"] == 4
    _truncate(run / "checkpoint_000001" / "train_state.pt")
    state, lines, _ = _resume(_local(run, "checkpoint_000001"))
    assert state["iteration"] == 2 and "is damaged (unreadable (" in lines[0]


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_checkpoint_on_s3_resumes_from_the_previous_intact_one(moto_s3, tmp_path, how):
    import pyarrow.fs
    from ray.train import Checkpoint

    from components.storage import pyarrow_filesystem

    run = tmp_path / "run"
    _write_run(run)
    {"truncated": _truncate, "bit-flipped": _flip}[how](run / "checkpoint_000001" / "model.pt")
    bucket = moto_s3.bucket("runs")
    fs, root = pyarrow_filesystem(f"s3://{bucket}/exp-run", moto_s3.endpoint, "us-east-1")
    pyarrow.fs.copy_files(str(run), root, destination_filesystem=fs)
    state, lines, model = _resume(Checkpoint(f"{root}/checkpoint_000001", filesystem=fs))
    assert state["iteration"] == 2 and _weights_equal(model, 2)
    assert len(lines) == 1 and "checkpoint_000001 is damaged (model.pt" in lines[0]
    assert lines[0].endswith(f"resuming from {root}/checkpoint_000000 (iteration 2)")


@pytest.mark.integration
def test_train_stage_rerun_over_a_damaged_checkpoint_starts_fresh_instead_of_failing(ray_local, make_params,
                                                                                     tmp_path, monkeypatch,
                                                                                     capfd):
    """A run stopped after its only checkpoint (iteration 2 of 4), that checkpoint then truncated: the
    rerun names it in one line and trains from 0 to the end, where it used to fail after Ray's restarts."""
    from ray.train import TrainingFailedError

    import pipeline.train
    from pipeline.train import train_experiment

    monkeypatch.setattr(pipeline.train, "code_hash", lambda *args: "pinned-by-the-test")
    params = make_params(tmp_path)   # 4 iterations, checkpoints at 2 and 4
    stop = {"rank": 0, "iteration": 2, "how": "raise", "marker": str(tmp_path / "stopped")}
    with pytest.raises(TrainingFailedError):
        train_experiment(as_params(params), SMALL_EXPERIMENT, out_root=tmp_path / "out", hooks=FaultHooks(fault=stop))
    [checkpoint] = [p for p in (tmp_path / "runs").glob(f"{SMALL_EXPERIMENT}-*/checkpoint_*") if p.is_dir()]
    _truncate(checkpoint / "model.pt")
    capfd.readouterr()

    out = train_experiment(as_params(params), SMALL_EXPERIMENT, out_root=tmp_path / "out")
    assert out["start_iteration"] == 0 and out["final"]["iteration"] == 4
    logged = capfd.readouterr()
    lines = [line for line in (logged.out + logged.err).splitlines() if "is damaged" in line]
    assert lines and all(f"checkpoint {checkpoint} is damaged (model.pt does not match its sha256" in line
                         and line.endswith("no intact checkpoint left, starting fresh") for line in lines)
