"""`predict`: label PNGs of each image's own size in the dataset palette, and overlays, from a checkpoint
file, a run (`runs:/`) or a registered model (`models:/<name>@champion`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SMALL_EXPERIMENT, as_params
from fixtures.data import repo_params
from PIL import Image

from components.evaluation.registry import ModelSpec, log_model_config, register_champion
from components.learning.data import get_dataset
from components.learning.data.transforms import build_test_transform
from components.learning.models.speedups import autocast, fp32_math, prepare_for_inference, use_precision
from components.tracking import artifact_location
from pipeline.config import load
from pipeline.predict import predict

EXP = SMALL_EXPERIMENT
CITYSCAPES_PALETTE = get_dataset("cityscapes").palette
SIZES = {"a": (48, 100), "b": (64, 128), "single": (37, 53)}   # (h, w): odd sizes too


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mlflow_db_template, small_checkpoint):
    """The session's small checkpoint (random weights, it names its experiment); images in a folder (one in
    a subfolder) and one alone; the sample profile scaled down so the test scale is (128, 64)."""
    root = tmp_path_factory.mktemp("predict")
    params = as_params(repo_params(root, mlflow_db_template, size_scale=0.0625), root)
    checkpoint, model = small_checkpoint
    rng = np.random.default_rng(0)
    images = root / "images"
    for name, (h, w) in SIZES.items():
        path = root / "single.png" if name == "single" else images / ("sub/b.jpg" if name == "b" else "a.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return {"root": root, "params": params, "model": model, "checkpoint": checkpoint,
            "inputs": [images, root / "single.png"]}


def expected_label(model, rgb: np.ndarray, scale=(128, 64)) -> np.ndarray:
    """The test pipeline written out: keep-ratio resize to the test scale, logits, bilinear back, argmax;
    with the sample profile's evaluation settings on CPU (BN folded, channels-last, fp32)."""
    img = torch.from_numpy(build_test_transform(scale)(image=rgb)["image"].transpose(2, 0, 1).copy())[None]
    model = prepare_for_inference(model, channels_last=True, fold_bn=True)
    with torch.no_grad(), autocast("cpu", "fp32"):
        logits = model.encode_decode(img.contiguous(memory_format=torch.channels_last))
    resized = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return resized.argmax(1)[0].numpy()


@pytest.fixture(scope="module")
def from_checkpoint(setup):
    out = setup["root"] / "out_checkpoint"
    return out, predict(setup["params"], setup["inputs"], out, str(setup["checkpoint"]))


