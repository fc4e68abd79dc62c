"""params.yaml resolution and validation: every bad value names its key."""

import copy

import pytest

from pipeline.config import ConfigError, experiment_names, load_params, resolve_experiment

R50 = "dnl_r50-d8_512x1024_40k_cityscapes"


@pytest.fixture(scope="module")
def params():
    return load_params()


def test_reference_profile_is_the_seed_settings(params):
    cfg = resolve_experiment(params, "dnl_r50-d8_769x769_40k_cityscapes", profile="reference")
    assert (cfg.crop_size, cfg.scale, cfg.test_stride) == ((769, 769), (2049, 1025), (513, 513))
    assert cfg.align_corners and cfg.test_mode == "slide"
    assert (cfg.max_iters, cfg.batch_size, cfg.eval_interval) == (40000, 8, 4000)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.01, 0.9, 5e-4)
    assert (cfg.poly_power, cfg.min_lr) == (0.9, 1e-4)
    assert (cfg.aux_weight, cfg.avg_non_ignore, cfg.warmup_iters) == (0.4, False, 0)
    ade = resolve_experiment(params, "dnl_r101-d8_512x512_160k_ade20k", profile="reference")
    assert (ade.num_classes, ade.depth, ade.batch_size, ade.max_iters) == (150, 101, 16, 160000)
    assert ade.scale == (2048, 512) and not ade.align_corners and ade.test_mode == "whole"


def test_the_matrix_covers_the_results_table(params):
    names = experiment_names(params)
    assert len(names) == 12
    for name in names:
        cfg = resolve_experiment(params, name, profile="reference")
        # the name encodes backbone, crop, schedule and dataset exactly as the seed's config names do
        crop = f"{cfg.crop_size[0]}x{cfg.crop_size[1]}"
        assert name == f"dnl_r{cfg.depth}-d8_{crop}_{cfg.max_iters // 1000}k_{cfg.dataset}"


def test_sample_profile_scales_sizes_and_iterations(params):
    cfg = resolve_experiment(params, R50, profile="sample")
    s = params["profiles"]["sample"]["size_scale"]
    assert cfg.crop_size == (round(512 * s), round(1024 * s)) and cfg.scale == (round(2048 * s), round(1024 * s))
    assert cfg.max_iters == params["profiles"]["sample"]["max_iters"]


def _broken(params, path, value):
    p = copy.deepcopy(params)
    d = p
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return p


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["experiments", R50, "backbone"], "R-18", f"experiments.{R50}.backbone: expected one of R-50-D8"),
        (["experiments", R50, "dataset"], "voc", f"experiments.{R50}.dataset: expected one of ade20k"),
        (["experiments", R50, "crop_size"], [1025, 1024], f"experiments.{R50}.crop_size: [1025, 1024]"),
        (["experiments", R50, "crop_size"], [512], f"experiments.{R50}.crop_size: expected two positive"),
        (["experiments", R50, "max_iters"], 0, f"experiments.{R50}.max_iters: expected a positive integer"),
        (["train", "lr"], -0.01, "train.lr: expected a positive number, got -0.01"),
        (["train", "lr"], 0, "train.lr: expected a positive number"),
        (["profiles", "sample", "max_iters"], -5, "profiles.sample.max_iters: expected an integer >= 0"),
        (["profiles", "sample", "precision"], "fp16", "profiles.sample.precision: fp16 needs use_gpu"),
        (["profile"], "huge", "profile: expected one of reference, sample"),
        (["train", "attention"], "flash", "train.attention: expected one of fused, naive"),
    ],
)
def test_invalid_params_name_the_key(params, path, value, message):
    bad = _broken(params, path, value)
    if path[0] == "experiments" and path[-1] == "max_iters":
        bad["profiles"]["sample"]["max_iters"] = 0  # so the experiment's own schedule is used
    with pytest.raises(ConfigError) as e:
        resolve_experiment(bad, R50)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_experiment_lists_the_known_ones(params):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*dnl_r50"):
        resolve_experiment(params, "nope")


def test_unreadable_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
