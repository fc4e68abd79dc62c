"""The published runs' training logs (the seed table's `…log.json`), read as mmcv 1.x wrote them.

mmcv 1.x's TextLoggerHook writes one JSON object per line (../docs/pipeline.md, "The published runs"):
- a meta line (no `mode`): env_info, seed, exp_name, mmseg_version, the whole config as text;
- train lines every 50 iterations: iter, lr, memory (MiB), decode.loss_seg, aux.loss_seg, loss, time
  (later mmseg versions say `loss_ce` for `loss_seg`);
- val lines: aAcc / mIoU / mAcc as FRACTIONS, and an `iter` that is the val loop's count (the number
  of val images), not the training iteration: the training iteration is the preceding train line's,
  rounded up to the evaluation interval the config states.
A resumed run may repeat a range of iterations (the last one is kept), a crashed run's log ends early.

`parse_log` turns that into our curve, under OUR metric names and units (the training loop's, MLflow's):
train rows {iteration, loss, decode_loss, aux_loss, lr, memory_gb} and val rows {iteration, mIoU, mAcc,
aAcc} in percent. A malformed or truncated line is one warning (file and line number) and is skipped:
a published log is a reference, never a reason to fail the pipeline.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_COLUMNS = ("iteration", "loss", "decode_loss", "aux_loss", "lr", "memory_gb")
VAL_COLUMNS = ("iteration", "mIoU", "mAcc", "aAcc")
# ours <- mmcv's keys, in the order tried (mmseg renamed loss_seg to loss_ce after v0.x)
_TRAIN_KEYS = {"loss": ("loss",), "decode_loss": ("decode.loss_seg", "decode.loss_ce"),
               "aux_loss": ("aux.loss_seg", "aux.loss_ce"), "lr": ("lr",)}
_META_KEYS = ("exp_name", "seed", "mmseg_version")
# mmseg 0.x configs: `evaluation = dict(interval=4000, metric='mIoU')`, `runner = dict(..., max_iters=40000)`
# (v0.5: `total_iters = 40000`)
_EVAL_INTERVAL = re.compile(r"evaluation\s*=\s*dict\([^)]*?\binterval\s*=\s*(\d+)")
_MAX_ITERS = re.compile(r"\b(?:max_iters|total_iters)\s*=\s*(\d+)")


@dataclass
class PublishedCurve:
    """A published run's curve in our names and units."""

    train: list[dict] = field(default_factory=list)     # TRAIN_COLUMNS, by iteration
    val: list[dict] = field(default_factory=list)       # VAL_COLUMNS, percent, by training iteration
    meta: dict = field(default_factory=dict)            # exp_name, seed, mmseg_version, gpus, ...
    warnings: list[str] = field(default_factory=list)   # one line each, naming the file and line

    @property
    def last_iteration(self) -> int:
        return max((row["iteration"] for row in self.train + self.val), default=0)

    def to_json(self) -> dict:
        return {"meta": self.meta, "train": self.train, "val": self.val, "warnings": self.warnings}

    @classmethod
    def from_json(cls, data: dict) -> PublishedCurve:
        return cls(train=list(data.get("train", [])), val=list(data.get("val", [])),
                   meta=dict(data.get("meta", {})), warnings=list(data.get("warnings", [])))


