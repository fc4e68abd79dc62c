"""Stage `report`: the results table next to the published one, and the champion model per dataset.

Reads metrics/<name>/eval.json of every experiment and imported checkpoint, and writes
    reports/results.md    per dataset: the seed's table (same columns, same format) with this pipeline's
                          numbers and links to the MLflow runs; published vs ours with the differences
    reports/results.html  the same page in HTML
The best evaluated run per dataset (single-scale mIoU) is registered in the MLflow model registry as
`report.model_name` with the alias `champion`.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from urllib.parse import quote

from markdown_it import MarkdownIt
from mlflow.tracking import MlflowClient

from components.atomic import atomic_write_text
from components.console import warn
from components.evaluation.registry import CHAMPION, register_champion
from components.evaluation.table import (
    ALIGN,
    COLUMNS,
    difference,
    format_markdown_table,
    number,
    parse_seed_table,
)
from components.learning.data import get_dataset
from components.published_log import recorded_curve
from pipeline.config import Params, eval_metrics_file, model_file, published_record, train_metrics_file
from pipeline.report_verdict import tuned_line, verdict_lines

NUMERIC = re.compile(r"[-+]?\d+(\.\d+)?|-")   # table cells right-aligned in the HTML page
COMPARED = ("mIoU", "mIoU(ms+flip)", "Mem (GB)", "Inf time (fps)")   # published vs ours, with the difference


# --- MLflow links -----------------------------------------------------------------------------------

def ui_base(params: Params) -> str:
    """Where the MLflow UI of the tracking store is served, without a user:password."""
    return re.sub(r"//[^/@]*@", "//", params.tracking_ui.rstrip("/"))   # never a user:password in a link


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_url(base: str, runs: list[tuple[str, str]]) -> str:
    """The UI's side-by-side comparison of (experiment_id, run_id) pairs."""
    run_ids = json.dumps([r for _, r in runs], separators=(",", ":"))
    experiment_ids = json.dumps(sorted({e for e, _ in runs}), separators=(",", ":"))
    return (f"{base}/#/compare-runs?runs={quote(run_ids, safe='')}"
            f"&experiments={quote(experiment_ids, safe='')}")


# --- numbers ----------------------------------------------------------------------------------------

def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def our_cells(evaluation: dict | None, published_method: str, backbone: str) -> dict:
    """The seed's eight columns for one evaluation (as strings, in the seed's precision)."""
    if evaluation is None:
        return dict.fromkeys(COLUMNS, "-") | {"Method": published_method, "Backbone": backbone}
    trained = evaluation.get("train") or {}
    crop = trained.get("crop_size")
    memory = evaluation.get("train_memory") or {}
    speed = evaluation.get("speed") or {}
    return {
        "Method": published_method,
        "Backbone": evaluation.get("backbone", backbone),
        "Crop Size": f"{crop[0]}x{crop[1]}" if crop else "-",
        "Lr schd": str(trained.get("max_iters", "-")),
        "Mem (GB)": _fmt(memory.get("peak_gb"), 1),
        "Inf time (fps)": _fmt(speed.get("fps"), 2),
        "mIoU": _fmt(evaluation["single_scale"]["mIoU"], 2),
        "mIoU(ms+flip)": _fmt(evaluation["ms_flip"]["mIoU"], 2),
    }


def load_evaluations(params: Params, out_root: Path) -> dict[str, dict]:
    found = {}
    for name in params.evaluation_names():
        path = eval_metrics_file(out_root, name)
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
    return found


# --- the registry -----------------------------------------------------------------------------------

