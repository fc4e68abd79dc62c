"""params.yaml resolution and validation: every bad value names its key, the whole file is checked
whatever the profile, unknown keys are refused, and the registries agree with params.yaml and dvc.yaml."""

import copy
import json

import pytest
import yaml
from conftest import REPO
from pydantic import ValidationError

from components.evaluation.table import parse_seed_table
from components.learning.backbones import BACKBONES
from components.learning.data import dataset_names, get_dataset
from pipeline.config import ConfigError, load, parse, read_raw

R50 = "dnl_r50-d8_512x1024_40k_cityscapes"
SHOWCASE = "dnl_r18-d8_512x1024_40k_cityscapes"


@pytest.fixture(scope="module")
def raw():
    return read_raw(REPO / "params.yaml")


@pytest.fixture(scope="module")
def params(raw):
    return parse(raw, REPO)


def test_reference_profile_is_the_seed_settings(params):
    cfg = params.experiment("dnl_r50-d8_769x769_40k_cityscapes", profile="reference")
    r = cfg.recipe
    assert (r.crop_size, r.scale, r.test_stride) == ((769, 769), (2049, 1025), (513, 513))
    assert r.align_corners and r.test_mode == "slide"
    assert (cfg.max_iters, r.batch_size, cfg.eval_interval) == (40000, 8, 4000)
    s = cfg.schedule
    assert (s.lr, s.momentum, s.weight_decay) == (0.01, 0.9, 5e-4)
    assert (s.poly_power, s.min_lr) == (0.9, 1e-4)
    assert (r.aux_weight, r.avg_non_ignore, s.warmup_iters) == (0.4, False, 0)
    ade = params.experiment("dnl_r101-d8_512x512_160k_ade20k", profile="reference")
    assert (ade.num_classes, ade.depth, ade.recipe.batch_size, ade.max_iters) == (150, 101, 16, 160000)
    assert ade.recipe.scale == (2048, 512) and not ade.recipe.align_corners and ade.recipe.test_mode == "whole"


def test_the_matrix_covers_the_results_table(params):
    names = list(params.experiments)
    published = [row.config for row in parse_seed_table()]
    assert len(published) == 12 and set(published) <= set(names)
    assert set(names) - set(published) == {SHOWCASE}      # our own row on the small backbone
    for name in names:
        cfg = params.experiment(name, profile="reference")
        # the name encodes backbone, crop, schedule and dataset exactly as the seed's config names do
        crop = f"{cfg.recipe.crop_size[0]}x{cfg.recipe.crop_size[1]}"
        assert name == f"dnl_r{cfg.depth}-d8_{crop}_{cfg.max_iters // 1000}k_{cfg.recipe.dataset}"
        assert params.experiments[name].schedule == f"{cfg.max_iters // 1000}k"


def test_sample_profile_scales_sizes_and_iterations(raw, params):
    cfg = params.experiment(R50, profile="sample")
    s = raw["profiles"]["sample"]["size_scale"]
    assert cfg.recipe.crop_size == (round(512 * s), round(1024 * s))
    assert cfg.recipe.scale == (round(2048 * s), round(1024 * s))
    scale = raw["profiles"]["sample"]["schedule_scale"]
    assert raw["profiles"]["sample"]["max_iters"] is None and cfg.max_iters == round(40000 * scale) == 1
    # Every row stays a distinct run: the 40k / 80k / 160k rows keep their proportions.
    iters = {params.experiments[n].schedule: params.experiment(n, "sample").max_iters for n in params.experiments
             if n != SHOWCASE}
    assert iters == {"40k": 1, "80k": 2, "160k": 4}


def test_config_crosses_to_the_workers_as_it_is(params):
    """The training config is one frozen model: tuples stay tuples through a copy by reduction (the
    protocol Ray's cloudpickle uses to send it)."""
    cfg = params.experiment(R50)
    again = copy.deepcopy(cfg)
    assert again == cfg and isinstance(again.recipe.crop_size, tuple) and again.schedule.lr == 0.01
    with pytest.raises(ValidationError, match="frozen"):
        cfg.name = "other"   # frozen


def _broken(raw, path, value):
    p = copy.deepcopy(raw)
    d = p
    for k in path[:-1]:
        d = d[k]
    if value is DELETE:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return p


DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["experiments", R50, "backbone"], "R-18", f"experiments.{R50}.backbone: expected one of R-50-D8"),
        (["experiments", R50, "dataset"], "voc", f"experiments.{R50}.dataset: expected one of ade20k"),
        (["experiments", R50, "crop_size"], [1025, 1024], f"experiments.{R50}.crop_size: [1025, 1024]"),
        (["experiments", R50, "crop_size"], [512], f"experiments.{R50}.crop_size: expected two positive"),
        (["experiments", R50, "schedule"], "20k", f"experiments.{R50}.schedule: expected one of 40k, 80k, 160k"),
        (["schedules", "40k", "max_iters"], 0, "schedules.40k.max_iters: expected a positive integer"),
        (["train", "lr"], -0.01, "train.lr: expected a positive number, got -0.01"),
        (["train", "lr"], 0, "train.lr: expected a positive number"),
        (["profiles", "sample", "max_iters"], -5,
         "profiles.sample.max_iters: expected a positive integer or null, got -5"),
        (["profiles", "sample", "precision"], "fp16", "profiles.sample.precision: fp16 needs use_gpu"),
        (["profile"], "huge", "profile: expected one of reference, sample"),
        (["train", "attention"], "flash", "train.attention: expected one of fused, naive"),
        (["train", "pretrained", "R-18"], "x.pth", "train.pretrained.R-18: not a registered backbone"),
        (["data", "datasets", "voc"], {"source": "voc"}, "data.datasets.voc: not a registered dataset"),
        (["data", "datasets", "cityscapes", "source"], DELETE, "data.datasets.cityscapes.source: missing"),
        (["sample", "ade20k", "train"], 0, "sample.ade20k.train: expected a positive integer, got 0"),
        (["tune", "experiment"], "nope", "tune.experiment: unknown experiment 'nope'"),
        (["imported_checkpoints"], {"x": {"experiment": "nope", "source": "a.pth"}},
         "imported_checkpoints.x.experiment: expected one of"),
        # a value of the wrong type
        (["train", "channels_last"], "yes", "train.channels_last: expected true or false, got 'yes'"),
        (["train", "attention"], 3, "train.attention: expected one of fused, naive, got 3"),
        (["tracking", "uri"], 5, "tracking.uri: expected a string, got 5"),
        (["profiles", "sample"], [1], "profiles.sample: expected a mapping, got [1]"),
        # an empty list where one is needed
        (["tune", "space", "lr"], {"choice": []}, "tune.space.lr.choice: expected a non-empty list, got []"),
        # a 0 where null now means "inherit / all / skip"
        (["profiles", "sample", "batch_size"], 0,
         "profiles.sample.batch_size: expected a positive integer or null, got 0"),
        (["profiles", "sample", "val_max_images"], 0,
         "profiles.sample.val_max_images: expected a positive integer or null"),
        (["evaluate", "fps_images"], 0, "evaluate.fps_images: expected a positive integer or null, got 0"),
        (["tune", "resources_per_trial", "num_workers"], 0,
         "tune.resources_per_trial.num_workers: expected a positive integer or null, got 0"),
        (["tune", "eval_interval"], 0, "tune.eval_interval: expected a positive integer or null, got 0"),
        (["data", "prepare_workers"], 0, "data.prepare_workers: expected a positive integer or null, got 0"),
    ],
)
def test_invalid_params_name_the_key(raw, path, value, message):
    with pytest.raises(ConfigError) as e:
        parse(_broken(raw, path, value), REPO)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["train", "lr_typo"], 0.1, "train.lr_typo: unknown key (did you mean lr?)"),
        (["train", "weight_decy"], 0.1, "train.weight_decy: unknown key (did you mean weight_decay?)"),
        (["profiles", "reference", "num_worker"], 2, "profiles.reference.num_worker: unknown key (did you "
                                                     "mean num_workers?)"),
        (["experiments", R50, "max_iter"], 5, f"experiments.{R50}.max_iter: unknown key"),
        (["evaluate", "profiles", "sample", "flips"], True, "evaluate.profiles.sample.flips: unknown key (did you "
                                                            "mean flip?)"),
        (["sample", "ade20k", "depth"], 3, "sample.ade20k.depth: unknown key"),
        (["tune", "resources_per_trial", "driver_gpu"], 1, "tune.resources_per_trial.driver_gpu: unknown key "
                                                           "(did you mean driver_cpu?)"),
        (["trian"], {}, "trian: unknown key (did you mean train?)"),
        (["tune", "scheduler", "grace_periods"], 1,
         "tune.scheduler.grace_periods: unknown key (did you mean grace_period?)"),
        (["storage", "endpoint"], "http://x", "storage.endpoint: unknown key (did you mean endpoint_url?)"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_known_one(raw, path, value, message):
    with pytest.raises(ConfigError) as e:
        parse(_broken(raw, path, value), REPO)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "path, value, message",
    [   # values the active profile (sample) overrides or never uses are still checked
        (["experiments", R50, "batch_size"], "eight", f"experiments.{R50}.batch_size: expected a positive integer"),
        (["evaluate", "ms_ratios"], [], "evaluate.ms_ratios: expected a list of positive numbers"),
        (["profiles", "reference", "evals_per_run"], 0, "profiles.reference.evals_per_run: expected a positive"),
        (["evaluate", "profiles", "sample", "fps_images"], 1, "evaluate.profiles.sample.fps_images: 1 must be "
                                                              "larger than fps_warmup"),
        # a value only another profile uses
        (["profiles", "reference", "resources_per_worker"], {"GPU": -1},
         "profiles.reference.resources_per_worker: expected a mapping of Ray resources"),
        (["profiles", "reference", "precision"], "fp8",
         "profiles.reference.precision: expected one of fp32, tf32, bf16, fp16, got 'fp8'"),
        (["evaluate", "profiles", "sample", "device"], "tpu", "evaluate.profiles.sample.device: expected one of auto"),
        (["evaluate", "profiles", "huge"], {}, "evaluate.profiles.huge: not a profile"),
        (["evaluate", "cpu_threads"], -1, "evaluate.cpu_threads: expected a positive integer or null, got -1"),
    ],
)
def test_every_value_is_checked_whatever_the_profile(raw, path, value, message):
    assert raw["profile"] == "sample"
    with pytest.raises(ConfigError) as e:
        parse(_broken(raw, path, value), REPO)
    assert message in str(e.value)


