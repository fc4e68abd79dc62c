"""The evaluate stage on a tiny prepared dataset (2 val images of 64x128) with the session's small
checkpoint (fixtures/data.py `small_checkpoint`: R-18-D8, random weights). The stage's work runs as Ray
tasks on the session's local Ray (2 CPUs, fixtures/ray_clusters.py `ray_local`).

The metric is checked by hand (numpy over the saved label maps and the prepared label files, not
IoUAccumulator); ms+flip against single scale on a model made flip-equivariant; fps against a model
whose time per image is known; training memory and MLflow logging against what was put in the store.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SMALL_EXPERIMENT, as_params
from fixtures.data import repo_params
from PIL import Image
from torch import nn

from components.evaluation.speed import measure_fps
from components.learning.data import get_dataset
from components.learning.data.dataset import SegmentationDataset
from components.learning.data.transforms import build_test_transform
from components.learning.metrics import ConfusionMatrix
from components.learning.models import build_dnlnet, speedups
from components.learning.models.speedups import autocast, prepare_for_inference, resolve_precision
from components.learning.segment import InferenceSetting, evaluate_split, predict_scores
from components.tracking import artifact_location
from components.training.checkpointing import save_checkpoint
from pipeline.config import ConfigError, load, read_raw
from pipeline.evaluate import evaluate_experiment

EXP = SMALL_EXPERIMENT
NUM_CLASSES = 19
CITYSCAPES_CLASSES = get_dataset("cityscapes").classes


def tiny_params(work: Path, data_root: Path, db_template: Path) -> dict:
    """The repo's params with everything small: scale (2048,1024)/32 = (64,32), so the 64x128 val images
    are resized to 32x64 for the model and the scores resized back to 64x128 before argmax. fp32, as the
    assertions compute it (`auto` would be bf16 on a CPU that has it in hardware)."""
    params = repo_params(work, db_template, size_scale=0.03125, use_gpu=False, precision="fp32")
    params["data"]["prepared_dir"] = str(data_root)
    params["evaluate"] = {"ms_ratios": [0.5, 1.0], "flip": True, "max_images": None, "fps_images": 4,
                          "fps_warmup": 1, "overlays": 1, "device": "cpu", "precision": "fp32", "fold_bn": True,
                          "cpu_threads": 1}
    return params


def random_model(seed: int = 0, num_classes: int = NUM_CLASSES):
    torch.manual_seed(seed)
    return build_dnlnet(depth=18, num_classes=num_classes).eval()


def fake_training_run(tracking_uri: str, name: str, memory_gb: list[float]) -> str:
    """A run as the train stage leaves it: tags to find it by, the memory rank 0 logged, FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name("cityscapes")
    experiment_id = found.experiment_id if found else client.create_experiment(
        "cityscapes", artifact_location=artifact_location(tracking_uri, "cityscapes"))   # not ./mlruns
    run = client.create_run(experiment_id, run_name=f"{name}-0123abcd",
                            tags={"experiment": name, "dvc_stage": f"train@{name}"})
    client.log_param(run.info.run_id, "use_gpu", "False")
    client.log_param(run.info.run_id, "precision", "bf16")
    for step, value in enumerate(memory_gb, start=1):
        client.log_metric(run.info.run_id, "memory_gb", value, step=step)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_data, mlflow_db_template, small_checkpoint, ray_local_module):
    work = tmp_path_factory.mktemp("evaluate")
    params = tiny_params(work, tiny_data, mlflow_db_template)
    checkpoint, model = small_checkpoint
    (work / "models" / EXP).mkdir(parents=True)
    shutil.copyfile(checkpoint, work / "models" / EXP / "model.pt")
    run_id = fake_training_run(params["tracking"]["uri"], EXP, [0.5, 1.25, 0.75])
    threads = torch.get_num_threads()
    summary = evaluate_experiment(as_params(params, work), EXP, out_root=work,
                                  predictions_dir=work / "predictions")
    assert torch.get_num_threads() == threads   # evaluate.cpu_threads held for the evaluation only
    return {"work": work, "params": params, "summary": summary, "model": model, "run_id": run_id,
            "val": tiny_data / "cityscapes" / "val"}


# --- the metric by hand -----------------------------------------------------------------------------

