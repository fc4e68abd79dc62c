"""The training loop's parts without Ray: batch split, data order, one step with accumulation, the NaN
stop, distributed validation's metric math, checkpoint files, progress lines, run names."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from components.learning.distributed import InfiniteDistributedSampler, plan_batches, shard
from components.learning.step import train_step
from components.learning.validation import evaluate
from components.training.checkpointing import (
    load_train_checkpoint,
    save_train_checkpoint,
    staging_folder,
    write_curve_csv,
)
from components.training.progress import Progress

# --- batch split -----------------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch, workers, micro, expected", [
    (8, 4, 0, (2, 1)),      # Cityscapes: 4 GPUs x 2
    (16, 4, 0, (4, 1)),     # ADE20K: 4 GPUs x 4
    (8, 1, 0, (8, 1)),
    (8, 1, 2, (2, 4)),      # one GPU holding 2 images: 4 accumulation steps reach the global batch
    (16, 2, 4, (4, 2)),
    (8, 4, 4, (2, 1)),      # a cap above the share changes nothing
])
def test_plan_batches(global_batch, workers, micro, expected):
    per_step, accum = plan_batches(global_batch, workers, micro)
    assert (per_step, accum) == expected
    assert per_step * workers * accum == global_batch


@pytest.mark.parametrize("global_batch, workers, micro, message", [
    (8, 3, 0, "not divisible by num_workers 3"),
    (2, 4, 0, "not divisible by num_workers 4"),
    (16, 2, 3, "micro_batch_size: 3 does not divide"),
])
def test_plan_batches_rejects_impossible_splits(global_batch, workers, micro, message):
    with pytest.raises(ValueError, match=message):
        plan_batches(global_batch, workers, micro)


# --- data order ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [10, 7, 1])
def test_infinite_sampler_on_one_worker_is_distributed_sampler_epoch_after_epoch(size):
    """On one worker the endless stream equals torch's DistributedSampler with set_epoch(0), (1), (2)
    concatenated (a seeded shuffle of the dataset per epoch)."""
    expected = []
    for epoch in range(3):
        reference = DistributedSampler(list(range(size)), num_replicas=1, rank=0, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        expected += list(reference)
    stream = iter(InfiniteDistributedSampler(size, 0, 1, seed=7))
    assert [next(stream) for _ in expected] == expected


def draw(size: int, world: int, seed: int, start: int, iterations: int, batch: int) -> list[list[int]]:
    """What each iteration's global batch holds when `world` ranks each draw batch / world samples per
    iteration from their stream (rank 0's share first), as the loop's DataLoaders do."""
    streams = [iter(InfiniteDistributedSampler(size, rank, world, seed=seed, start=start)) for rank in range(world)]
    return [[next(s) for s in streams for _ in range(batch // world)] for _ in range(iterations)]


def by_hand(size: int, seed: int, count: int) -> list[int]:
    """The global order written out: seeded shuffles one after another, epoch e with seed + e."""
    order = []
    for epoch in range(count // size + 1):
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order += torch.randperm(size, generator=g).tolist()
    return order[:count]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_infinite_sampler_iterations_draw_consecutive_blocks_of_one_global_order(world):
    """Whatever the worker count, iteration k's global batch is positions [k*B, (k+1)*B) of the same
    global order (9 images, batch 4: the epochs' boundaries fall inside batches)."""
    batches = draw(9, world, seed=3, start=0, iterations=7, batch=4)
    order = by_hand(9, seed=3, count=28)
    assert [sorted(b) for b in batches] == [sorted(order[4 * k: 4 * k + 4]) for k in range(7)]


@pytest.mark.parametrize("worlds", [(2, 1, 2), (1, 4, 2), (4, 2, 4)])
def test_infinite_sampler_resized_stream_is_the_fixed_size_stream(worlds):
    """A run of 9 iterations at global batch 4 cut at iterations 3 and 6 and resumed on another worker
    count each time (start = the global position, iteration x batch) draws, in all, exactly the samples
    of the uninterrupted run on one worker: the same multiset per iteration, none repeated or skipped."""
    size, seed, batch, cuts = 7, 5, 4, (0, 3, 6, 9)
    resized = []
    for world, begin, end in zip(worlds, cuts, cuts[1:], strict=False):
        resized += draw(size, world, seed, start=begin * batch, iterations=end - begin, batch=batch)
    fixed = draw(size, 1, seed, start=0, iterations=9, batch=batch)
    assert [sorted(b) for b in resized] == [sorted(b) for b in fixed]
    assert sorted(sum(resized, [])) == sorted(by_hand(size, seed, 36))   # the union: the first 36 positions


def test_infinite_sampler_resumes_where_it_stopped():
    full = iter(InfiniteDistributedSampler(9, rank=1, world=2, seed=3))
    reference = [next(full) for _ in range(23)]
    resumed = iter(InfiniteDistributedSampler(9, rank=1, world=2, seed=3, start=22))   # 11 per rank before
    assert [next(resumed) for _ in range(12)] == reference[11:]


def test_validation_shards_cover_every_image_once():
    shards = [shard(11, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


# --- one optimizer step ----------------------------------------------------------------------------

class TinySegmentor(nn.Module):
    """forward(img, label) -> losses, like DNLNet.forward; no BN so micro-batches add up exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, img, label):
        loss = F.cross_entropy(self.conv(img), label)
        return {"loss": loss, "decode_loss": loss, "aux_loss": 0.5 * loss}


def _step(model, batches, accum):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = train_step(model, optimizer, scaler, iter(batches), accum, torch.device("cpu"), "fp32", False,
                        it=1)
    return losses, model.conv.weight.detach().clone()


def test_accumulation_matches_one_big_batch():
    """2 micro-batches of 2 images = one batch of 4: same loss, same updated weights."""
    torch.manual_seed(0)
    img, label = torch.randn(4, 3, 5, 6), torch.randint(0, 4, (4, 5, 6))
    torch.manual_seed(1)
    big = TinySegmentor()
    small = TinySegmentor()
    small.load_state_dict(big.state_dict())
    big_losses, big_weight = _step(big, [(img, label)], accum=1)
    small_losses, small_weight = _step(small, [(img[:2], label[:2]), (img[2:], label[2:])], accum=2)
    assert small_losses["loss"] == pytest.approx(big_losses["loss"], rel=1e-5)
    assert small_losses["aux_loss"] == pytest.approx(0.5 * big_losses["loss"], rel=1e-5)
    torch.testing.assert_close(small_weight, big_weight, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_before_the_update():
    model = TinySegmentor()
    before = model.conv.weight.detach().clone()
    img = torch.full((1, 3, 2, 2), float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(FloatingPointError, match="at iteration 7"):
        train_step(model, optimizer, scaler, iter([(img, torch.zeros(1, 2, 2, dtype=torch.long))]), 1,
                   torch.device("cpu"), "fp32", False, it=7)
    torch.testing.assert_close(model.conv.weight, before)


# --- validation ------------------------------------------------------------------------------------

class PredictsChannelZero(nn.Module):
    """encode_decode returns one-hot logits of the class map stored in the image's channel 0."""

    align_corners = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def encode_decode(self, img):
        return F.one_hot(img[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).float()


def image_of(pred: torch.Tensor) -> torch.Tensor:
    return pred.float()[None, None].expand(1, 3, *pred.shape).clone()


# label / prediction of one 2x4 image, 3 classes, one ignored pixel. By hand (mmseg's IoUMetric, gt 255 dropped):
# class 0: I=1 P=2 L=2 U=3 -> IoU 1/3, Acc 1/2; class 1: I=3 P=4 L=3 U=4 -> 3/4, 1;
# class 2: I=1 P=1 L=2 U=2 -> 1/2, 1/2; aAcc = 5/7.
HAND_LABEL = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
HAND_PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])


def assert_hand_computed_metrics(result: dict) -> None:
    assert result["IoU"] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert result["mIoU"] == pytest.approx(19 / 36)
    assert result["mAcc"] == pytest.approx(2 / 3)
    assert result["aAcc"] == pytest.approx(5 / 7)


def test_evaluate_hand_computed_metrics():
    result = evaluate(PredictsChannelZero(3), [(image_of(HAND_PRED), HAND_LABEL[None])], 3, torch.device("cpu"))
    assert_hand_computed_metrics(result)


def test_evaluate_resizes_logits_to_the_label_size():
    """The test transform shrinks the image, not the label: logits are resized up before argmax."""
    pred = torch.full((2, 3), 2)                    # the image at half size, all class 2
    label = torch.full((1, 4, 6), 2)
    label[0, 0, 0] = 255
    result = evaluate(PredictsChannelZero(3), [(image_of(pred), label)], 3, torch.device("cpu"))
    assert result["IoU"][2] == 1.0 and result["aAcc"] == 1.0


# --- checkpoint files ------------------------------------------------------------------------------

def test_train_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"iteration": 5, "train_time_s": 1.5, "best": {"iteration": 5, "mIoU": 1.0}, "curve": [{"a": 1}]}
    save_train_checkpoint(tmp_path, model, optimizer, scaler, state, meta={"iteration": 5})

    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {"state_dict", "meta"}
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    loaded = load_train_checkpoint(tmp_path, fresh)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert {k: loaded[k] for k in state} == state
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    torch.testing.assert_close(fresh_optimizer.state_dict()["state"][0]["momentum_buffer"],
                               optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "train_state.pt"]   # no temp files


def test_staging_folders_of_dead_processes_are_removed(tmp_path):
    """A worker SIGKILLed while writing a checkpoint leaves its staging folder; the next one removes it
    (the pid is gone), and leaves the folders of live processes and anything else alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left_by_dead = tmp_path / f"dnlseg-checkpoint-{dead}-abc"
    live = tmp_path / f"dnlseg-checkpoint-{os.getppid()}-def"
    unrelated = tmp_path / "dnlseg-checkpoint-notapid-x"
    for folder in (left_by_dead, live, unrelated):
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"x")

    with staging_folder(str(tmp_path)) as folder:
        assert os.path.basename(folder).startswith(f"dnlseg-checkpoint-{os.getpid()}-")
        assert not left_by_dead.exists() and live.exists() and unrelated.exists()
    assert not os.path.exists(folder)


def test_curve_csv_has_miou_only_on_evaluation_rows(tmp_path):
    rows = [{"iteration": 1, "loss": 2.5, "decode_loss": 2.0, "aux_loss": 1.25, "lr": 0.01, "img_s": 3.0},
            {"iteration": 2, "loss": 2.0, "decode_loss": 1.5, "aux_loss": 1.25, "lr": 0.005, "img_s": 3.0,
             "mIoU": 12.34}]
    write_curve_csv(tmp_path / "train.csv", rows)
    with open(tmp_path / "train.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["iteration", "loss", "decode_loss", "aux_loss", "lr", "img_s", "mIoU"]
    assert [r["mIoU"] for r in read] == ["", "12.34"] and read[1]["lr"] == "0.005"
    assert [p.name for p in tmp_path.iterdir()] == ["train.csv"]


# --- progress --------------------------------------------------------------------------------------

def test_progress_row_averages_the_window_and_line_shows_eta():
    progress = Progress(max_iters=10, images_per_iter=2, name="exp")
    progress.add({"loss": 1.0, "decode_loss": 0.5, "aux_loss": 1.25}, 0.5)
    progress.add({"loss": 3.0, "decode_loss": 2.5, "aux_loss": 1.25}, 0.5)
    row = progress.row(iteration=2, lr=0.01)
    assert row == {"iteration": 2, "loss": 2.0, "decode_loss": 1.5, "aux_loss": 1.25, "lr": 0.01,
                   "img_s": 4.0}
    line = progress.line(row, memory_gb=1.5)
    assert "iter 2/10" in line and "loss 2.0000" in line and "4.00 img/s" in line
    assert "eta 0:00:04" in line      # 8 iterations left x 0.5 s


# --- run names -------------------------------------------------------------------------------------

def test_run_name_changes_with_what_is_learned_not_where_it_runs():
    from components.training.identity import run_name
    from pipeline.config import load

    cfg = load().experiment("dnl_r50-d8_512x1024_40k_cityscapes")
    data, code = "a" * 64, "c" * 64
    name = run_name(cfg, data, code)
    assert name.startswith("dnl_r50-d8_512x1024_40k_cityscapes-") and name == run_name(cfg, data, code)
    assert run_name(cfg.updated(execution={"num_workers": 8, "loader_workers": 4}, location={"storage_path": "s3://b/x"}),
                    data, code) == name
    assert run_name(cfg.with_schedule(lr=0.02), data, code) != name
    assert run_name(cfg.with_schedule(max_iters=cfg.max_iters + 1), data, code) != name
    assert run_name(cfg, "b" * 64, code) != name     # other data: a fresh run
    assert run_name(cfg, data, "d" * 64) != name     # other code: a fresh run


def test_code_hash_follows_the_python_files_only(tmp_path):
    from components.training.identity import code_hash
    from pipeline.config import code_deps

    deps = code_deps("train")   # the train stage's code deps in dvc.yaml
    for path in ("components/learning/models/a.py", "pipeline/train.py", "pipeline/config/__init__.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    before = code_hash(tmp_path, deps)
    (tmp_path / "components/learning/models/__pycache__").mkdir()
    (tmp_path / "components/learning/models/__pycache__/a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "pipeline/cli.py").write_text("y = 2\n")       # not a dependency of the train stage
    assert code_hash(tmp_path, deps) == before
    (tmp_path / "components/learning/models/a.py").write_text("x = 2\n")
    assert code_hash(tmp_path, deps) != before


@pytest.mark.parametrize("edited, fresh", [
    ("pipeline/train.py", False),                    # the driver: Ray start-up, console lines
    ("components/tracking.py", False),               # MLflow logging
    ("components/training/progress.py", False),      # the loop's progress lines
    ("components/training/worker.py", False),        # the loop under Ray Train, MLflow
    ("components/training/checkpointing.py", False),  # checkpoint folders
    ("components/ray_cluster.py", False),
    ("components/learning/models/dnl.py", True),              # the model
    ("components/learning/loop.py", True),           # the loop
    ("components/learning/data/transforms.py", True),         # the augmentation
    ("components/learning/schedules.py", True),
])
def test_the_run_identity_is_what_changes_the_result(tmp_path, edited, fresh):
    """A run's name hashes the train stage's code deps: editing orchestration code keeps the name (the
    rerun resumes), editing the model, loop, data or schedule code gives a fresh run. DVC's deps are
    the same list (code_deps reads dvc.yaml), so DVC reruns the stage exactly when the name changes."""
    from components.training.identity import code_hash
    from pipeline.config import CODE_ROOT, code_deps

    for package in ("components", "pipeline"):
        shutil.copytree(CODE_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    deps = code_deps("train")
    before = code_hash(tmp_path, deps)
    assert (tmp_path / edited).is_file()
    with open(tmp_path / edited, "a") as f:
        f.write("\nprint('an edit')\n")
    assert (code_hash(tmp_path, deps) != before) is fresh


def test_driver_and_controller_do_not_import_the_training_loop():
    """The function Ray Train's controller and the driver unpickle / reference lives in trainer.py and
    imports the loop (the data pipeline: albumentations, cv2) only when a worker calls it."""
    import ray.cloudpickle

    from components.training.trainer import train_loop_per_worker

    probe = ("import sys, pickle, pipeline.train, pipeline.tune, components.training.trainer; "
             "pickle.loads(sys.stdin.buffer.read()); "
             "print(sorted(m for m in ('components.training.worker', 'components.learning.loop', 'albumentations', "
             "'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], input=ray.cloudpickle.dumps(train_loop_per_worker),
                         capture_output=True, check=True).stdout.decode()
    assert out.strip() == "[]"


def test_the_train_stage_starts_no_dataset_manager_nor_placement_group_cleaner():
    """Ray Train's callbacks, each of which starts a helper actor: the train stage drops the two it does not
    use, a tune trial only the dataset manager (its sweep's job outlives the run: it keeps the cleaner)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.training.trainer import LeanTorchTrainer

    def callbacks(cls, **kwargs) -> set[str]:
        trainer = cls(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kwargs)
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    ray_train, trial = callbacks(TorchTrainer), callbacks(LeanTorchTrainer)
    assert ray_train - callbacks(LeanTorchTrainer, pg_cleaner=False) == {"DatasetsCallback",
                                                                         "PlacementGroupCleanerCallback"}
    assert ray_train - trial == {"DatasetsCallback"} and trial < ray_train
