"""`dnlseg`: the stages' command line. Each subcommand reads params.yaml and runs one stage.

Heavy imports (torch, ray, mlflow) happen inside the subcommands so `dnlseg --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.learning.backbones import BACKBONES
from components.learning.data.datasets import dataset_names
from pipeline.config import ConfigError, Params, load

# albumentations otherwise calls out to the network at import to look for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _sample(args, params: Params) -> None:
    from components.sample import SAMPLE_DATASETS, generate_sample

    sizes = params.sample.sizes()
    if set(sizes) != set(SAMPLE_DATASETS):
        raise ConfigError(f"params.yaml: sample: expected an entry for each of {', '.join(SAMPLE_DATASETS)} "
                          f"(the datasets components/sample generates), got {', '.join(sizes) or 'none'}")
    generate_sample(Path(args.out), seed=params.sample.seed, archives=args.archives,
                    **sizes)


def _prepare(args, params: Params) -> None:
    from pipeline.prepare import prepare_dataset

    if args.dataset not in params.sources:
        raise ConfigError(f"params.yaml: data.datasets: no entry for {args.dataset!r} "
                          f"(has: {', '.join(params.sources)})")
    prepare_dataset(args.dataset, params.sources[args.dataset], params.prepared_dir / args.dataset,
                    params.root / "metrics" / "data" / f"{args.dataset}.json", workers=params.data.prepare_workers or 0)


def _weights(args, params: Params) -> None:
    from pipeline.weights import fetch_weights

    fetch_weights(params, args.backbone)


def _published(args, params: Params) -> None:
    from pipeline.published import fetch_published

    if args.experiment not in params.experiments:
        raise ConfigError(f"params.yaml: experiments: no experiment {args.experiment!r} "
                          f"(known: {', '.join(sorted(params.experiments))})")
    fetch_published(params, args.experiment, refresh=args.refresh)


def _train(args, params: Params) -> None:
    from pipeline.train import train_experiment

    train_experiment(params, args.experiment, tuned=args.tuned, seed=args.seed)


def _tune(args, params: Params) -> None:
    from pipeline.tune import tune_experiment

    tune_experiment(params, args.experiment)


def _evaluate(args, params: Params) -> None:
    from pipeline.evaluate import evaluate_experiment

    evaluate_experiment(params, args.experiment, seed=args.seed)


def _report(args, params: Params) -> None:
    from pipeline.report import write_report

    print(write_report(params))


def _predict(args, params: Params) -> None:
    from pipeline.predict import predict

    for path in predict(params, [Path(p) for p in args.inputs], Path(args.out), args.model,
                        experiment=args.experiment):
        print(path)


def _show(args, params: Params) -> None:
    from pipeline.show import show

    print(show(params, args.experiment, args.profile, as_json=args.json))


def _with_ray(args, params: Params) -> int:
    from components.ray_cluster import run_with_local_ray

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ValueError("no command given (e.g. `dnlseg with-ray -- dvc repro`)")
    return run_with_local_ray(command)


def _repro(args, params: Params) -> int:
    from pipeline.repro import repro

    return repro(params, args.targets, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    """`dnlseg`'s options, then one subcommand per stage (each runs its function from above)."""
    parser = argparse.ArgumentParser(prog="dnlseg", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: ./params.yaml; DVC runs every "
                        "stage from the repo root)")
    parser.add_argument("--root", default=None, help="the repo whose outputs the stage writes (default: the "
                        "params file's folder)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_result_commands(sub)
    _add_orchestration_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """sample, prepare, weights, published: the inputs."""
    p = sub.add_parser("sample", help="generate the sample Cityscapes and ADE20K in the official formats")
    p.add_argument("--out", default="data/sample")
    p.add_argument("--archives", action="store_true", help="also write the official zip archives")
    p.set_defaults(func=_sample)

    p = sub.add_parser("prepare", help="prepare a dataset (labels, manifests, stats) from its official files")
    p.add_argument("dataset", choices=dataset_names())
    p.set_defaults(func=_prepare)

    p = sub.add_parser("weights", help="fetch and check a backbone's pretrained weights (train.pretrained)")
    p.add_argument("backbone", choices=list(BACKBONES))
    p.set_defaults(func=_weights)

    p = sub.add_parser("published", help="fetch and read an experiment's published training log "
                       "(experiments.<exp>.published_log), log it to MLflow as `<exp> (published)`")
    p.add_argument("experiment")
    p.add_argument("--refresh", action="store_true", help="ask the server again instead of using the cached copy")
    p.set_defaults(func=_published)


def _add_training_commands(sub) -> None:
    """train, tune, evaluate, show: one experiment each."""
    p = sub.add_parser("train", help="train one experiment of params.yaml on Ray")
    p.add_argument("experiment")
    p.add_argument("--tuned", action="store_true", help="on the schedule `dnlseg tune` found for it "
                   "(tune/<experiment>/best_params.yaml), as <experiment>-tuned")
    _add_seed_option(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("tune", help="sweep an experiment's schedule with Ray Tune (ASHA)")
    p.add_argument("experiment")
    p.set_defaults(func=_tune)

    p = sub.add_parser("evaluate", help="single-scale and ms+flip evaluation of a trained experiment")
    p.add_argument("experiment")
    _add_seed_option(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("show", help="an experiment's resolved settings, run name, DVC stages and outputs")
    p.add_argument("experiment")
    p.add_argument("--profile", default=None, help="a profile of params.yaml (default: its `profile`)")
    p.add_argument("--json", action="store_true", help="machine-readable: the whole resolved config, nested")
    p.set_defaults(func=_show)


def _add_seed_option(parser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="one of params.yaml's extra_seeds: the run "
                        "<experiment>-s<seed> (default: train.seed, the run <experiment>)")


def _add_result_commands(sub) -> None:
    """report, predict: what the trained models give."""
    p = sub.add_parser("report", help="reports/results.md + .html beside the published numbers; register champions")
    p.set_defaults(func=_report)

    p = sub.add_parser("predict", help="label PNGs and colour overlays for images (files or folders)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", required=True,
                   help="models:/<name>@champion, runs:/<run_id>, or a checkpoint .pth/.pt file")
    p.add_argument("--out", default="predictions")
    p.add_argument("--experiment", default=None,
                   help="experiment whose test settings to use (default: the one recorded with the model)")
    p.set_defaults(func=_predict)


def _add_orchestration_commands(sub) -> None:
    """repro, with-ray: the whole pipeline on one Ray cluster."""
    p = sub.add_parser("repro", help="`dvc repro` with independent stages at once on one Ray cluster")
    p.add_argument("targets", nargs="*", help="stages (default: the whole pipeline), as `dvc repro` takes them")
    p.add_argument("--jobs", "-j", default="auto", help="stages at once: a number, or auto (the training "
                   "runs the Ray cluster holds at once, plus one; default)")
    p.set_defaults(func=_repro)

    p = sub.add_parser("with-ray", help="run a command (`-- dvc repro`) with one local Ray its stages share")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=_with_ray)


def main(argv: list[str] | None = None) -> int:
    from components.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        params = load(args.params, args.root)   # the whole file is checked before any stage works
        status = args.func(args, params)
    # ConfigError, DataError, PreflightError are ValueErrors; a NaN stop is a FloatingPointError.
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError, StorageError) as e:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"dnlseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