def hand_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """mmseg's IoUMetric written out: per-class counts summed over images, ignore 255, nan-mean."""
    inter, pred_area, label_area = (np.zeros(num_classes) for _ in range(3))
    for pred, label in pairs:
        valid = label != 255
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (label == c) & valid)
            pred_area[c] += np.sum((pred == c) & valid)
            label_area[c] += np.sum((label == c) & valid)
    union = pred_area + label_area - inter
    iou = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    acc = [inter[c] / label_area[c] for c in range(num_classes) if label_area[c]]
    return {"mIoU": 100 * np.mean([v for v in iou if v is not None]), "mAcc": 100 * np.mean(acc),
            "aAcc": 100 * inter.sum() / label_area.sum(),
            "IoU": [None if v is None else 100 * v for v in iou]}


def read_pairs(val_dir: Path, predictions: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    with open(val_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = []
    for index, row in enumerate(rows):
        label = np.array(Image.open(val_dir / row["label"]))
        pred = np.array(Image.open(predictions / f"{index:05d}.png"))
        assert pred.shape == label.shape == (int(row["height"]), int(row["width"]))
        pairs.append((pred, label))
    return pairs


@pytest.mark.parametrize("setting", ["single_scale", "ms_flip"])
def test_eval_json_equals_a_hand_computed_metric(evaluated, setting):
    pairs = read_pairs(evaluated["val"], evaluated["work"] / "predictions" / setting)
    assert len(pairs) == 2
    predicted = np.unique(np.concatenate([p.ravel() for p, _ in pairs]))
    assert len(predicted) >= 3, "a trivial prediction would check little"
    expected = hand_metrics(pairs, NUM_CLASSES)
    on_disk = json.loads((evaluated["work"] / "metrics" / EXP / "eval.json").read_text())
    got = on_disk[setting]
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(expected[key], abs=1e-3), key
    assert list(got["IoU"]) == list(CITYSCAPES_CLASSES)
    for name, value in zip(CITYSCAPES_CLASSES, expected["IoU"], strict=True):
        assert (got["IoU"][name] is None) == (value is None), name
        if value is not None:
            assert got["IoU"][name] == pytest.approx(value, abs=1e-3), name
    assert on_disk["images"] == 2 and on_disk["split"] == "val"


def test_single_scale_logits_are_resized_to_the_label_size_before_argmax(evaluated):
    """The saved label maps are argmax(bilinear resize of the 32x64 logits to 64x128), recomputed here
    straight from the model, not at 32x64 then upsampled."""
    dataset = SegmentationDataset(evaluated["val"], build_test_transform(scale=(64, 32)))
    # What the sample profile evaluates with on CPU: BN folded, channels-last, fp32.
    model = prepare_for_inference(evaluated["model"], channels_last=True, fold_bn=True)
    for index in range(len(dataset)):
        img, label = dataset[index]
        assert tuple(img.shape[1:]) == (32, 64) and tuple(label.shape) == (64, 128)
        with torch.no_grad(), autocast("cpu", "fp32"):
            logits = model.encode_decode(img[None].contiguous(memory_format=torch.channels_last))
        expected = F.interpolate(logits, size=(64, 128), mode="bilinear", align_corners=False).argmax(1)[0]
        saved = np.array(Image.open(evaluated["work"] / "predictions" / "single_scale" / f"{index:05d}.png"))
        assert np.array_equal(saved, expected.numpy())


def test_eval_json_records_settings_speed_and_memory(evaluated):
    s = json.loads((evaluated["work"] / "metrics" / EXP / "eval.json").read_text())
    assert s["test"] == {"mode": "whole", "scale": [64, 32], "crop": [16, 32], "stride": [16, 32],
                         "align_corners": False}
    assert s["ms_flip"]["ratios"] == [0.5, 1.0] and s["ms_flip"]["flip"] is True
    assert s["device"].startswith("cpu") and s["dtype"] == "fp32" and s["bn_folded"] is True
    speed = s["speed"]
    assert speed["fps"] > 0 and speed["images"] == 4 and speed["warmup"] == 1 and speed["batch_size"] == 1
    assert speed["device"].startswith("cpu") and speed["dtype"] == "fp32"
    assert speed["threads"] == 1 and "1 threads" in s["device"]   # evaluate.cpu_threads
    # The largest memory_gb the training run logged, with what it measures.
    assert s["train_memory"]["peak_gb"] == 1.25
    assert s["train_memory"]["device"] == "cpu" and s["train_memory"]["dtype"] == "bf16"
    assert "RSS" in s["train_memory"]["measure"]
    sample = evaluated["params"]["profiles"]["sample"]
    iterations = round(40000 * sample["schedule_scale"])   # the 40k schedule scaled by the sample profile
    assert s["train"] == {"crop_size": [16, 32], "max_iters": iterations, "batch_size": sample["batch_size"]}
    # The protocol its figures were measured under (whole-image: no window), and its hash: the first 16 hex
    # digits of the sha256 of those settings as compact JSON with sorted keys.
    protocol = dict(s["protocol"])
    digest = protocol.pop("hash")
    assert protocol == {"mode": "whole", "crop": None, "stride": None, "scale": [64, 32], "align_corners": False,
                        "ms_ratios": [0.5, 1.0], "flip": True, "images": 2, "precision": "fp32",
                        "label_conversion": "gtFine polygons -> labelTrainIds (cityscapesscripts json2labelImg), "
                                            "255 ignored"}
    compact = json.dumps(protocol, sort_keys=True, separators=(",", ":")).encode()
    assert digest == hashlib.sha256(compact).hexdigest()[:16]


def test_pictures_and_dvc_plot_files(evaluated):
    plots = evaluated["work"] / "plots" / EXP
    with open(plots / "per_class_iou.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = evaluated["summary"]
    assert [r["class"] for r in rows] == list(CITYSCAPES_CLASSES)
    for r in rows:
        value = summary["single_scale"]["IoU"][r["class"]]
        assert (r["IoU"] == "") == (value is None)
        if value is not None:
            assert float(r["IoU"]) == pytest.approx(value, abs=1e-3)
    for name in ("per_class_iou.png", "confusion.png"):
        assert Image.open(plots / name).format == "PNG"
    overlays = sorted((plots / "overlays").glob("*.png"))
    assert len(overlays) == 1   # evaluate.overlays: 1
    assert Image.open(overlays[0]).size[0] > 3 * 64


def test_logged_into_the_training_run(evaluated):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=evaluated["params"]["tracking"]["uri"])
    run = client.get_run(evaluated["run_id"])
    summary = evaluated["summary"]
    assert summary["mlflow"]["run_id"] == evaluated["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval.mIoU"] == pytest.approx(summary["single_scale"]["mIoU"])
    assert run.data.metrics["eval.ms_flip.mIoU"] == pytest.approx(summary["ms_flip"]["mIoU"])
    assert run.data.metrics["eval.fps"] == pytest.approx(summary["speed"]["fps"])
    assert run.data.tags["eval.device"] == summary["device"] and run.data.tags["eval.dtype"] == "fp32"
    files = {f.path for folder in ("evaluation", "evaluation/overlays", "model")
             for f in client.list_artifacts(evaluated["run_id"], folder) if not f.is_dir}
    assert {"evaluation/eval.json", "evaluation/confusion.png", "evaluation/per_class_iou.png",
            "model/config.json"} <= files
    assert "model/model.pt" not in files   # DVC keeps the model; the report uploads it only to register it
    assert any(p.startswith("evaluation/overlays/") for p in files)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_imported_checkpoint_gets_a_run_of_its_own(evaluated, tmp_path):
    work = evaluated["work"]
    params = copy.deepcopy(evaluated["params"])
    import hashlib

    from components.weights import WeightsError

    saved = tmp_path / "released.pth"
    save_checkpoint(saved, random_model(seed=1), {"config": "released"})
    # A released file whose name does not carry the start of its sha256 is refused, in one line.
    wrong = saved.rename(tmp_path / "dnl_released_20200904-53d4ea93.pth")
    params["imported_checkpoints"] = {"released": {"experiment": EXP, "source": str(wrong)}}
    with pytest.raises(WeightsError, match=r"sha256 \w+\.\.\. does not start with 53d4ea93"):
        evaluate_experiment(as_params(params, work), "released", out_root=work)
    digest = hashlib.sha256(wrong.read_bytes()).hexdigest()
    released = wrong.rename(tmp_path / f"dnl_released_20200904-{digest[:8]}.pth")
    params["imported_checkpoints"] = {"released": {"experiment": EXP, "source": str(released)}}
    params["evaluate"].update({"fps_images": None, "overlays": 0, "ms_ratios": [1.0], "flip": False})
    summary = evaluate_experiment(as_params(params, work), "released", out_root=work)
    assert summary["imported"] is True and summary["speed"] is None and summary["train_memory"] is None
    assert summary["train"] == {"crop_size": [512, 1024], "max_iters": 40000, "batch_size": 8}
    # ms_ratios [1.0] without flip is the single-scale pass itself.
    assert summary["ms_flip"]["mIoU"] == summary["single_scale"]["mIoU"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=params["tracking"]["uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.run_id != evaluated["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dvc_stage"] == "evaluate@released"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {"model/model.pt",
                                                                                 "model/config.json"}
    # Evaluating again logs into the same run (found by its deterministic name), not a new one.
    again = evaluate_experiment(as_params(params, work), "released", out_root=work)
    assert again["mlflow"]["run_id"] == run.info.run_id


# --- as Ray tasks: the shards, the speed task, a GPU profile without GPUs -----------------------------

def test_eval_json_says_where_the_tasks_ran_and_how_the_speed_was_timed(evaluated):
    s = evaluated["summary"]
    assert s["evaluation"]["ray_tasks"] == 1   # on CPUs (evaluate.shards: null) one task of the sample's bundle
    [shard] = s["evaluation"]["shards"]
    assert shard["images"] == [0, 2] and shard["resources"] == {"CPU": 1.0} and shard["device"] == s["device"]
    timed = s["speed"]["timed_on"]
    assert timed["ray_task"] == "evaluate-fps" and timed["resources"] == {"CPU": 1.0}
    assert timed["after"] == "the 1 evaluation shard task(s) had finished"
    assert "batch 1" in timed["timed"] and "one image at a time" in timed["timed"]
    assert s["speed"]["distinct_images"] == 2 and s["speed"]["images"] == 4   # 2 val images, cycled


def _pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_a_sharded_stage_writes_what_one_task_writes(evaluated, tmp_path, tiny_data, mlflow_db_template,
                                                     small_checkpoint):
    """evaluate.shards: 2 (one image each, two Ray tasks): eval.json's every metric, per class too, and
    every per-image output (label maps, overlays, per-class IoU, confusion picture) as with one task."""
    work = tmp_path / "sharded"
    params = tiny_params(work, tiny_data, mlflow_db_template)
    params["evaluate"]["shards"] = 2
    (work / "models" / EXP).mkdir(parents=True)
    shutil.copyfile(small_checkpoint[0], work / "models" / EXP / "model.pt")
    sharded = evaluate_experiment(as_params(params, work), EXP, out_root=work, predictions_dir=work / "predictions")
    assert [shard["images"] for shard in sharded["evaluation"]["shards"]] == [[0, 1], [1, 2]]
    one = evaluated["summary"]
    for key in ("single_scale", "ms_flip", "images", "iteration", "dtype", "device", "test"):
        assert sharded[key] == one[key], key
    assert sharded["speed"]["timed_on"]["after"] == "the 2 evaluation shard task(s) had finished"
    first, second = evaluated["work"], work
    for setting in ("single_scale", "ms_flip"):
        for index in range(2):
            name = Path("predictions") / setting / f"{index:05d}.png"
            assert np.array_equal(_pixels(first / name), _pixels(second / name)), name
    plots = Path("plots") / EXP
    assert (first / plots / "per_class_iou.csv").read_text() == (second / plots / "per_class_iou.csv").read_text()
    pictures = sorted(p.relative_to(first) for p in (first / plots).rglob("*.png"))
    assert pictures == sorted(p.relative_to(second) for p in (second / plots).rglob("*.png")) and len(pictures) == 3
    for picture in pictures:
        assert np.array_equal(_pixels(first / picture), _pixels(second / picture)), picture


def test_a_gpu_profile_without_gpus_fails_in_one_line_before_any_work(evaluated, tmp_path, small_checkpoint,
                                                                       monkeypatch, capsys):
    """profiles.<p>.use_gpu on a Ray without GPUs (this machine's): `dnlseg evaluate` exits 2 with one line,
    before a task is submitted or a file hashed; never an evaluation on the CPU instead."""
    import yaml

    import pipeline.evaluate as stage
    from pipeline.cli import main

    params = copy.deepcopy(evaluated["params"])
    params["profiles"]["sample"].update(use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    params["evaluate"]["device"] = "auto"   # the profile's: a GPU per task
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "models" / EXP).mkdir(parents=True)
    shutil.copyfile(small_checkpoint[0], tmp_path / "models" / EXP / "model.pt")
    for work in ("_infer", "sha256_file", "publish_dataset", "fetch"):
        monkeypatch.setattr(stage, work, lambda *a, _w=work, **k: pytest.fail(f"{_w} ran: work started"))
    capsys.readouterr()
    assert main(["--params", str(tmp_path / "params.yaml"), "evaluate", EXP]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"dnlseg evaluate: error: evaluate@{EXP}: one evaluation task needs {{CPU: 1, GPU: 1}} "
                          f"(profiles.sample.resources_per_worker, use_gpu: true) and no node of the Ray cluster")
    assert "GPU: 0" in err
    assert not (tmp_path / "metrics").exists()


# --- ms+flip on a flip-equivariant model ------------------------------------------------------------

@pytest.fixture(scope="module")
def symmetric_model() -> nn.Module:
    """DNLNet whose every conv kernel is mirror-symmetric left-right. With an odd width that stays odd
    through the three stride-2 steps (65 -> 33 -> 17 -> 9) every layer is flip-equivariant (the
    attention is a function of the set of positions), so flipping the input flips the logits."""
    model = random_model(0, num_classes=5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return model


def test_symmetric_model_is_flip_equivariant(symmetric_model):
    model = symmetric_model
    img = torch.randn(1, 3, 33, 65)
    with torch.no_grad():
        assert torch.allclose(model.encode_decode(img.flip(-1)), model.encode_decode(img).flip(-1), atol=1e-4)


def test_flip_averaging_equals_single_scale_on_a_symmetric_model(symmetric_model):
    torch.manual_seed(1)
    images = [torch.randn(1, 3, 33, 65) for _ in range(2)]
    labels = [torch.randint(0, 5, (1, 40, 79)) for _ in range(2)]   # scores are resized to the label size
    single, flip = InferenceSetting("whole"), InferenceSetting("whole", ratios=(1.0,), flip=True)

    model = symmetric_model
    p_single = predict_scores(model, images[0], (40, 79), single).softmax(1)
    p_flip = predict_scores(model, images[0], (40, 79), flip)
    assert torch.allclose(p_flip, p_single, atol=1e-5)
    results = evaluate_split(model, zip(images, labels, strict=True), 5, {"single": single, "flip": flip},
                             torch.device("cpu"))
    assert torch.equal(results["single"].confusion.counts, results["flip"].confusion.counts)
    assert results["single"].metrics()["mIoU"] == results["flip"].metrics()["mIoU"]

    # The control: without the symmetry the flipped pass does change the scores (the test can fail).
    plain = random_model(0, num_classes=5)
    p_plain = predict_scores(plain, images[0], (40, 79), single).softmax(1)
    assert (predict_scores(plain, images[0], (40, 79), flip) - p_plain).abs().max() > 1e-4


# --- speed ------------------------------------------------------------------------------------------

class SleepyModel(nn.Module):
    """encode_decode sleeps: `slow_s` for the first `slow_calls` calls, `fast_s` afterwards."""

    align_corners = False

    def __init__(self, slow_calls: int, slow_s: float, fast_s: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls, self.slow_calls, self.slow_s, self.fast_s = 0, slow_calls, slow_s, fast_s

    def encode_decode(self, img):
        time.sleep(self.slow_s if self.calls < self.slow_calls else self.fast_s)
        self.calls += 1
        return torch.zeros(img.shape[0], 3, *img.shape[2:])


def test_fps_times_only_the_images_after_warmup():
    model = SleepyModel(slow_calls=5, slow_s=0.3, fast_s=0.02)
    samples = [(torch.zeros(1, 3, 8, 8), (16, 16))] * 3
    result = measure_fps(model, samples, "cpu", InferenceSetting("whole"), n_images=10, warmup=5)
    assert model.calls == 10
    # 5 timed images of >= 20 ms: at most 50 fps; including a 0.3 s warm-up image would give < 16 fps.
    assert 20 < result["fps"] <= 50.5
    assert result["images"] == 10 and result["warmup"] == 5 and result["batch_size"] == 1
    assert result["device"].startswith("cpu") and result["dtype"] == "fp32"


def test_fps_rejects_too_few_images():
    with pytest.raises(ValueError, match="must be larger than warmup"):
        measure_fps(SleepyModel(0, 0, 0), [(torch.zeros(1, 3, 4, 4), (4, 4))], "cpu", InferenceSetting(),
                    n_images=5, warmup=5)


# --- confusion matrix, settings, errors -------------------------------------------------------------

def test_confusion_matrix_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    # rows: ground truth 0 (pred 0, 1), 1 (pred 1, 1, 0), 2 (pred 2, 0); the ignored pixel is dropped
    assert cm.counts.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    assert np.allclose(cm.normalized()[1], [1 / 3, 2 / 3, 0])


def eval_settings(evaluate: dict | None = None, profile: str | None = None, drop=(), **top):
    """The EvalSettings of the repo's params.yaml with its `evaluate` section updated by `evaluate`
    (its keys in `drop` removed first, to fall back on the defaults), and top-level keys set from `top`."""
    raw = read_raw(REPO / "params.yaml")
    raw.update(top)
    raw["evaluate"] = {k: v for k, v in raw["evaluate"].items() if k not in drop} | (evaluate or {})
    return as_params(raw).eval_settings(profile)


def test_eval_settings_profile_override_and_errors():
    evaluate = {"fps_images": 200, "fps_warmup": 5, "profiles": {"sample": {"fps_images": 6, "fps_warmup": 1}}}
    s = eval_settings(evaluate, profile="sample")
    assert (s.fps_images, s.fps_warmup, s.flip) == (6, 1, True)
    assert s.ms_ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # mmseg's ms+flip ratios, params.yaml's evaluate.ms_ratios
    assert eval_settings(evaluate, "reference").fps_images == 200
    with pytest.raises(ConfigError, match=r"evaluate\.ms_ratios: expected a list of positive numbers"):
        eval_settings({"ms_ratios": "0.5"})
    with pytest.raises(ConfigError, match=r"evaluate\.profiles\.sample\.fps_images: 3 must be larger"):
        eval_settings({"profiles": {"sample": {"fps_images": 3}}}, profile="sample")
    with pytest.raises(ConfigError, match=r"evaluate\.ratios: unknown key \(did you mean ms_ratios\?\)"):
        eval_settings({"ratios": [1.0]})


def test_eval_precision_defaults_to_torchs_tf32_and_auto_is_explicit(monkeypatch):
    s = eval_settings(drop=("precision", "fold_bn"), profile="reference")   # not set: the defaults
    assert (s.precision, s.fold_bn) == ("tf32", True)
    assert (resolve_precision(s.precision, "cpu"), resolve_precision(s.precision, "cuda:0")) == ("tf32", "tf32")
    # auto, the fastest that agrees, as a choice: bf16 only on a CPU that has it in hardware
    for native, on_cpu in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(speedups, "native_bf16_cpu", lambda native=native: native)
        assert (resolve_precision("auto", "cpu"), resolve_precision("auto", "cuda:0")) == (on_cpu, "fp16")
    repo = load()   # the reference profile evaluates as training runs (tf32, mmseg's); the sample one in fp32
    assert (repo.eval_settings("reference").precision, repo.eval_settings("sample").precision) == ("tf32", "fp32")
    assert repo.experiment("dnl_r50-d8_512x1024_40k_cityscapes", "reference").recipe.precision == "tf32"
    assert resolve_precision(eval_settings({"precision": "fp32"}, profile="reference").precision, "cuda") == "fp32"
    with pytest.raises(ConfigError, match=r"evaluate\.precision: expected one of auto, fp32, tf32, bf16, fp16"):
        eval_settings({"precision": "half"})
    with pytest.raises(ConfigError, match=r"evaluate\.precision: fp16 needs a GPU"):
        eval_settings({"precision": "fp16", "device": "cpu"})
    with pytest.raises(ConfigError, match=r"evaluate\.fold_bn: expected true or false"):
        eval_settings({"fold_bn": "yes"})


def test_unknown_name_and_missing_checkpoint(evaluated, tmp_path):
    with pytest.raises(ConfigError, match="no experiment or imported_checkpoints entry named 'nope'"):
        evaluate_experiment(as_params(evaluated["params"], tmp_path), "nope", out_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"models/{EXP}/model\.pt: checkpoint not found"):
        evaluate_experiment(as_params(evaluated["params"], tmp_path), EXP, out_root=tmp_path)
