"""Seeds as a dimension of the table (params.yaml extra_seeds), the evaluation protocol in eval.json, and
the report's verdict per row: the rule's edge cases by hand, the report's mean ± std against a hand
computation, DVC's stages from `dvc exp run -S 'extra_seeds=[...]'`, and three seeds trained for real."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL_EXPERIMENT, as_params, repo_copy, run_dvc

from components.evaluation.protocol import differences, protocol_hash
from components.evaluation.table import parse_markdown_tables
from components.evaluation.verdict import Spread, released_check, spread, verdict
from components.training.identity import run_name
from pipeline.config import ConfigError, read_raw

EXP = "dnl_r50-d8_512x1024_40k_cityscapes"          # published 78.61, no ms+flip figure
SLIDE = "dnl_r50-d8_769x769_40k_cityscapes"         # published 78.44, ms+flip 80.27
ADE = "dnl_r50-d8_512x512_80k_ade20k"               # published 41.76, ms+flip 42.99


def params_with(**top):
    raw = read_raw(REPO / "params.yaml")
    raw.update(top)
    return as_params(raw)


# --- the seeds: names, identities, validation ------------------------------------------------------

def test_default_seeds_keep_todays_names_and_run_identities():
    """With no extra_seeds every experiment is one run under its own name, and its run identity is the
    one the code before seeds gave (computed at commit d82a98f with these fixed data and code hashes)."""
    params = params_with()
    assert params.seeds == [0] and params.extra_seeds == []
    assert params.evaluation_names() == list(params.experiments)
    before = {("sample", EXP): "dnl_r50-d8_512x1024_40k_cityscapes-06fa2bdb",
              ("sample", SMALL_EXPERIMENT): "dnl_r18-d8_512x1024_40k_cityscapes-73d6d38c",
              ("reference", EXP): "dnl_r50-d8_512x1024_40k_cityscapes-1d611765",
              ("reference", SMALL_EXPERIMENT): "dnl_r18-d8_512x1024_40k_cityscapes-b2949f56"}
    for (profile, name), expected in before.items():
        cfg = params.experiment(name, profile)
        assert cfg.name == name and cfg.recipe.seed == 0
        # Precisions moved since, on purpose: the reference's fp32 -> tf32 (issue 22), the sample's bf16 -> fp32
        # (bf16 is emulated on a CPU without it in hardware); with the old precision, the old identity.
        then = {"reference": ("tf32", "fp32"), "sample": ("fp32", "bf16")}[profile]
        assert cfg.recipe.precision == then[0]
        cfg = cfg.updated(recipe={"precision": then[1]})
        assert run_name(cfg, "d" * 64, "c" * 64) == expected


def test_an_extra_seed_is_its_own_run_differing_only_in_name_and_seed():
    params = params_with(extra_seeds=[1, 7])
    assert params.seeds == [0, 1, 7]
    assert params.seeded_runs(EXP) == [EXP, f"{EXP}-s1", f"{EXP}-s7"]
    base, seeded = params.experiment(EXP), params.experiment(EXP, seed=7)
    assert seeded.name == f"{EXP}-s7" and seeded.recipe.seed == 7
    assert seeded.model_dump() == base.model_dump() | {"name": f"{EXP}-s7",
                                                       "recipe": base.recipe.model_dump() | {"seed": 7}}
    assert params.experiment(EXP, seed=0) == base
    assert run_name(seeded, "d" * 64, "c" * 64) != run_name(base, "d" * 64, "c" * 64)
    assert run_name(seeded, "d" * 64, "c" * 64).startswith(f"{EXP}-s7-")
    cfg, checkpoint, imported = params.evaluation_target(EXP, Path("/r"), seed=1)
    assert (cfg.name, checkpoint, imported) == (f"{EXP}-s1", f"/r/models/{EXP}-s1/model.pt", False)


@pytest.mark.parametrize("extra, message", [
    ([1, 1], "params.yaml: extra_seeds: seed 1 is listed twice (train.seed is 0; got [1, 1])"),
    ([0], "params.yaml: extra_seeds: seed 0 is listed twice (train.seed is 0; got [0])"),
    ([-1], "params.yaml: extra_seeds.0: expected an integer >= 0, got -1"),
    ("1,2", "params.yaml: extra_seeds: expected a list, got '1,2'"),
])
def test_bad_extra_seeds_are_one_line(extra, message):
    with pytest.raises(ConfigError) as e:
        params_with(extra_seeds=extra)
    assert str(e.value) == message


def test_a_seed_not_listed_is_refused():
    with pytest.raises(ConfigError, match=r"^params.yaml: extra_seeds: seed 3 is not one of the experiments' "
                                          r"seeds \[0, 1\] \(train.seed, then extra_seeds\)$"):
        params_with(extra_seeds=[1]).experiment(EXP, seed=3)


def test_tuned_runs_with_seeds_are_named_and_staged(tmp_path):
    from pipeline.train import run_config

    raw = read_raw(REPO / "params.yaml")
    raw["extra_seeds"] = [2]
    params = as_params(raw, tmp_path)
    best = tmp_path / "tune" / EXP / "best_params.yaml"
    best.parent.mkdir(parents=True)
    best.write_text(yaml.safe_dump({"experiment": EXP, "profile": "sample", "params": {"lr": 0.02}}))
    assert run_config(params, EXP) [1] == f"train@{EXP}"
    assert run_config(params, EXP, seed=2)[1] == f"train_seed@{EXP}-2"
    cfg, stage = run_config(params, EXP, tuned=True, seed=2)
    assert (cfg.name, stage, cfg.recipe.seed, cfg.schedule.lr) == (f"{EXP}-tuned-s2", "train_tuned_seed@2", 2, 0.02)
    cfg, stage = run_config(params, EXP, tuned=True)
    assert (cfg.name, stage, cfg.recipe.seed) == (f"{EXP}-tuned", "train_tuned", 0)


# --- the verdict rule ---------------------------------------------------------------------------

def test_spread_takes_the_seeds_std_from_three_on_else_the_prior():
    three = spread([78.0, 78.5, 79.0], prior_std=0.7)
    assert (three.mean, three.n, three.std_from) == (78.5, 3, "seeds")
    assert three.std == pytest.approx(0.5)                       # sqrt((0.25 + 0 + 0.25) / 2)
    assert three.half_band == pytest.approx(2 * 0.5 / math.sqrt(3))
    assert three.text() == "78.50 ± 0.50 (n=3)"
    two = spread([78.0, 79.0], prior_std=0.7)
    assert (two.mean, two.std, two.std_from) == (78.5, 0.7, "prior")
    one = spread([76.0], prior_std=1.0)
    assert one.half_band == 2.0 and one.text() == "76.00 ± 1.00 (n=1, prior std)"


@pytest.mark.parametrize("published, expected", [
    (11.0, "reproduced"),     # exactly on the upper edge: mean 10 + 2 x (1 / sqrt 4)
    (9.0, "reproduced"),      # exactly on the lower edge
    (10.0, "reproduced"),
    (11.001, "below"),        # published above the band: ours is below it
    (8.999, "above"),
    (None, "-"),
])
def test_verdict_at_and_beyond_the_band_edges(published, expected):
    ours = Spread(mean=10.0, std=1.0, n=4, std_from="seeds")
    assert ours.half_band == 1.0
    assert verdict(published, ours) == expected


def test_verdict_on_a_band_edge_that_floats_do_not_hit_exactly():
    """77.21 + 1.4 is 78.60999999999999 in floats: still on the edge, still reproduced."""
    ours = spread([77.21], prior_std=0.7)
    assert verdict(78.61, ours) == "reproduced"
    assert verdict(78.62, ours) == "below"


def test_not_comparable_gives_no_verdict_and_says_why():
    ours = Spread(mean=78.6, std=0.1, n=3, std_from="seeds")
    assert verdict(78.61, ours, ["50 of 500 images"]) == "not comparable: 50 of 500 images"
    assert verdict(78.61, ours, ["generated sample data"]) == "not comparable: generated sample data"
    assert released_check(78.61, 78.6, ["precision bf16 (published fp32)"]) == \
        "not comparable: precision bf16 (published fp32)"


@pytest.mark.parametrize("released, expected", [
    (78.51, "evaluation matches"),   # -0.1 exactly (-0.0999999999999943 in floats)
    (78.71, "evaluation matches"),
    (78.61, "evaluation matches"),
    (78.50, "evaluation differs (-0.11)"),
    (78.72, "evaluation differs (+0.11)"),
])
def test_released_checkpoint_within_a_tenth_of_published(released, expected):
    assert released_check(78.61, released) == expected


# --- the protocol --------------------------------------------------------------------------------

# How the seed measured EXP and SLIDE (mmseg configs: test_cfg mode, crop and stride; test scale; the
# official val split), typed in by hand.
CITY_LABELS = "gtFine polygons -> labelTrainIds (cityscapesscripts json2labelImg), 255 ignored"
SEED_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
PUBLISHED_PROTOCOL = {
    EXP: {"mode": "whole", "crop": None, "stride": None, "scale": [2048, 1024], "align_corners": False,
          "ms_ratios": SEED_RATIOS, "flip": True, "label_conversion": CITY_LABELS, "images": 500,
          "precision": "fp32"},
    SLIDE: {"mode": "slide", "crop": [769, 769], "stride": [513, 513], "scale": [2049, 1025],
            "align_corners": True, "ms_ratios": SEED_RATIOS, "flip": True, "label_conversion": CITY_LABELS,
            "images": 500, "precision": "fp32"},
    ADE: {"mode": "whole", "crop": None, "stride": None, "scale": [2048, 512], "align_corners": False,
          "ms_ratios": SEED_RATIOS, "flip": True, "label_conversion": "reduce_zero_label (0 -> 255, k -> k-1)",
          "images": 2000, "precision": "fp32"},
}


def test_published_protocol_is_the_reference_profiles_evaluation():
    from pipeline.report_verdict import published_protocol

    params = params_with()
    for name, expected in PUBLISHED_PROTOCOL.items():
        assert published_protocol(params, name) == expected, name


def test_protocol_differences_in_words_and_the_hash():
    ours = PUBLISHED_PROTOCOL[EXP] | {"images": 50, "precision": "bf16"}
    assert differences(ours, PUBLISHED_PROTOCOL[EXP]) == ["50 of 500 images", "precision bf16 (published fp32)"]
    assert differences(PUBLISHED_PROTOCOL[EXP], PUBLISHED_PROTOCOL[EXP]) == []
    # tf32 (the reference profile's, PyTorch's default) is the seed's fp32 on its V100s: comparable
    assert differences(PUBLISHED_PROTOCOL[EXP] | {"precision": "tf32"}, PUBLISHED_PROTOCOL[EXP]) == []
    assert protocol_hash(ours) != protocol_hash(PUBLISHED_PROTOCOL[EXP])
    reordered = dict(reversed(list(PUBLISHED_PROTOCOL[EXP].items())))
    assert protocol_hash(reordered) == protocol_hash(PUBLISHED_PROTOCOL[EXP])
    assert len(protocol_hash(ours)) == 16


# --- the report: mean ± std and the verdict against a hand computation -----------------------------

def write_eval(root: Path, name: str, dataset: str, miou: float, ms: float | None, protocol: dict) -> None:
    summary = {"experiment": name, "dataset": dataset, "profile": "reference", "backbone": "R-50-D8",
               "imported": False, "images": protocol["images"], "device": "cuda: test", "dtype": "fp32",
               "test": {"mode": protocol["mode"], "scale": protocol["scale"]},
               "single_scale": {"mIoU": miou, "mAcc": 1.0, "aAcc": 1.0, "IoU": {}},
               "ms_flip": {"ratios": protocol["ms_ratios"], "flip": True, "mIoU": ms, "mAcc": 1.0, "aAcc": 1.0,
                           "IoU": {}},
               "speed": None, "train_memory": None, "mlflow": {"run_id": None, "experiment_id": None},
               "protocol": protocol | {"hash": protocol_hash(protocol)}}
    path = root / "metrics" / name / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def verdict_rows(text: str) -> dict[str, dict]:
    tables = [t for t in parse_markdown_tables(text) if t.header[0] == "row"]
    return {r["row"]: r for t in tables for r in t.records()}


@pytest.mark.stage
def test_report_verdicts_equal_a_hand_computation(tmp_path):
    raw = read_raw(REPO / "params.yaml")
    raw.update(profile="reference", extra_seeds=[1, 2], imported_checkpoints={
        "released_exp": {"experiment": EXP, "source": "released.pth"}})
    raw["report"] = {"register": False}
    for dataset in ("cityscapes", "ade20k"):   # the real datasets, not the generated sample
        raw["data"]["datasets"][dataset]["source"] = str(tmp_path / "real" / dataset)
    params = as_params(raw, tmp_path)
    # EXP: three seeds 78.0 / 78.5 / 79.0 -> mean 78.5, std 0.5, band ±2·0.5/√3 = ±0.577: 78.61 reproduced.
    for run, value in zip(params.seeded_runs(EXP), (78.0, 78.5, 79.0), strict=True):
        write_eval(tmp_path, run, "cityscapes", value, None, PUBLISHED_PROTOCOL[EXP])
    write_eval(tmp_path, "released_exp", "cityscapes", 78.40, None, PUBLISHED_PROTOCOL[EXP])   # -0.21
    # SLIDE: one seed, 76.0 (ms+flip 80.0) -> prior 0.7, band ±1.4: 78.44 is above it (below);
    # ms+flip 80.27 within 80.0 ± 1.4 (reproduced).
    write_eval(tmp_path, SLIDE, "cityscapes", 76.0, 80.0, PUBLISHED_PROTOCOL[SLIDE])
    # ADE: 50 of the 2000 images -> not comparable, whatever the figure.
    write_eval(tmp_path, ADE, "ade20k", 41.7, 43.0, PUBLISHED_PROTOCOL[ADE] | {"images": 50})
    from pipeline.report import write_report

    text = write_report(params, out_root=tmp_path).read_text()
    rows = verdict_rows(text)
    assert rows[EXP]["mIoU ours"] == "78.50 ± 0.50 (n=3)" and rows[EXP]["mIoU verdict"] == "reproduced"
    assert rows[EXP]["mIoU published"] == "78.61" and rows[EXP]["mIoU released"] == "78.40"
    assert rows[EXP]["mIoU released check"] == "evaluation differs (-0.21)"
    assert rows[EXP]["mIoU(ms+flip) verdict"] == "-"                  # no published ms+flip figure
    assert rows[SLIDE]["mIoU ours"] == "76.00 ± 0.70 (n=1, prior std)" and rows[SLIDE]["mIoU verdict"] == "below"
    assert rows[SLIDE]["mIoU(ms+flip) verdict"] == "reproduced"
    assert rows[ADE]["mIoU verdict"] == "not comparable: 50 of 2000 images"
    assert rows[ADE]["mIoU(ms+flip) verdict"] == "not comparable: 50 of 2000 images"
    assert "Rule: ours is the mean over the row's seeds" in text
    # every seed's own figure is on the page (the "This pipeline" table, in the HTML too)
    html = (tmp_path / "reports" / "results.html").read_text()
    for run in params.seeded_runs(EXP):
        assert f"<td>{run}</td>" in html


@pytest.mark.stage
def test_report_on_the_generated_sample_gives_no_verdict(tmp_path):
    raw = read_raw(REPO / "params.yaml")   # data sources: data/sample/<dataset> (the sample stage's)
    raw["report"] = {"register": False}
    params = as_params(raw, tmp_path)
    write_eval(tmp_path, EXP, "cityscapes", 78.6, None, PUBLISHED_PROTOCOL[EXP])
    from pipeline.report import write_report

    rows = verdict_rows(write_report(params, out_root=tmp_path).read_text())
    assert rows[EXP]["mIoU verdict"] == "not comparable: generated sample data"
    assert rows[EXP]["mIoU ours"] == "78.60 ± 0.70 (n=1, prior std)"


@pytest.mark.stage
def test_tuned_row_with_seeds_against_the_untuned_as_mean_and_std(tmp_path):
    from pipeline.report import build_markdown

    raw = read_raw(REPO / "params.yaml")
    raw["extra_seeds"] = [1, 2]
    params = as_params(raw, tmp_path)
    name = params.tune.experiment
    finals = {name: 10.0, f"{name}-s1": 11.0, f"{name}-s2": 12.0,
              f"{name}-tuned": 20.0, f"{name}-tuned-s1": 22.0, f"{name}-tuned-s2": 24.0}
    for run, miou in finals.items():
        path = tmp_path / "metrics" / run / "train.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"final": {"iteration": 4, "mIoU": miou}}))
    text = build_markdown(params, {}, {}, tmp_path)
    tuned_sd = statistics.stdev([20.0, 22.0, 24.0])   # 2.0
    assert (f"final val mIoU 22.00 ± {tuned_sd:.2f} (n=3); `{name}` on params.yaml's schedule: "
            f"11.00 ± 1.00 (n=3); difference of the means +11.00") in text


# --- DVC: the stages `dvc exp run -S` asks for ------------------------------------------------------

@pytest.mark.integration
def test_dvc_exp_run_with_extra_seeds_makes_a_stage_per_seed(tmp_path):
    """Without extra_seeds, today's stages exactly. `dvc exp run -S 'extra_seeds=[1,2]'` (DVC templates
    dvc.yaml's matrix from params.yaml after applying -S; here with one cheap stage as its target): the
    stages of each seed, with their commands and their place in the graph."""
    import networkx as nx
    from dvc.repo import Repo

    work, env = repo_copy(tmp_path)
    experiments = list(read_raw(work / "params.yaml")["experiments"])
    today = (["sample"] + [f"prepare@{d}" for d in ("cityscapes", "ade20k")]
             + [f"weights@{b}" for b in ("R-50-D8", "R-101-D8", "R-18-D8")]
             + [f"published@{e}" for e in experiments]
             + [f"train@{e}" for e in experiments] + ["train_tuned"] + [f"evaluate@{e}" for e in experiments]
             + ["report", "tune"])
    assert run_dvc(["stage", "list", "--name-only"], work, env).split() == today
    commit_all(work)
    run_dvc(["exp", "run", "-S", "extra_seeds=[1,2]", "weights@R-18-D8"], work, env)
    assert read_raw(work / "params.yaml")["extra_seeds"] == [1, 2]   # applied to the workspace
    seeded = ([f"train_seed@{e}-{s}" for e in experiments for s in (1, 2)] + ["train_tuned_seed@1",
              "train_tuned_seed@2"] + [f"evaluate_seed@{e}-{s}" for e in experiments for s in (1, 2)])
    assert sorted(run_dvc(["stage", "list", "--name-only"], work, env).split()) == sorted(today + seeded)
    with contextlib.chdir(work), Repo(str(work)) as repo:   # stage names are relative to the working dir
        stages = {stage.addressing: stage for stage in repo.index.stages}
        graph = repo.index.graph   # edges run from a stage to the stages it depends on
        assert stages[f"train_seed@{EXP}-2"].cmd == f"dnlseg train {EXP} --seed 2"
        assert stages[f"evaluate_seed@{EXP}-2"].cmd == f"dnlseg evaluate {EXP} --seed 2"
        assert stages["train_tuned_seed@1"].cmd == f"dnlseg train {EXP} --tuned --seed 1"
        upstream = {name: {s.addressing for s in nx.descendants(graph, stages[name])}
                    for name in (f"evaluate_seed@{EXP}-2", "train_tuned_seed@1", "report")}
    assert {f"train_seed@{EXP}-2", "prepare@cityscapes", "weights@R-50-D8"} <= upstream[f"evaluate_seed@{EXP}-2"]
    assert f"train_seed@{EXP}-1" not in upstream[f"evaluate_seed@{EXP}-2"]
    assert "tune" in upstream["train_tuned_seed@1"]
    assert {f"evaluate_seed@{EXP}-1", f"evaluate_seed@{EXP}-2", f"evaluate@{EXP}"} <= upstream["report"]


def commit_all(work: Path) -> None:
    """`dvc exp run` starts from a commit."""
    import subprocess

    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=work,
                   check=True)


# --- three seeds trained for real ----------------------------------------------------------------

@pytest.mark.integration
def test_three_sample_seeds_are_three_runs_with_different_metrics(ray_local, make_params, tmp_path):
    """SMALL_EXPERIMENT with seeds 0, 1, 2 through the train and evaluate stages' entry points: three Ray
    runs and MLflow runs under their own names with their seed in the params, different curves, and the
    report's mean ± std of their mIoU as computed here by hand."""
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate import evaluate_experiment
    from pipeline.report import write_report
    from pipeline.train import train_experiment

    raw = make_params(tmp_path, max_iters=2, evals_per_run=1, num_workers=1)
    raw["extra_seeds"] = [1, 2]
    raw["report"] = {"register": False}
    raw["evaluate"]["profiles"]["sample"].update(fps_images=None, overlays=0, ms_ratios=[1.0])
    params, out = as_params(raw), tmp_path / "out"
    runs = [train_experiment(params, SMALL_EXPERIMENT, seed=seed, out_root=out) for seed in (0, 1, 2)]
    names = [SMALL_EXPERIMENT, f"{SMALL_EXPERIMENT}-s1", f"{SMALL_EXPERIMENT}-s2"]
    assert [r["run_name"].rsplit("-", 1)[0] for r in runs] == names
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    mlflow_runs = [client.get_run(r["mlflow_run_id"]) for r in runs]
    assert [r.info.run_name for r in mlflow_runs] == [r["run_name"] for r in runs]
    assert [r.data.params["seed"] for r in mlflow_runs] == ["0", "1", "2"]
    curves = [(out / "plots" / n / "train.csv").read_text() for n in names]
    assert len(set(curves)) == 3   # other initialisation, data order, augmentation: other losses

    evaluations = [evaluate_experiment(params, SMALL_EXPERIMENT, seed=s, out_root=out) for s in (0, 1, 2)]
    values = [e["single_scale"]["mIoU"] for e in evaluations]
    assert [e["mlflow"]["run_id"] for e in evaluations] == [r["mlflow_run_id"] for r in runs]   # each its own run
    assert [json.loads((out / "metrics" / n / "eval.json").read_text())["single_scale"]["mIoU"]
            for n in names] == values
    text = write_report(params, out_root=out).read_text()
    row = verdict_rows(text)[SMALL_EXPERIMENT]
    mean, sd = sum(values) / 3, math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    assert row["mIoU ours"] == f"{mean:.2f} ± {sd:.2f} (n=3)"
    assert row["mIoU verdict"] == "-"   # our own R-18 row: no published figure