def test_the_showcase_row_trains_longer_under_the_sample_profile_only(raw, params):
    iterations = raw["profiles"]["sample"]["iterations"][SHOWCASE]
    assert params.experiment(SHOWCASE, profile="sample").max_iters == iterations > 100
    assert params.experiment(SHOWCASE, profile="reference").max_iters == 40000
    assert params.experiment(R50, profile="sample").max_iters == 1       # the others as before
    broken = copy.deepcopy(raw)
    broken["profiles"]["reference"]["iterations"] = {"dnl_nope": 10}
    with pytest.raises(ConfigError, match=r"^params.yaml: profiles.reference.iterations.dnl_nope: unknown experiment"):
        parse(broken, REPO)
    broken["profiles"]["reference"]["iterations"] = {SHOWCASE: 0}
    with pytest.raises(ConfigError, match=r"profiles.reference.iterations.dnl_r18\S*: expected a positive integer"):
        parse(broken, REPO)


def test_unknown_experiment_lists_the_known_ones(params):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*dnl_r50"):
        params.experiment("nope")


def test_unreadable_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load(bad)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")


def test_paths_resolve_against_the_repo_the_stage_runs_in(raw, tmp_path):
    """Not against where the package is installed: a second clone, a worktree or DVC's temp workspace."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load(tmp_path / "params.yaml")
    assert params.root == tmp_path.resolve()
    assert params.prepared_dir == tmp_path.resolve() / "data" / "prepared"
    assert params.sources["cityscapes"] == tmp_path.resolve() / "data" / "sample" / "cityscapes"
    cfg = params.experiment(R50)
    assert cfg.location.storage_path == str(tmp_path.resolve() / "runs")
    assert cfg.location.data_dir == str(tmp_path.resolve() / "data" / "prepared" / "cityscapes")


# --- the registries agree with params.yaml and dvc.yaml -------------------------------------------

def test_declared_datasets_backbones_and_schedules_agree_with_params_and_dvc(raw, params):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # Every registered dataset has its source in params.yaml, hence a prepare@<name> stage (foreach).
    assert set(raw["data"]["datasets"]) == set(dataset_names())
    assert dvc["prepare"]["foreach"] == "${data.datasets}"
    for name in dataset_names():
        spec = get_dataset(name)
        assert len(spec.classes) == len(spec.palette) == spec.num_classes
        assert set(spec.splits) == {"train", "val"}
        assert (REPO / "components" / "learning" / "data" / "datasets" / f"{name}.py").is_file()   # prepare's dep
    # The table's backbones and schedules are exactly the declared ones, each used.
    assert {e.backbone for e in params.experiments.values()} == set(BACKBONES)
    assert {e.schedule for e in params.experiments.values()} == set(params.schedules)
    assert set(raw["train"]["pretrained"]) == set(BACKBONES)
    # Train / evaluate stages are generated from the experiments; the imported ones likewise.
    assert dvc["train"]["foreach"] == dvc["evaluate"]["foreach"] == "${experiments}"
    assert "schedules" in dvc["train"]["do"]["params"] and "schedules" in dvc["tune"]["params"]


def test_the_train_and_tune_stages_depend_on_one_code_folder():
    """What changes a run's result is one folder: train, train_tuned and tune list it as their only code
    dep in dvc.yaml, and the run identity hashes those deps (components/training/identity.py)."""
    from pipeline.config import code_deps

    assert code_deps("train") == code_deps("train_tuned") == code_deps("tune") == ("components/learning",)
    # so do the seeds' stages (one run per extra seed), and evaluate_seed evaluate's code
    assert code_deps("train_seed") == code_deps("train_tuned_seed") == code_deps("train")
    assert code_deps("evaluate_seed") == code_deps("evaluate")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert dvc["train_seed"]["matrix"] == dvc["evaluate_seed"]["matrix"] == {"experiment": "${experiments}",
                                                                             "seed": "${extra_seeds}"}


def _repo_imports(path) -> set[str]:
    """The repo modules (components.*, pipeline.*) a file imports, at any depth of its code."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("components", "pipeline")}


