"""The report's verdict section: per row, did it reproduce? (pipeline/report.py puts it in the page.)

Per row of the table: the published mIoU, the released checkpoint evaluated here with the check of our
evaluation, ours as `mean ± std (n=k)` over the row's seeds, and the verdict
(components/evaluation/verdict.py); the same for ms+flip. A row is compared only under the published
run's protocol (the reference profile's evaluate settings on the whole official val split: one place,
`published_protocol`) and never on the generated sample data.
"""

from __future__ import annotations

from components.evaluation.protocol import KEYS, PUBLISHED_VAL_IMAGES, SINGLE_SCALE_KEYS, differences, protocol
from components.evaluation.table import format_markdown_table, number
from components.evaluation.verdict import (
    BAND_STANDARD_ERRORS,
    MIN_SEEDS_FOR_STD,
    PRIOR_STD,
    RELEASED_TOLERANCE,
    Spread,
    released_check,
    spread,
    verdict,
)
from pipeline.config import SAMPLE_DIR, Params, seeded_name

REFERENCE = "reference"   # the profile whose settings are the seed's (params.yaml)
COLUMNS = {"single_scale": ("mIoU", SINGLE_SCALE_KEYS), "ms_flip": ("mIoU(ms+flip)", None)}


def published_protocol(params: Params, experiment: str) -> dict:
    """How the published figure of `experiment` was measured: its row under the reference profile's
    evaluate settings, on the official val split, in fp32 (the seed's V100s)."""
    cfg, settings = params.experiment(experiment, REFERENCE), params.eval_settings(REFERENCE)
    return protocol(cfg.recipe, settings.ms_ratios, settings.flip,
                    PUBLISHED_VAL_IMAGES.get(cfg.recipe.dataset, 0), "fp32")


def on_generated_sample(params: Params, dataset: str) -> bool:
    """Whether the dataset's source is the `sample` stage's generated data."""
    sample = (params.root / SAMPLE_DIR).resolve()
    source = params.sources[dataset].resolve()
    return source == sample or sample in source.parents


def incomparable(evaluation: dict, reference: dict, keys) -> list[str]:
    """Why an eval.json's figure cannot be held against the published one ([]: it can)."""
    measured = evaluation.get("protocol")
    if measured is None:
        return ["eval.json records no protocol (rerun its evaluate stage)"]
    return differences(measured, reference, keys or KEYS)


def row_cells(params: Params, experiment: str, published: dict, evaluations: dict[str, dict]) -> list[str]:
    """The verdict table's cells of one row: per column, published, released, check, ours, verdict."""
    dataset = params.experiments[experiment].dataset
    reference = published_protocol(params, experiment)
    sample = ["generated sample data"] if on_generated_sample(params, dataset) else []
    seeds = [evaluations[run] for run in params.seeded_runs(experiment) if run in evaluations]
    released = [evaluations[n] for n, e in params.imported.items() if e.experiment == experiment and n in evaluations]
    cells = [experiment]
    for key, (column, keys) in COLUMNS.items():
        pub = number(published.get(column, "-"))
        rel = released[0] if released else None
        rel_value = rel[key]["mIoU"] if rel else None
        rel_why = sample or (incomparable(rel, reference, keys) if rel else [])
        values = [ev[key]["mIoU"] for ev in seeds if ev[key]["mIoU"] is not None]
        ours = spread(values, PRIOR_STD.get(dataset, 1.0)) if values else None
        why = sample or sorted({reason for ev in seeds for reason in incomparable(ev, reference, keys)})
        cells += [_fmt(pub), _fmt(rel_value), released_check(pub, rel_value, rel_why) if rel else "-",
                  ours.text() if ours else "-", verdict(pub, ours, why) if ours else "-"]
    return cells


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def verdict_lines(params: Params, rows: dict, names: list[str], evaluations: dict[str, dict]) -> list[str]:
    """The section: the table (one line per experiment of the dataset), then the rule it applies."""
    header = ["row"] + [f"{column} {part}" for column, _ in COLUMNS.values()
                               for part in ("published", "released", "released check", "ours", "verdict")]
    table = [row_cells(params, name, rows[name].cells if name in rows else {}, evaluations)
             for name in names if name in params.experiments]
    return ["### Did it reproduce?", "",
            format_markdown_table(header, table, {h: "right" for h in header[1:] if "verdict" not in h
                                                  and "check" not in h}), "", RULE.format(
                k=BAND_STANDARD_ERRORS, n=MIN_SEEDS_FOR_STD, tol=RELEASED_TOLERANCE,
                priors=", ".join(f"{d} {s}" for d, s in PRIOR_STD.items())), ""]


RULE = ("Rule: ours is the mean over the row's seeds (train.seed and extra_seeds) ± their standard deviation "
        "(n − 1), taken from the seeds when n ≥ {n} and otherwise the dataset's prior run-to-run standard "
        "deviation ({priors} mIoU, the upper end of what users measured retraining these rows). "
        "`reproduced`: the published value lies "
        "within ours ± {k:g} standard errors (std / √n), edges included; `below` / `above`: ours is lower / "
        "higher than that. `not comparable: ...`: measured under another protocol than the published run "
        "(the reference profile's evaluate settings on the official val split; the setting that differs is "
        "named) or on the generated sample data: no verdict. `released check`: the released checkpoint "
        "evaluated here must be within {tol:g} mIoU of the published value, else our evaluation differs "
        "from the published one.")


def tuned_spread(records: list[dict | None], dataset: str) -> Spread | None:
    """mean ± std of the final mIoU of training runs (train.json); None when none has finished."""
    values = [r["final"]["mIoU"] for r in records if r is not None]
    return spread(values, PRIOR_STD.get(dataset, 1.0)) if values else None


def tuned_line(params: Params, read_train_record) -> list[str]:
    """The sweep's schedule retrained with the row's seeds, against the untuned row, as mean ± std."""
    name = params.tune.experiment
    dataset = params.experiments[name].dataset
    tuned = tuned_spread([read_train_record(seeded_name(f"{name}-tuned", s, params.train.seed))
                          for s in params.seeds], dataset)
    if tuned is None:
        return []
    untuned = tuned_spread([read_train_record(run) for run in params.seeded_runs(name)], dataset)
    before = untuned.text() if untuned else "-"
    gap = f"; difference of the means {tuned.mean - untuned.mean:+.2f}" if untuned else ""
    return [f"Tuned: `{name}-tuned`, trained on the schedule the sweep found (`tune/{name}/best_params.yaml`) "
            f"with the row's seeds: final val mIoU {tuned.text()}; `{name}` on params.yaml's schedule: {before}"
            f"{gap} (training's own single-scale evaluation).", ""]