def _number(value) -> float | None:
    """A finite number, else None (mmcv writes NaN for a diverged loss; lr may be a dict per group)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _first(line: dict, keys: tuple[str, ...]) -> float | None:
    return next((_number(line[k]) for k in keys if k in line), None)


def _meta(line: dict) -> dict:
    meta = {k: line[k] for k in _META_KEYS if isinstance(line.get(k), (str, int, float))}
    gpus = [row.strip() for row in str(line.get("env_info", "")).splitlines() if row.strip().startswith("GPU")]
    if gpus:
        meta["gpus"] = "; ".join(gpus)
    config = str(line.get("config", ""))
    for key, pattern in (("eval_interval", _EVAL_INTERVAL), ("max_iters", _MAX_ITERS)):
        if found := pattern.search(config):
            meta[key] = int(found[1])
    return meta


def _train_row(line: dict, iteration: int) -> dict:
    row = {"iteration": iteration, **{ours: _first(line, keys) for ours, keys in _TRAIN_KEYS.items()}}
    memory_mib = _number(line.get("memory"))
    row["memory_gb"] = None if memory_mib is None else memory_mib / 1024   # mmcv: max_memory_allocated / 2**20
    return row


def _val_row(line: dict, iteration: int) -> dict:
    def percent(key):
        value = _number(line.get(key))
        return None if value is None else round(100 * value, 6)   # round: 0.7861 * 100 -> 78.61, not ...01

    return {"iteration": iteration, **{k: percent(k) for k in VAL_COLUMNS[1:]}}


def _val_iteration(last_train: int, interval: int | None) -> int:
    """The training iteration an evaluation ran at: the next multiple of the interval from the last train
    line (mmcv logs train lines every 50, so the line at the evaluation's iteration usually precedes it)."""
    return -(-last_train // interval) * interval if interval else last_train


class _Reader:
    """One pass over the lines; `curve` collects rows, a repeated range replaces what it repeats."""

    def __init__(self, name: str):
        self.name, self.curve, self.last_train = name, PublishedCurve(), 0

    def warn(self, number: int, what: str) -> None:
        self.curve.warnings.append(f"published log: {self.name}: line {number}: {what}; skipped")

    def line(self, number: int, line: dict) -> None:
        mode = line.get("mode")
        if mode is None:
            if not self.curve.meta:   # a resumed run appended to the file writes a second one: the first holds
                self.curve.meta = _meta(line)
            return
        iteration = line.get("iter")
        if mode not in ("train", "val") or isinstance(iteration, bool) or not isinstance(iteration, int):
            self.warn(number, f"expected mode train or val with an integer iter, got mode {mode!r}, iter {iteration!r}")
        elif mode == "train":
            self.train(iteration, line)
        elif self.last_train == 0:
            self.warn(number, "a val line before any train line (its training iteration is unknown)")
        else:
            self.curve.val.append(_val_row(line, _val_iteration(self.last_train, self.curve.meta.get("eval_interval"))))

    def train(self, iteration: int, line: dict) -> None:
        if iteration <= self.last_train:   # a resumed run repeats from its checkpoint: keep the later range
            self.curve.train = [r for r in self.curve.train if r["iteration"] < iteration]
            self.curve.val = [r for r in self.curve.val if r["iteration"] < iteration]
        self.curve.train.append(_train_row(line, iteration))
        self.last_train = iteration


def parse_log(text: str, name: str) -> PublishedCurve:
    """The curve of an mmcv 1.x JSON-lines log; `name` (the file or URL) names it in the warnings."""
    reader = _Reader(name)
    lines = text.split("\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            cut = number == len(lines) and not text.endswith("\n")
            reader.warn(number, "truncated (the file ends inside this line)" if cut else f"not JSON ({e})")
            continue
        if not isinstance(line, dict):
            reader.warn(number, f"expected a JSON object, got {type(line).__name__}")
            continue
        reader.line(number, line)
    return reader.curve


def ended_early(curve: PublishedCurve) -> str | None:
    """A note when the log stops before the run's max_iters (a crashed or cut run), else None."""
    planned = curve.meta.get("max_iters")
    if planned and curve.last_iteration < planned:
        return f"ends at iteration {curve.last_iteration} of {planned}"
    return None


def recorded_curve(record: Path | str) -> PublishedCurve | None:
    """The curve a published@<exp> stage recorded (published/<exp>.json), for the train stage's check;
    None when the row has no published log (`none`) or the stage has not run."""
    try:
        data = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return None
    return PublishedCurve.from_json(data["curve"]) if data.get("source", "none") != "none" else None
