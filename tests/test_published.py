"""The published runs' training logs: mmcv 1.x JSON lines read as they really are, fetched once over a
loopback HTTP server, recorded with their sha256, logged to MLflow beside our runs; the "behind the
published curve" check.

The logs here are written line by line in mmcv 1.x's TextLoggerHook format (a meta line; train lines
with decode.loss_seg / aux.loss_seg, memory in MiB; val lines with the val loop's count as `iter` and
the metrics as fractions), and every expected series is typed in by hand.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from conftest import REPO, as_params

from components.behind_published import (
    TAG,
    behind_published,
    behind_since,
    behind_summary,
    noise_band,
    published_miou_at,
    tag,
    warning_line,
)
from components.evaluation.table import parse_seed_table
from components.published_log import ended_early, parse_log, recorded_curve
from pipeline.config import ConfigError, published_plot, published_record, read_raw

EXP = "dnl_r50-d8_512x1024_40k_cityscapes"
CONFIG = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
          "runner = dict(type='IterBasedRunner', max_iters=300)\n"
          "evaluation = dict(interval=100, metric='mIoU')\n")
META = {"env_info": "sys.platform: linux\nGPU 0,1,2,3: Tesla V100-SXM2-32GB\nPyTorch: 1.5.0",
        "seed": 0, "exp_name": "dnl_r50-d8_512x1024_40k_cityscapes.py", "mmseg_version": "0.5.0+b2724da",
        "config": CONFIG, "CLASSES": ["road", "sidewalk"], "PALETTE": [[128, 64, 128], [244, 35, 232]]}


def train_line(it, decode, aux, lr, memory, key="loss_seg"):
    return json.dumps({"mode": "train", "epoch": 1, "iter": it, "lr": lr, "memory": memory, "data_time": 0.01,
                       f"decode.{key}": decode, "decode.acc_seg": 90.0, f"aux.{key}": aux, "aux.acc_seg": 85.0,
                       "loss": decode + 0.4 * aux, "time": 0.5})


def val_line(miou, macc, aacc, count=500):
    # `iter` is the val loop's count (500 Cityscapes val images), not the training iteration
    return json.dumps({"mode": "val", "epoch": 1, "iter": count, "lr": 0.001, "aAcc": aacc, "mIoU": miou,
                       "mAcc": macc})


# A run evaluated every 100 of 300 iterations, resumed from its checkpoint at 100 after iteration 200
# (150 and 200 logged twice, the later range counts), with one malformed line (iteration 250).
RESUMED_LOG = "\n".join([
    json.dumps(META),
    train_line(50, 2.0, 1.0, 0.01, 2048),
    train_line(100, 1.5, 0.5, 0.009, 2048),
    val_line(0.25, 0.3, 0.5),
    train_line(150, 1.4, 0.45, 0.008, 2048),
    train_line(200, 1.3, 0.4, 0.007, 3072),
    val_line(0.3, 0.35, 0.6),
    json.dumps(META),                            # the resumed run's own meta line
    train_line(150, 1.2, 0.5, 0.008, 1024),
    train_line(200, 1.0, 0.5, 0.007, 1024),
    val_line(0.3210, 0.4, 0.7),
    '{"mode": "train", "epoch": 1, "iter": 250,, "lr": 0.006}',
    train_line(300, 0.8, 0.25, 0.0001, 1024),
    val_line(0.7861, 0.85, 0.95),
]) + "\n"
RESUMED_TRAIN = [   # iteration, loss = decode + 0.4 aux, decode, aux, lr, memory GiB (MiB / 1024)
    {"iteration": 50, "loss": 2.4, "decode_loss": 2.0, "aux_loss": 1.0, "lr": 0.01, "memory_gb": 2.0},
    {"iteration": 100, "loss": 1.7, "decode_loss": 1.5, "aux_loss": 0.5, "lr": 0.009, "memory_gb": 2.0},
    {"iteration": 150, "loss": 1.4, "decode_loss": 1.2, "aux_loss": 0.5, "lr": 0.008, "memory_gb": 1.0},
    {"iteration": 200, "loss": 1.2, "decode_loss": 1.0, "aux_loss": 0.5, "lr": 0.007, "memory_gb": 1.0},
    {"iteration": 300, "loss": 0.9, "decode_loss": 0.8, "aux_loss": 0.25, "lr": 0.0001, "memory_gb": 1.0},
]
RESUMED_VAL = [{"iteration": 100, "mIoU": 25.0, "mAcc": 30.0, "aAcc": 50.0},
               {"iteration": 200, "mIoU": 32.1, "mAcc": 40.0, "aAcc": 70.0},
               {"iteration": 300, "mIoU": 78.61, "mAcc": 85.0, "aAcc": 95.0}]

# A later mmseg's names (loss_ce), cut in the middle of a line: the crashed run ends at 150 of 300.
TRUNCATED_LOG = "\n".join([
    json.dumps(META),
    train_line(50, 2.0, 1.0, 0.01, 512, key="loss_ce"),
    train_line(100, 1.0, 0.5, 0.009, 512, key="loss_ce"),
    val_line(0.125, 0.25, 0.5),
    train_line(150, 0.5, 0.5, 0.008, 512, key="loss_ce"),
    '{"mode": "train", "epoch": 1, "iter": 200, "lr": 0.00',
])


def approx_rows(rows):
    return [{k: pytest.approx(v) for k, v in row.items()} for row in rows]


# --- the format ------------------------------------------------------------------------------------

def test_a_resumed_log_with_a_malformed_line_reads_as_the_hand_built_series():
    curve = parse_log(RESUMED_LOG, "resumed.log.json")
    assert curve.train == approx_rows(RESUMED_TRAIN)
    assert curve.val == approx_rows(RESUMED_VAL)
    assert curve.val[-1]["mIoU"] == 78.61   # fractions to percent without float noise
    assert curve.meta == {"exp_name": "dnl_r50-d8_512x1024_40k_cityscapes.py", "seed": 0,
                          "mmseg_version": "0.5.0+b2724da", "gpus": "GPU 0,1,2,3: Tesla V100-SXM2-32GB",
                          "eval_interval": 100, "max_iters": 300}
    assert len(curve.warnings) == 1
    assert curve.warnings[0].startswith("published log: resumed.log.json: line 12: not JSON")
    assert "\n" not in curve.warnings[0]
    assert ended_early(curve) is None


def test_a_truncated_log_with_loss_ce_ends_early_with_one_warning():
    curve = parse_log(TRUNCATED_LOG, "cut.log.json")
    assert curve.train == approx_rows([
        {"iteration": 50, "loss": 2.4, "decode_loss": 2.0, "aux_loss": 1.0, "lr": 0.01, "memory_gb": 0.5},
        {"iteration": 100, "loss": 1.2, "decode_loss": 1.0, "aux_loss": 0.5, "lr": 0.009, "memory_gb": 0.5},
        {"iteration": 150, "loss": 0.7, "decode_loss": 0.5, "aux_loss": 0.5, "lr": 0.008, "memory_gb": 0.5}])
    assert curve.val == approx_rows([{"iteration": 100, "mIoU": 12.5, "mAcc": 25.0, "aAcc": 50.0}])
    assert curve.warnings == ["published log: cut.log.json: line 6: truncated (the file ends inside this line); "
                              "skipped"]
    assert ended_early(curve) == "ends at iteration 150 of 300"


def test_a_val_line_takes_the_evaluation_iteration_after_the_last_train_line():
    # train lines every 40, evaluation every 100: the evaluation after the line at 80 ran at 100
    config = json.dumps({**META, "config": "evaluation = dict(interval=100, metric='mIoU')"})
    text = "\n".join([config, train_line(40, 1, 1, 0.1, 1), train_line(80, 1, 1, 0.1, 1), val_line(0.5, 0.5, 0.5),
                      train_line(120, 1, 1, 0.1, 1), train_line(160, 1, 1, 0.1, 1), train_line(200, 1, 1, 0.1, 1),
                      val_line(0.6, 0.5, 0.5)])
    assert [row["iteration"] for row in parse_log(text, "x").val] == [100, 200]
    # without the interval in the config: the preceding train line's iteration
    text = "\n".join([json.dumps({"seed": 0}), train_line(80, 1, 1, 0.1, 1), val_line(0.5, 0.5, 0.5)])
    assert [row["iteration"] for row in parse_log(text, "x").val] == [80]


@pytest.mark.parametrize("line, what", [
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"mode": "test", "iter": 5}', "line 2: expected mode train or val with an integer iter"),
    ('{"mode": "train", "iter": "50"}', "line 2: expected mode train or val with an integer iter"),
    (val_line(0.5, 0.5, 0.5), "line 2: a val line before any train line"),
])
def test_bad_lines_are_one_warning_each_naming_the_file_and_line(line, what):
    curve = parse_log("\n".join([json.dumps(META), line, train_line(50, 1.0, 1.0, 0.1, 10)]), "f.log.json")
    assert len(curve.warnings) == 1 and curve.warnings[0].startswith(f"published log: f.log.json: {what}")
    assert [row["iteration"] for row in curve.train] == [50]


def test_a_diverged_loss_is_left_out_not_a_failure():
    text = json.dumps({"mode": "train", "epoch": 1, "iter": 50, "lr": 0.01, "memory": 100, "loss": float("nan"),
                       "decode.loss_seg": float("inf"), "aux.loss_seg": 1.0})
    (row,) = parse_log(text, "x").train
    assert row["loss"] is None and row["decode_loss"] is None and row["aux_loss"] == 1.0


# --- params: which log a row has under which profile ------------------------------------------------

def test_rows_default_to_none_on_sample_and_to_the_seed_tables_link_on_reference():
    params = as_params(read_raw(REPO / "params.yaml"))
    links = {row.config: row.log_url for row in parse_seed_table()}
    assert links[EXP] == ("https://download.openmmlab.com/mmsegmentation/v0.5/dnlnet/dnl_r50-d8_512x1024_40k_"
                          "cityscapes/dnl_r50-d8_512x1024_40k_cityscapes-20200904_233629.log.json")
    assert len(links) == 12 and all(url.endswith(".log.json") for url in links.values())
    for name in params.experiments:
        assert params.published_log(name, "sample") == "none"
        assert params.published_log(name, "reference") == links.get(name, "none")   # the showcase row: none


def test_a_row_that_says_wins_over_the_profile(tmp_path):
    raw = read_raw(REPO / "params.yaml")
    raw["experiments"][EXP]["published_log"] = "logs/mine.log.json"
    raw["experiments"]["dnl_r101-d8_512x1024_40k_cityscapes"]["published_log"] = "none"
    raw["experiments"]["dnl_r50-d8_769x769_40k_cityscapes"]["published_log"] = "released"
    params = as_params(raw, tmp_path)
    assert params.published_log(EXP, "sample") == str(tmp_path / "logs/mine.log.json")
    assert params.published_log("dnl_r101-d8_512x1024_40k_cityscapes", "reference") == "none"
    assert params.published_log("dnl_r50-d8_769x769_40k_cityscapes", "sample").endswith(
        "dnl_r50-d8_769x769_40k_cityscapes-20200820_232206.log.json")


@pytest.mark.parametrize("value, message", [
    ("s3://bucket/x.log.json", "expected released, none, an http(s) URL or a local path, got 's3://"),
    ("https://user:pw@example.com/x.log.json", "the URL holds credentials"),
])
def test_bad_published_log_values_name_the_key(value, message):
    raw = read_raw(REPO / "params.yaml")
    raw["experiments"][EXP]["published_log"] = value
    with pytest.raises(ConfigError, match=re.escape(f"params.yaml: experiments.{EXP}.published_log: {message}")):
        as_params(raw)


def test_released_on_a_row_the_table_lacks_is_one_line():
    raw = read_raw(REPO / "params.yaml")
    raw["experiments"]["dnl_r18-d8_512x1024_40k_cityscapes"]["published_log"] = "released"
    with pytest.raises(ConfigError, match="experiments.dnl_r18-d8_512x1024_40k_cityscapes.published_log: "
                                          "released: the results table has no published log"):
        as_params(raw).published_log("dnl_r18-d8_512x1024_40k_cityscapes")


# --- the stage: fetched once over HTTP, recorded, in MLflow ----------------------------------------

@pytest.fixture
def served(tmp_path, file_server, mlflow_db_template):
    """params.yaml with EXP's published log on the loopback server (and a truncated one for the R-101
    row), the download cache and an MLflow store under tmp_path. Returns (params dict, log path, url)."""
    import shutil

    logs = tmp_path / "server"
    logs.mkdir()
    log = logs / "resumed.log.json"
    log.write_text(RESUMED_LOG)
    (logs / "cut.log.json").write_text(TRUNCATED_LOG)
    raw = read_raw(REPO / "params.yaml")
    raw["experiments"][EXP]["published_log"] = file_server.add("v0.5/resumed.log.json", log)
    raw["experiments"]["dnl_r101-d8_512x1024_40k_cityscapes"]["published_log"] = file_server.add(
        "v0.5/cut.log.json", logs / "cut.log.json")
    raw["downloads"] = {"cache_dir": str(tmp_path / "cache")}
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return raw, log, raw["experiments"][EXP]["published_log"]


def mlflow_runs(uri, dataset="cityscapes"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(dataset)
    return client, client.search_runs([experiment.experiment_id], filter_string="tags.source = 'published'")


def history(client, run_id, key):
    return [(m.step, pytest.approx(m.value)) for m in sorted(client.get_metric_history(run_id, key),
                                                                key=lambda m: m.step)]


def test_fetched_once_recorded_and_a_run_in_mlflow_at_the_training_iterations(served, tmp_path, file_server):
    from pipeline.published import fetch_published

    raw, log, url = served
    params = as_params(raw, tmp_path)
    record = fetch_published(params, EXP)
    assert record["sha256"] == hashlib.sha256(log.read_bytes()).hexdigest()
    assert record["source"] == url and "previous_sha256" not in record
    on_disk = json.loads(published_record(tmp_path, EXP).read_text())
    assert on_disk["curve"]["train"] == approx_rows(RESUMED_TRAIN)
    assert on_disk["curve"]["val"] == approx_rows(RESUMED_VAL)
    assert recorded_curve(published_record(tmp_path, EXP)).val == approx_rows(RESUMED_VAL)   # the train stage's
    csv_lines = published_plot(tmp_path, EXP).read_text().splitlines()
    assert csv_lines[0] == "iteration,loss,decode_loss,aux_loss,lr,memory_gb,mIoU,mAcc,aAcc"
    assert csv_lines[1] == "50,2.4,2.0,1.0,0.01,2.0,,,"
    assert csv_lines[-1] == "300,0.9,0.8,0.25,0.0001,1.0,78.61,85.0,95.0"

    client, (run,) = mlflow_runs(raw["tracking"]["uri"])
    assert run.info.run_name == f"{EXP} (published)" and run.info.status == "FINISHED"
    assert run.data.tags["source"] == "published" and run.data.tags["experiment"] == EXP
    assert history(client, run.info.run_id, "loss") == [(r["iteration"], r["loss"]) for r in RESUMED_TRAIN]
    assert history(client, run.info.run_id, "memory_gb") == [(50, 2.0), (100, 2.0), (150, 1.0), (200, 1.0),
                                                             (300, 1.0)]
    assert history(client, run.info.run_id, "mIoU") == [(100, 25.0), (200, 32.1), (300, 78.61)]
    assert history(client, run.info.run_id, "aux_loss")[-1] == (300, 0.25)

    # Again: the cached copy, no request, and the same MLflow run
    requests = list(file_server.requests)
    fetch_published(params, EXP)
    assert file_server.requests == requests == ["/v0.5/resumed.log.json"]
    _, runs = mlflow_runs(raw["tracking"]["uri"])
    assert [r.info.run_id for r in runs] == [run.info.run_id]


def test_a_truncated_log_is_a_warning_line_and_the_stage_succeeds(served, tmp_path, capsys):
    from pipeline.cli import main

    raw, _, _ = served
    cut = "dnl_r101-d8_512x1024_40k_cityscapes"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--params", str(tmp_path / "params.yaml"), "published", cut]) == 0
    err = capsys.readouterr().err
    # the one warning line (beside the download's progress bar)
    assert [line for line in err.splitlines() if "warning" in line or "published log" in line] == [
        f"published log: {raw['experiments'][cut]['published_log']}: line 6: truncated (the file ends inside "
        "this line); skipped"]
    record = json.loads(published_record(tmp_path, cut).read_text())
    assert record["ended_early"] == "ends at iteration 150 of 300"
    assert [r["iteration"] for r in record["curve"]["train"]] == [50, 100, 150]


def test_a_log_changed_on_the_server_is_noticed_and_re_recorded(served, tmp_path, file_server, capsys):
    from pipeline.published import fetch_published

    raw, log, url = served
    params = as_params(raw, tmp_path)
    first = fetch_published(params, EXP)["sha256"]
    log.write_text(RESUMED_LOG.replace('"mIoU": 0.7861', '"mIoU": 0.7961'))
    capsys.readouterr()
    second = fetch_published(params, EXP, refresh=True)
    assert second["sha256"] == hashlib.sha256(log.read_bytes()).hexdigest() != first
    assert second["previous_sha256"] == first
    changed = [line for line in capsys.readouterr().err.splitlines() if "changed since the last fetch" in line]
    assert changed == [f"[published] warning: {EXP}: {url} changed since the last fetch (sha256 {first[:12]} -> "
                       f"{second['sha256'][:12]}): re-recorded in {EXP}.json, previous_sha256 kept"]
    # a new machine (an empty download cache) notices it too, against the committed record
    log.write_text(RESUMED_LOG)
    raw["downloads"] = {"cache_dir": str(tmp_path / "other-cache")}
    assert fetch_published(as_params(raw, tmp_path), EXP)["previous_sha256"] == second["sha256"]
    client, (run,) = mlflow_runs(raw["tracking"]["uri"])   # one run, of the current file
    assert run.data.tags["dnlseg.published_sha256"] == first
    assert history(client, run.info.run_id, "mIoU")[-1] == (300, 78.61)


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path, capsys):
    from components.ray_cluster import free_port
    from pipeline.cli import main

    raw = read_raw(REPO / "params.yaml")
    raw["profile"] = "reference"
    raw["experiments"][EXP]["published_log"] = f"http://127.0.0.1:{free_port()}/x.log.json"
    raw["downloads"] = {"cache_dir": str(tmp_path / "cache")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--params", str(tmp_path / "params.yaml"), "published", EXP]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dnlseg published: error: published log of {EXP}: http://127.0.0.1:")
    assert "unreachable" in line and not published_record(tmp_path, EXP).exists()


def test_none_under_the_sample_profile_writes_an_empty_record_and_no_run(tmp_path, capsys):
    from pipeline.published import fetch_published

    params = as_params(read_raw(REPO / "params.yaml"), tmp_path)
    record = fetch_published(params, EXP)
    assert record == {"experiment": EXP, "dataset": "cityscapes", "source": "none",
                      "curve": {"meta": {}, "train": [], "val": [], "warnings": []}}
    header = "iteration,loss,decode_loss,aux_loss,lr,memory_gb,mIoU,mAcc,aAcc\n"
    assert published_plot(tmp_path, EXP).read_text() == header
    assert f"[published] {EXP}: none (profile sample" in capsys.readouterr().out
    assert recorded_curve(published_record(tmp_path, EXP)) is None
    assert not (tmp_path / "mlflow.db").exists()


# --- behind the published curve ---------------------------------------------------------------------

VAL = [{"iteration": 100, "mIoU": 20.0}, {"iteration": 200, "mIoU": 30.0}, {"iteration": 400, "mIoU": 40.0}]


@pytest.mark.parametrize("iteration, expected", [
    (50, None), (100, 20.0), (150, 25.0), (200, 30.0), (250, 32.5), (400, 40.0), (500, 40.0)])
def test_the_published_miou_is_interpolated_between_evaluations(iteration, expected):
    assert published_miou_at(list(reversed(VAL)), iteration) == expected


def test_behind_only_beyond_the_band():
    assert behind_published(31.0, 250, VAL, 1.5) is None            # 1.5 behind: exactly at the band
    behind = behind_published(30.9, 250, VAL, 1.5)
    assert behind.iteration == 250 and behind.published == 32.5 and behind.gap == pytest.approx(1.6)
    assert behind_published(10.0, 50, VAL, 0.7) is None             # before the first published evaluation
    assert behind_published(45.0, 400, VAL, 0.7) is None            # ahead


def test_the_warning_line_and_the_tag_say_the_gap_and_the_iteration():
    behind = behind_published(28.0, 200, VAL, noise_band("cityscapes"))
    assert warning_line(EXP, behind) == (f"[{EXP}] warning: behind the published curve at iteration 200: mIoU "
                                         "28.00 vs 30.00 published (2.00 behind, noise band 0.70)")
    assert tag(behind) == {TAG: "2.00 mIoU behind at iteration 200 (ours 28.00, published 30.00, band 0.70)"}
    assert TAG == "dnlseg.behind_published"


def test_behind_since_is_the_start_of_the_last_streak():
    ours = [{"iteration": 100, "mIoU": 10.0}, {"iteration": 200, "mIoU": 29.5}, {"iteration": 300, "mIoU": 30.0},
            {"iteration": 400, "mIoU": 35.0}]
    assert behind_since(ours, VAL, 1.0) == 300                       # 100: behind; 200: within; 300 and 400: behind
    assert behind_since(ours[:2], VAL, 1.0) is None
    assert behind_since(ours[:1] + [{"iteration": 150, "mIoU": None}], VAL, 1.0) == 100


def test_noise_bands_per_dataset():
    assert noise_band("cityscapes") == 0.7 and noise_band("ade20k") == 1.0
    with pytest.raises(ValueError, match="no run-to-run noise band for dataset 'voc'"):
        noise_band("voc")


def test_behind_summary_is_what_the_report_shows(tmp_path):
    from pipeline.report import _measured_line, _published_line

    ours = [{"iteration": 100, "mIoU": 19.9}, {"iteration": 200, "mIoU": 28.0}, {"iteration": 400, "mIoU": 37.5}]
    summary = behind_summary(ours, VAL, 0.7)
    assert summary == {"since": 200, "iteration": 400, "gap": 2.5, "band": 0.7}
    assert behind_summary(ours[:1], VAL, 0.7) is None
    trained = {"final": {"iteration": 400}, "best_val": {"mIoU": 37.5, "iteration": 400}, "precision": "fp32",
               "pretrained": "none", "behind_published": summary}
    ev = {"device": "cpu", "dtype": "fp32", "images": 4, "test": {"mode": "whole", "scale": [256, 128]},
          "ms_flip": {"ratios": [1.0], "flip": True}}
    assert ("; behind the published curve since iteration 200 (2.50 mIoU behind at iteration 400, noise band "
            "0.70); eval cpu") in _measured_line(EXP, ev, trained)
    assert "behind the published" not in _measured_line(EXP, ev, {**trained, "behind_published": None})
    params = as_params(read_raw(REPO / "params.yaml"), tmp_path)
    assert _published_line(params, tmp_path).startswith("Published training curves: none under profile `sample` "
                                                         "(no network here, as for the ImageNet weights")


def test_a_published_run_cut_short_is_logged_again_once(tmp_path, mlflow_db_template):
    import shutil

    from mlflow.tracking import MlflowClient

    from components.published_run import log_published_run

    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("cityscapes")
    cut = client.create_run(experiment_id, tags={"source": "published", "experiment": EXP,
                                                 "dnlseg.published_sha256": "ab" * 32})   # left RUNNING
    curve = parse_log(RESUMED_LOG, "resumed.log.json")
    run_id, created = log_published_run(uri, "cityscapes", EXP, curve, sha256="ab" * 32, source="x")
    assert created and run_id != cut.info.run_id
    assert client.get_run(cut.info.run_id).info.lifecycle_stage == "deleted"
    assert log_published_run(uri, "cityscapes", EXP, curve, sha256="ab" * 32, source="x") == (run_id, False)
    assert history(client, run_id, "lr") == [(r["iteration"], r["lr"]) for r in RESUMED_TRAIN]


def test_an_unreachable_tracking_server_is_a_warning_and_the_record_is_written(served, tmp_path, capsys):
    from components.ray_cluster import free_port
    from pipeline.published import fetch_published

    raw, log, _ = served
    raw["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}"}
    record = fetch_published(as_params(raw, tmp_path), EXP)
    assert record["sha256"] == hashlib.sha256(log.read_bytes()).hexdigest()
    assert json.loads(published_record(tmp_path, EXP).read_text())["sha256"] == record["sha256"]
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert line.startswith(f"[published] warning: {EXP}: MLflow at http://127.0.0.1:")
    assert line.endswith("the record is written")


def test_a_none_record_starts_without_mlflow():
    """Under profile sample every published@ stage is `none`: 13 stages that start without importing
    MLflow (`dnlseg published <exp>` measured here, 2 cores: 5.9 s with it, 3.2 s without)."""
    import subprocess
    import sys

    probe = "import sys, pipeline.cli, pipeline.published; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