def test_the_learning_package_imports_nothing_of_the_repo_outside_itself():
    """So its folder is the whole of what changes a result: no orchestration (Ray start-up, MLflow,
    console lines, file shipping) and no params.yaml reading inside it, and nothing it needs outside it.
    Checked on the source (every import, also inside functions) and on what importing it loads."""
    import subprocess
    import sys

    from pipeline.config import CODE_ROOT

    package = CODE_ROOT / "components" / "learning"
    outside = {f"{path.relative_to(CODE_ROOT)}: {name}" for path in package.rglob("*.py")
               for name in _repo_imports(path) if not name.startswith("components.learning")}
    assert not outside, sorted(outside)
    modules = ", ".join(sorted(".".join(p.relative_to(CODE_ROOT).with_suffix("").parts)
                               for p in package.rglob("*.py") if p.name != "__init__.py"))
    probe = (f"import sys, {modules}; "
             "print('\\n'.join(sorted(m.__file__ for m in list(sys.modules.values()) "
             "if getattr(m, '__file__', None))))")
    files = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           cwd=REPO).stdout.split()
    ours = {f for f in files if f.startswith(str(CODE_ROOT)) and "/.venv" not in f}
    assert ours and not {f for f in ours if not f.startswith(str(package))} - {
        str(CODE_ROOT / "components" / "__init__.py")}
    assert not [f for f in files if "/site-packages/ray/" in f or "/site-packages/mlflow/" in f]   # no Ray, no MLflow


def test_the_cli_starts_without_torch_ray_or_mlflow():
    """The one place imports stay inside functions (pipeline/cli.py: each subcommand imports its stage):
    every DVC stage and `dnlseg show` start through the CLI, and importing all the stages would load
    torch, Ray and Ray Tune first (measured: 8.2 s against 1.6 s per start, on the 2-core CI machine)."""
    import subprocess
    import sys

    probe = ("import sys, pipeline.cli; "
             "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'matplotlib', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# Not prepare: its deps are its dataset's reader on purpose (pipeline/config and the rest of the learning
# code it imports do not decide what it writes, and re-preparing 25k images for a loop edit is waste).
@pytest.mark.parametrize("stage", ["weights", "evaluate", "report", "published"])
def test_code_deps_of_a_stage_exist_and_cover_what_it_imports(stage):
    """A stage's dvc.yaml code deps must exist and cover every module of this repo the stage imports, so
    that DVC reruns it when that code changes. Imports are at module top, so importing the stage's module
    loads all of it."""
    import subprocess
    import sys

    from pipeline.config import CODE_ROOT, code_deps

    deps = code_deps(stage)
    assert all((CODE_ROOT / d).exists() for d in deps)
    deps += ("pipeline/cli.py",)   # the CLI only dispatches (a dep of no stage)
    probe = (f"import sys, pipeline.cli, pipeline.{stage}; "
             "print('\\n'.join(sorted(m.__file__ for m in list(sys.modules.values()) "
             "if getattr(m, '__file__', None))))")
    files = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           cwd=REPO).stdout.split()
    package_inits = {str(CODE_ROOT / package / "__init__.py")   # docstrings only
                     for package in ("components", "pipeline", "components/training")}
    ours = {f for f in files if f.startswith(str(CODE_ROOT)) and "/.venv" not in f} - package_inits
    uncovered = sorted(f for f in ours if not any(f.startswith(str(CODE_ROOT / d)) for d in deps))
    assert not uncovered, f"stage {stage} imports code outside its dvc.yaml deps: {uncovered}"