def test_label_pngs_have_the_image_size_and_the_palette(setup, from_checkpoint):
    out, written = from_checkpoint
    names = {p.relative_to(out).as_posix() for p in written}
    assert names == {"a.png", "a_overlay.png", "sub/b.png", "sub/b_overlay.png", "single.png",
                     "single_overlay.png"}
    sources = {"a": "images/a.png", "sub/b": "images/sub/b.jpg", "single": "single.png"}
    for stem, source in sources.items():
        h, w = SIZES[stem.removeprefix("sub/")]
        label_png = Image.open(out / f"{stem}.png")
        assert label_png.mode == "P" and label_png.size == (w, h)
        palette = np.array(label_png.getpalette()[: 3 * 256]).reshape(-1, 3)
        assert [tuple(c) for c in palette[:19]] == list(CITYSCAPES_PALETTE)
        assert tuple(palette[255]) == (0, 0, 0)
        label = np.array(label_png)
        rgb = np.array(Image.open(setup["root"] / source).convert("RGB"))
        assert np.array_equal(label, expected_label(setup["model"], rgb))
        overlay = np.array(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape == (h, w, 3)
        colours = np.array(CITYSCAPES_PALETTE)[label]
        assert np.abs(overlay.astype(float) - (0.5 * rgb + 0.5 * colours)).max() <= 0.5 + 1e-6


def test_registered_model_and_run_give_the_same_labels(setup, from_checkpoint):
    from mlflow.tracking import MlflowClient

    params = setup["params"]
    client = MlflowClient(tracking_uri=params.tracking_uri)
    experiment_id = client.create_experiment(
        "cityscapes", artifact_location=artifact_location(params.tracking_uri, "cityscapes"))   # not ./mlruns
    run_id = client.create_run(experiment_id, run_name="trained").info.run_id
    log_model_config(client, run_id, ModelSpec.of(params.experiment(EXP)))   # what evaluate leaves
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/config.json"]
    register_champion(client, "dnlnet-cityscapes", run_id, setup["checkpoint"])   # uploads the model file
    assert {f.path for f in client.list_artifacts(run_id, "model")} == {"model/config.json", "model/model.pt"}

    from components.evaluation.registry import fetch_model

    by_version = fetch_model("models:/dnlnet-cityscapes/1", params.tracking_uri, setup["root"] / "download")
    assert by_version.checkpoint.read_bytes() == setup["checkpoint"].read_bytes()
    assert by_version.spec.experiment == EXP and by_version.spec.scale == (128, 64)   # config.json
    _, reference = from_checkpoint
    for ref in ("models:/dnlnet-cityscapes@champion", f"runs:/{run_id}"):
        out = setup["root"] / ref.replace(":/", "_").replace("/", "_").replace("@", "_")
        written = predict(params, setup["inputs"], out, ref)
        assert len(written) == len(reference)
        for ours, theirs in zip(written, reference, strict=True):
            assert ours.name == theirs.name
            assert np.array_equal(np.array(Image.open(ours)), np.array(Image.open(theirs)))


def test_bad_inputs_and_references(setup, tmp_path):
    params, checkpoint = setup["params"], str(setup["checkpoint"])
    with pytest.raises(FileNotFoundError, match="nothing.png: no such image file or folder"):
        predict(params, [tmp_path / "nothing.png"], tmp_path / "out", checkpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no images"):
        predict(params, [tmp_path / "empty"], tmp_path / "out", checkpoint)
    with pytest.raises(ValueError, match="several images the output name 'single'"):
        predict(params, [setup["root"] / "single.png"] * 2, tmp_path / "out", checkpoint)
    with pytest.raises(ValueError, match="models:/nope@champion.*not found in the registry"):
        predict(params, setup["inputs"], tmp_path / "out", "models:/nope@champion")
    with pytest.raises(FileNotFoundError, match="expected models:/<name>@<alias>, runs:/<run_id>"):
        predict(params, setup["inputs"], tmp_path / "out", str(tmp_path / "missing.pt"))


def test_settings_inferred_from_the_weights_when_nothing_names_an_experiment(tmp_path):
    """A released checkpoint without config.json or a known experiment in its meta: depth from the
    number of layer3 blocks (23 -> R-101), classes from conv_seg (150 -> ADE20K)."""
    from components.learning.backbones import get_backbone
    from pipeline.predict import model_spec

    state_dict = {f"backbone.layer3.{i}.conv1.weight": torch.zeros(1) for i in range(23)}
    state_dict["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    path = tmp_path / "released.pth"
    torch.save({"state_dict": state_dict, "meta": {"config": "mmseg"}}, path)
    spec = model_spec(load(REPO / "params.yaml"), None, path)
    assert (spec.dataset, get_backbone(spec.backbone).depth, spec.num_classes) == ("ade20k", 101, 150)
    assert spec.experiment == "dnl_r101-d8_512x512_80k_ade20k"   # the first R-101 ADE20K experiment
    state_dict.pop("backbone.layer3.22.conv1.weight")
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="layer3 has 22 blocks; expected 6"):
        model_spec(load(REPO / "params.yaml"), None, path)


@pytest.mark.parametrize(("precision", "math"), [("fp32", {"conv": "ieee", "matmul": "ieee"}),
                                                 ("tf32", {"conv": "tf32", "matmul": "ieee"})])
def test_predict_applies_the_evaluate_precision(setup, tmp_path, mlflow_db_template, precision, math):
    """predict sets the evaluate stage's fp32 math itself (it never did: a CLI process kept torch's
    defaults whatever params.yaml said), read back through torch's fp32_precision API."""
    raw = repo_params(tmp_path, mlflow_db_template, size_scale=0.0625)
    raw["evaluate"]["profiles"]["sample"]["precision"] = precision
    before = fp32_math()
    use_precision("bf16")   # a process left in another setting (conv and matmul TF32)
    try:
        written = predict(as_params(raw, tmp_path), [setup["root"] / "single.png"], tmp_path / "out",
                          str(setup["checkpoint"]))
        assert fp32_math() == math and len(written) == 2
    finally:
        torch.backends.cudnn.conv.fp32_precision = before["conv"]
        torch.backends.cuda.matmul.fp32_precision = before["matmul"]
