"""`dnlseg`: the stages' command line. Each subcommand reads params.yaml and runs one stage.

Heavy imports (torch, ray, mlflow) happen inside the subcommands so `dnlseg --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# albumentations otherwise calls out to the network at import to look for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _sample(args, params) -> None:
    from pipeline.prepare import generate_sample

    sample = params["sample"]
    generate_sample(Path(args.out), seed=sample["seed"], cityscapes=sample["cityscapes"], ade20k=sample["ade20k"],
                    archives=args.archives)


def _prepare(args, params) -> None:
    from pipeline.config import REPO_ROOT
    from pipeline.prepare import prepare_dataset

    data = params["data"]
    source = Path(data[args.dataset]["source"])
    out_dir = Path(data["prepared_dir"]) / args.dataset
    stats = Path("metrics/data") / f"{args.dataset}.json"
    root = lambda p: p if p.is_absolute() else REPO_ROOT / p  # noqa: E731
    prepare_dataset(args.dataset, root(source), root(out_dir), root(stats), workers=data.get("prepare_workers", 0))


def _train(args, params) -> None:
    from pipeline.train import train_experiment

    train_experiment(params, args.experiment)


def _tune(args, params) -> None:
    from pipeline.tune import tune_experiment

    tune_experiment(params, args.experiment)


def _evaluate(args, params) -> None:
    from pipeline.evaluate import evaluate_experiment

    evaluate_experiment(params, args.experiment)


def _report(args, params) -> None:
    from pipeline.report import write_report

    print(write_report(params))


def _predict(args, params) -> None:
    from pipeline.predict import predict

    for path in predict(params, [Path(p) for p in args.inputs], Path(args.out), args.model,
                        experiment=args.experiment):
        print(path)


def _with_ray(args, params) -> int:
    from pipeline.train import run_with_local_ray

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ValueError("no command given (e.g. `dnlseg with-ray -- dvc repro`)")
    return run_with_local_ray(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnlseg", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: the repo's params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate the sample Cityscapes and ADE20K in the official formats")
    p.add_argument("--out", default="data/sample")
    p.add_argument("--archives", action="store_true", help="also write the official zip archives")
    p.set_defaults(func=_sample)

    p = sub.add_parser("prepare", help="prepare a dataset (labels, manifests, stats) from its official files")
    p.add_argument("dataset", choices=["cityscapes", "ade20k"])
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one experiment of params.yaml on Ray")
    p.add_argument("experiment")
    p.set_defaults(func=_train)

    p = sub.add_parser("tune", help="sweep an experiment's schedule with Ray Tune (ASHA)")
    p.add_argument("experiment")
    p.set_defaults(func=_tune)

    p = sub.add_parser("evaluate", help="single-scale and ms+flip evaluation of a trained experiment")
    p.add_argument("experiment")
    p.set_defaults(func=_evaluate)

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

    p = sub.add_parser("with-ray", help="run a command (`-- dvc repro`) with one local Ray its stages share")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=_with_ray)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import DEFAULT_PARAMS, ConfigError, load_params

    args = build_parser().parse_args(argv)
    from components.storage import StorageError

    try:
        params = load_params(args.params or DEFAULT_PARAMS)
        status = args.func(args, params)
    # ConfigError, DataError, PreflightError are ValueErrors; a NaN stop is a FloatingPointError.
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError, StorageError) as e:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"dnlseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