# --- dnlseg show -----------------------------------------------------------------------------------

def test_show_json_is_the_whole_resolved_recipe_of_the_profile(capsys):
    from pipeline.cli import main

    assert main(["--params", str(REPO / "params.yaml"), "show", R50, "--profile", "reference", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    config = shown["config"]
    assert config["execution"]["num_workers"] == 4 and config["recipe"]["crop_size"] == [512, 1024]
    assert config["schedule"]["max_iters"] == 40000 and config["schedule"]["lr"] == 0.01
    assert config["execution"]["micro_batch_size"] is None and shown["evaluate"]["fps_images"] == 200
    # every field of the resolved config, nested as the config is
    assert config == parse(read_raw(REPO / "params.yaml"), REPO).experiment(R50, "reference").model_dump(mode="json")
    assert shown["stages"][:2] == [f"train@{R50}", f"evaluate@{R50}"] and "train_tuned" in shown["stages"]
    assert shown["outputs"]["model"] == str(REPO / "models" / R50 / "model.pt")
    # the reference profile starts from ImageNet weights: without their sha256 there is no identity yet
    assert shown["run_name"] is None and "dnlseg weights R-50-D8" in shown["run_name_unknown"]


def test_show_names_the_run_as_the_train_stage_would(make_params, tiny_data, tmp_path, capsys):
    from components.training.data_sync import manifest_hash
    from components.training.identity import code_hash, run_name
    from pipeline.cli import main
    from pipeline.config import CODE_ROOT, code_deps

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_params(tmp_path / "work")))
    assert main(["--params", str(tmp_path / "params.yaml"), "show", R50]) == 0
    text = capsys.readouterr().out
    cfg = load(tmp_path / "params.yaml").experiment(R50)
    name = run_name(cfg, manifest_hash(tiny_data / "cityscapes"), code_hash(CODE_ROOT, code_deps("train")))
    assert f"run name: {name}" in text and "lr: 0.01" in text and "tune, train_tuned" in text


@pytest.mark.parametrize("argv, message", [
    (["show", "dnl_nope"], "params.yaml: experiments: unknown experiment 'dnl_nope'"),
    (["show", R50, "--profile", "huge"], "params.yaml: profile: expected one of reference, sample, got 'huge'"),
])
def test_show_unknown_experiment_or_profile_is_one_line_exit_2(argv, message, capsys):
    from pipeline.cli import main

    assert main(["--params", str(REPO / "params.yaml"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dnlseg show: error: ") and message in lines[0]


def test_elastic_profile_batch_must_split_over_every_worker_count():
    """profiles.<p>.min_workers: Ray Train's elastic group may have any count from min to max workers, so
    the global batch (8 for Cityscapes, 16 for ADE20K) must split over each: 2..4 is refused (8 / 3), 1..2
    and 4..4 are taken; more than num_workers is refused. The elastic range reaches ScalingConfig."""
    from components.training.trainer import worker_count

    raw = read_raw(REPO / "params.yaml")
    raw["profiles"]["reference"]["min_workers"] = 2
    with pytest.raises(ConfigError, match=r"^params.yaml: profiles.reference.min_workers: experiment dnl_\S+: "
                                          r"batch_size: global batch 8 is not divisible by num_workers 3"):
        parse(raw, REPO)
    raw["profiles"]["reference"]["min_workers"] = 5
    with pytest.raises(ConfigError, match=r"^params.yaml: profiles.reference.min_workers: expected at most "
                                          r"num_workers \(4\), got 5"):
        parse(raw, REPO)
    raw["profiles"]["reference"].update(min_workers=1, num_workers=2)
    cfg = parse(raw, REPO).experiment("dnl_r50-d8_512x1024_40k_cityscapes", "reference")
    assert worker_count(cfg)["num_workers"] == (1, 2)
    raw["profiles"]["reference"].update(min_workers=2, num_workers=2)   # min = max: a fixed size
    assert worker_count(parse(raw, REPO).experiment("dnl_r50-d8_512x1024_40k_cityscapes", "reference")) == {
        "num_workers": 2}
