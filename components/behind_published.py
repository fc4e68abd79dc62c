"""Is a run behind the published curve? Our mIoU at an evaluation against the published run's at the
same training iteration, with the row's noise band.

The published mIoU at iteration `it` is interpolated linearly between the published evaluations around
`it`; past the last one (a log that ends early) it is the last one, the nearest at or before; before the
first there is nothing to compare with. A run is behind when the published value exceeds ours by MORE
than the band (exactly at the band is within noise).

The band is the run-to-run standard deviation retrained rows show, the upper end of the ranges users
measured (docs/pipeline.md, "Behind the published curve", and the public threads it cites): 0.3-0.7
mIoU on Cityscapes, 0.5-1.0 on ADE20K. A changed GPU count or SyncBN group moves a row more than that.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from components.evaluation.verdict import PRIOR_STD

NOISE_BAND = PRIOR_STD   # mIoU points (percent), per dataset: the run-to-run standard deviation
TAG = "dnlseg.behind_published"


@dataclass(frozen=True)
class Behind:
    iteration: int
    ours: float          # mIoU, percent
    published: float     # the published curve's mIoU at that iteration, percent
    band: float

    @property
    def gap(self) -> float:
        """How far behind, mIoU points (positive: behind)."""
        return self.published - self.ours


def noise_band(dataset: str) -> float:
    if dataset not in NOISE_BAND:
        raise ValueError(f"no run-to-run noise band for dataset {dataset!r} (known: {', '.join(NOISE_BAND)})")
    return NOISE_BAND[dataset]


def published_miou_at(val: list[dict], iteration: int) -> float | None:
    """The published mIoU at training iteration `iteration` from the val rows ({iteration, mIoU}, any
    order): interpolated between evaluations, the last one past the end, None before the first."""
    points = sorted((row["iteration"], row["mIoU"]) for row in val if row.get("mIoU") is not None)
    at = bisect_right([it for it, _ in points], iteration)
    if at == 0:
        return None
    if at == len(points) or points[at - 1][0] == iteration:
        return points[at - 1][1]
    (x0, y0), (x1, y1) = points[at - 1], points[at]
    return y0 + (y1 - y0) * (iteration - x0) / (x1 - x0)


def behind_published(ours: float, iteration: int, val: list[dict], band: float) -> Behind | None:
    """A Behind when our mIoU at `iteration` trails the published curve by more than `band`, else None."""
    published = published_miou_at(val, iteration)
    if published is None or published - ours <= band:
        return None
    return Behind(iteration, ours, published, band)


def behind_since(ours: list[dict], val: list[dict], band: float) -> int | None:
    """The iteration from which our evaluations ({iteration, mIoU}) have trailed the published curve by
    more than the band up to the last one; None when the last one is not behind."""
    since = None
    for row in sorted((r for r in ours if r.get("mIoU") is not None), key=lambda r: r["iteration"]):
        behind = behind_published(row["mIoU"], row["iteration"], val, band) is not None
        since = (since or row["iteration"]) if behind else None
    return since


def behind_summary(ours: list[dict], val: list[dict], band: float) -> dict | None:
    """What train.json's `behind_published` holds (the report's "behind since iteration N"): since when,
    and the gap at our last evaluation; None when the last evaluation is within the band."""
    since = behind_since(ours, val, band)
    if since is None:
        return None
    last = max((r for r in ours if r.get("mIoU") is not None), key=lambda r: r["iteration"])
    behind = behind_published(last["mIoU"], last["iteration"], val, band)
    return {"since": since, "iteration": behind.iteration, "gap": round(behind.gap, 2), "band": band}


def warning_line(experiment: str, behind: Behind) -> str:
    """The console line at the evaluation where the run is behind."""
    return (f"[{experiment}] warning: behind the published curve at iteration {behind.iteration}: mIoU "
            f"{behind.ours:.2f} vs {behind.published:.2f} published ({behind.gap:.2f} behind, noise band "
            f"{behind.band:.2f})")


def tag(behind: Behind) -> dict[str, str]:
    """The MLflow tag: the gap and the iteration."""
    return {TAG: f"{behind.gap:.2f} mIoU behind at iteration {behind.iteration} (ours {behind.ours:.2f}, "
                 f"published {behind.published:.2f}, band {behind.band:.2f})"}