def test_repro_counts_the_seed_stages_as_ray_stages_of_their_dataset():
    from pipeline.repro import RAY_GROUPS, _experiment_datasets

    params = params_with(extra_seeds=[1])
    assert {"train_seed", "train_tuned_seed", "evaluate_seed"} <= set(RAY_GROUPS)   # evaluations run Ray tasks
    assert _experiment_datasets(params, [f"train_seed@{ADE}-1"]) == {"ade20k"}
    assert _experiment_datasets(params, [f"dvc.yaml:evaluate_seed@{EXP}-1", "train_tuned_seed@1"]) == {"cityscapes"}


@pytest.mark.stage
def test_a_seeds_evaluation_finds_its_training_run(tmp_path, mlflow_db_template):
    import shutil

    from mlflow.tracking import MlflowClient

    from components.tracking import find_training_run

    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("cityscapes", artifact_location=str(tmp_path / "artifacts"))

    def run(name: str, stage: str) -> str:
        created = client.create_run(experiment_id, run_name=name, tags={"experiment": name.rsplit("-", 1)[0]
                                                                        if "eval" in name else name,
                                                                        "dvc_stage": stage})
        client.set_terminated(created.info.run_id)
        return created.info.run_id

    base, seeded = run(EXP, f"train@{EXP}"), run(f"{EXP}-s1", f"train_seed@{EXP}-1")
    run(f"{EXP}-s1-eval", f"evaluate_seed@{EXP}-1")   # an evaluation's own run: never the training run
    assert find_training_run(client, "cityscapes", EXP) == base
    assert find_training_run(client, "cityscapes", f"{EXP}-s1") == seeded