def register_champions(params: Params, evaluations: dict[str, dict]) -> dict[str, dict]:
    """Per dataset, the evaluation with the best single-scale mIoU that has an MLflow run: registered, alias
    champion. Returns {dataset: {name, version, model, run_id, mIoU}}; MLflow failures are warnings."""

    champions = {}
    by_dataset: dict[str, list[tuple[str, dict]]] = {}
    for name, ev in evaluations.items():
        if (ev.get("mlflow") or {}).get("run_id") and ev["single_scale"]["mIoU"] is not None:
            by_dataset.setdefault(ev["dataset"], []).append((name, ev))
    client = MlflowClient(tracking_uri=params.tracking_uri)
    for dataset, candidates in sorted(by_dataset.items()):
        name, ev = max(candidates, key=lambda item: item[1]["single_scale"]["mIoU"])
        model, miou = params.report.model_name.format(dataset=dataset), ev["single_scale"]["mIoU"]
        try:
            checkpoint = Path(ev["checkpoint"]) if ev.get("imported") else model_file(params.root, name)
            version, created = register_champion(
                client, model, ev["mlflow"]["run_id"], checkpoint,
                tags={"experiment": name, "mIoU": miou, "profile": ev.get("profile", "")},
                description=f"DNLNet on {get_dataset(dataset).title}; {CHAMPION}: best val mIoU")
        except Exception as e:  # noqa: BLE001 - the report is still written
            warn(f"[report] warning: registering {model} failed "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        champions[dataset] = {"name": name, "version": version, "model": model, "created": created,
                              "run_id": ev["mlflow"]["run_id"], "mIoU": miou}
        print(f"[report] {model}@{CHAMPION} -> version {version} ({name}, mIoU {miou:.2f})", flush=True)
    return champions


# --- the page ---------------------------------------------------------------------------------------

def build_markdown(params: Params, evaluations: dict[str, dict], champions: dict[str, dict],
                   out_root: Path | None = None) -> str:
    """The page; `out_root` (default: the repo) holds metrics/<name>/{eval,train}.json."""
    published = parse_seed_table()
    out_root = Path(out_root or params.root)
    profile = params.profile
    lines = ["# DNLNet results", ""]
    lines += [f"Profile `{profile}`. Published numbers: mmseg's DNLNet table (verbatim copy in "
              f"`components/evaluation/seed_dnlnet_results.md`); ours: `metrics/<experiment>/eval.json` "
              f"(val split; mIoU single scale and ms+flip).", ""]
    lines += [_published_line(params, out_root), ""]
    if profile != "reference":
        lines += [f"**Profile `{profile}` runs shortened schedules on small inputs (the generated sample "
                  f"data unless data sources point at the real datasets): these numbers check the pipeline, "
                  f"they are not comparable with the published ones.**", ""]
    for dataset in params.sources:   # in params.yaml's order
        rows = [r for r in published if r.dataset == dataset]
        names = _names_of(params, dataset)
        if rows or names:
            lines += _dataset_lines(params, dataset, {r.config: r for r in rows}, names, evaluations,
                                    champions, out_root)
    return "\n".join(lines).rstrip() + "\n"


def _published_line(params: Params, out_root: Path) -> str:
    """Which rows have a published training curve beside ours (stage published@<exp>)."""
    with_curve = [n for n in params.experiments if recorded_curve(published_record(out_root, n)) is not None]
    if not with_curve:
        return (f"Published training curves: none under profile `{params.profile}` (no network here, as for "
                f"the ImageNet weights: a choice; `experiments.<exp>.published_log` names one).")
    return (f"Published training curves: {len(with_curve)} of {len(params.experiments)} rows "
            f"(`published/<exp>.json`, `plots/<exp>/published.csv`, MLflow runs `<exp> (published)`).")


def _names_of(params: Params, dataset: str) -> list[str]:
    """The dataset's experiments (each with its seeds' runs), then its imported checkpoints, in params.yaml's
    order."""
    experiments = params.experiments
    names = [run for n, e in experiments.items() if e.dataset == dataset for run in params.seeded_runs(n)]
    return names + [n for n, e in params.imported.items() if experiments[e.experiment].dataset == dataset]


def _dataset_lines(params: Params, dataset: str, seed_of: dict, names: list[str], evaluations: dict[str, dict],
                   champions: dict[str, dict], out_root: Path) -> list[str]:
    """One dataset's section: our table, published vs released vs ours, links, champion, how measured."""
    base = ui_base(params)
    ours_rows, run_links, measured, cells = _our_rows(params, seed_of, names, evaluations, base, out_root)
    lines = [f"## {get_dataset(dataset).title}", ""]
    lines += ["### This pipeline", ""]
    lines += [format_markdown_table(list(COLUMNS) + ["experiment", "MLflow"], ours_rows, ALIGN), ""]
    lines += ["### Published, the released checkpoint evaluated here, and our run (diff = ours − published)",
              ""]
    header = ["experiment"] + [f"{col} {which}" for col in COMPARED
                               for which in ("published", "released", "ours", "diff")]
    compare_rows = _compare_rows(params, seed_of, names, cells)
    lines += [format_markdown_table(header, compare_rows, {h: "right" for h in header[1:]}), ""]
    lines += verdict_lines(params, seed_of, names, evaluations)
    if run_links:
        runs = f"{len(run_links)} run{'s' if len(run_links) != 1 else ''}"
        lines += [f"Compare these runs side by side in MLflow: [{runs}]({compare_url(base, run_links)})",
                  ""]
    if dataset in champions:
        c = champions[dataset]
        lines += [f"Champion: `models:/{c['model']}@champion` = version {c['version']} ({c['name']}, "
                  f"mIoU {c['mIoU']:.2f}).", ""]
    if measured:
        lines += ["Measured on:", "", *measured, ""]
    return lines + _tuned_lines(params, dataset, out_root)


def _our_rows(params: Params, seed_of: dict, names: list[str], evaluations: dict[str, dict], base: str,
              out_root: Path) -> tuple[list[list[str]], list[tuple[str, str]], list[str], dict[str, dict]]:
    """Per evaluation: its table row (with its MLflow link), its run, its measured-on line, its cells."""
    ours_rows, run_links, measured, cells = [], [], [], {}
    for name in names:
        config = params.imported[name].experiment if name in params.imported else _experiment_of(params, name)
        seed = seed_of.get(config)
        ev = evaluations.get(name)
        cells[name] = ours = our_cells(ev, seed["Method"] if seed else "dnl", params.experiments[config].backbone)
        run = (ev or {}).get("mlflow") or {}
        link = "-"
        if run.get("run_id"):
            link = f"[run]({run_url(base, run['experiment_id'], run['run_id'])})"
            run_links.append((run["experiment_id"], run["run_id"]))
        trained = _train_record(out_root, name)
        ours_rows.append([ours[c] for c in COLUMNS] + [name + resized_mark(trained), link])
        if ev:
            measured.append(_measured_line(name, ev, trained))
    return ours_rows, run_links, measured, cells


def _experiment_of(params: Params, run: str) -> str:
    """The experiment a run of the table belongs to (`<exp>` or `<exp>-s<seed>`)."""
    return next(name for name in params.experiments if run in params.seeded_runs(name))


def _compare_rows(params: Params, seed_of: dict, names: list[str], cells: dict[str, dict]) -> list[list[str]]:
    """Per row of the table: published, the released checkpoint evaluated here, our own run (train.seed's),
    the difference."""
    rows = []
    for config in (n for n in names if n in params.experiments):
        released = [n for n, e in params.imported.items() if e.experiment == config]
        pub = seed_of[config].cells if config in seed_of else dict.fromkeys(COLUMNS, "-")
        rel = cells[released[0]] if released else dict.fromkeys(COLUMNS, "-")
        ours = cells[config]
        rows.append([config] + [cell for column in COMPARED for cell in (
            pub[column], rel[column], ours[column], difference(number(ours[column]), number(pub[column])))])
    return rows


def _tuned_lines(params: Params, dataset: str, out_root: Path) -> list[str]:
    """The train_tuned stages' runs (one per seed) beside the untuned row's, as mean ± std of training's
    own final evaluation."""
    if params.tune.experiment is None or params.experiments[params.tune.experiment].dataset != dataset:
        return []
    return tuned_line(params, lambda run: _train_record(out_root, run))


def _train_record(out_root: Path, name: str) -> dict | None:
    path = train_metrics_file(out_root, name)
    return json.loads(path.read_text()) if path.is_file() else None


def resized_mark(trained: dict | None) -> str:
    """` (workers 2→1→2)` for a run whose worker count changed (an elastic run that lost or regained a
    node: same global batch, but the speed and the run's history differ), else nothing."""
    counts = [n for _, n in (trained or {}).get("world_sizes") or []]
    return f" (workers {'→'.join(map(str, counts))})" if len(set(counts)) > 1 else ""


def _measured_line(name: str, ev: dict, trained: dict | None) -> str:
    parts = []
    if ev.get("imported"):
        parts.append(f"released checkpoint {ev['checkpoint']}")
    elif trained:   # the table's model is the final one; the best validation figure is only shown
        parts.append(f"final model (iteration {trained['final']['iteration']}, {trained.get('precision', '?')}, "
                     f"init {trained.get('pretrained', '?')}); best val mIoU during training "
                     f"{trained['best_val']['mIoU']:.2f} at iteration {trained['best_val']['iteration']} "
                     f"(not the table's figure)")
        if trained.get("behind_published"):
            b = trained["behind_published"]
            parts.append(f"behind the published curve since iteration {b['since']} ({b['gap']:.2f} mIoU behind "
                         f"at iteration {b['iteration']}, noise band {b['band']:.2f})")
    parts += [f"eval {ev['device']}, {ev['dtype']}, {ev['images']} val images, {ev['test']['mode']} at scale "
             f"{ev['test']['scale']}, ms+flip ratios {ev['ms_flip']['ratios']} flip {ev['ms_flip']['flip']}"]
    if ev.get("speed"):
        s = ev["speed"]
        parts.append(f"fps {s['device']}, {s['dtype']}, batch 1, {s['images']} images "
                     f"({s['warmup']} warm-up)")
    if ev.get("train_memory"):
        m = ev["train_memory"]
        parts.append(f"Mem {m.get('measure', '?')} ({m.get('device', '?')}, {m.get('dtype', '?')})")
    plots = f"../plots/{name}"
    pictures = (f"[per-class IoU]({plots}/per_class_iou.png), [confusion]({plots}/confusion.png), "
                f"[overlays]({plots}/overlays/)")
    return f"- `{name}`: " + "; ".join(parts) + f". Pictures: {pictures}"


def markdown_to_html(text: str, title: str = "DNLNet results") -> str:
    """The page in HTML: CommonMark with pipe tables (markdown-it-py), raw HTML in the text escaped, not
    passed through; number cells right-aligned."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.core.ruler.push("numeric_cells", _mark_numeric_cells)
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n")
    return head + md.render(text) + "</body>\n</html>\n"


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:110em}"
              "table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}"
              "td.num{text-align:right;white-space:nowrap}code{background:#f3f3f3;padding:0 .2em}")


def _mark_numeric_cells(state) -> None:
    """class="num" on every table cell holding a number or '-' (markdown-it core rule)."""
    tokens = state.tokens
    for i, token in enumerate(tokens[:-1]):
        if token.type == "td_open" and NUMERIC.fullmatch(tokens[i + 1].content.strip()):
            token.attrSet("class", "num")


def write_report(params: Params, *, out_root: Path | str | None = None) -> Path:
    """reports/results.md and reports/results.html; registers the champions first. Returns the .md path."""
    out_root = Path(out_root or params.root)
    evaluations = load_evaluations(params, out_root)
    champions = register_champions(params, evaluations) if params.report.register else {}
    text = build_markdown(params, evaluations, champions, out_root)
    md = out_root / "reports" / "results.md"
    atomic_write_text(md, text)
    atomic_write_text(md.with_suffix(".html"), markdown_to_html(text))
    print(f"[report] {len(evaluations)} evaluations -> {md} and {md.with_suffix('.html').name}", flush=True)
    return md