def test_each_seed_has_its_own_data_order_and_augmentation_stream():
    """recipe.seed drives the init (seed_everything before the model is built), the data order and the
    augmentation (components/learning/loop.py). Seed 0's global order is torch's DistributedSampler's
    with seed 0 on one replica (the order elastic runs share whatever their worker count), its crops
    seeded 1_000_003 x rank + iteration; seed 1's are not seed 0's one epoch / one iteration later, as
    `seed + epoch` would make them."""
    from torch.utils.data import DistributedSampler

    from components.learning.distributed import InfiniteDistributedSampler, augmentation_seed, stream_seed

    assert [augmentation_seed(0, rank, it) for rank, it in ((0, 0), (1, 5), (3, 7))] == [0, 1_000_008, 3_000_016]
    reference = DistributedSampler(list(range(20)), num_replicas=1, rank=0, shuffle=True, seed=0)
    reference.set_epoch(1)
    seed0 = InfiniteDistributedSampler(20, 1, 2, seed=stream_seed(0))   # order(): the global order
    assert seed0.order(1) == list(reference)
    seed1 = InfiniteDistributedSampler(20, 1, 2, seed=stream_seed(1))
    assert all(seed1.order(epoch) != seed0.order(epoch + 1) for epoch in range(5))
    crops = {augmentation_seed(seed, rank, it) for seed in range(3) for rank in range(4) for it in range(1000)}
    assert len(crops) == 3 * 4 * 1000   # no two (seed, rank, iteration) share an augmentation stream
