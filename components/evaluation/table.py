"""The published results table and markdown tables.

`seed_dnlnet_results.md` beside this file is a verbatim copy of the seed's results (mmseg's
configs/dnlnet/README.md), committed so the report stage and CI do not need anything outside the repo.
Published values are kept as the exact strings of the table ("7.3", "2.56", "-"); `number()` reads one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SEED_TABLE = Path(__file__).with_name("seed_dnlnet_results.md")

# The seed's columns and their alignment markers, in order (its download column is replaced by ours).
COLUMNS = ("Method", "Backbone", "Crop Size", "Lr schd", "Mem (GB)", "Inf time (fps)", "mIoU",
           "mIoU(ms+flip)")
ALIGN = {"Lr schd": "right", "Mem (GB)": "right", "mIoU": "right"}


@dataclass(frozen=True)
class MarkdownTable:
    heading: str                 # the closest heading above the table ('' if none)
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.header, row, strict=False)) for row in self.rows]


@dataclass(frozen=True)
class SeedRow:
    dataset: str                 # 'cityscapes' | 'ade20k'
    config: str                  # mmseg config name == our experiment name, from the download link
    cells: dict                  # column -> published string, for COLUMNS
    model_url: str               # the released checkpoint
    log_url: str | None = None   # the training log of the published run (mmcv 1.x JSON lines)

    def __getitem__(self, column: str) -> str:
        return self.cells[column]


def _split_row(line: str) -> tuple[str, ...]:
    # Escaped pipes (&#124; or \|) stay inside their cell.
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return tuple(c.strip() for c in cells)


def parse_markdown_tables(text: str) -> list[MarkdownTable]:
    """Every pipe table of a markdown text with the heading it sits under."""
    tables, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        is_separator = i + 1 < len(lines) and re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?",
                                                            lines[i + 1].strip() or "x")
        if line.startswith("|") and is_separator:
            header = _split_row(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i]))
                i += 1
            tables.append(MarkdownTable(heading, header, tuple(rows)))
            continue
        i += 1
    return tables


def parse_seed_table(text: str | None = None) -> list[SeedRow]:
    """The published rows, in the seed's order, keyed by the config name in their download link."""
    text = SEED_TABLE.read_text() if text is None else text
    rows = []
    for table in parse_markdown_tables(text):
        if table.header[: len(COLUMNS)] != COLUMNS:
            continue
        dataset = table.heading.lower().replace(" ", "")
        for record in table.records():
            found = re.search(r"\[model\]\((\S+/dnlnet/([^/]+)/[^)]+\.pth)\)", record.get("download", ""))
            if not found:
                raise ValueError(f"{SEED_TABLE.name}: row {record} has no model link naming its config")
            log = re.search(r"\[log\]\((\S+\.log\.json)\)", record.get("download", ""))
            rows.append(SeedRow(dataset, found.group(2), {c: record[c] for c in COLUMNS}, found.group(1),
                                log.group(1) if log else None))
    if not rows:
        raise ValueError(f"{SEED_TABLE.name}: no table with the columns {' | '.join(COLUMNS)}")
    return rows


def number(cell: str) -> float | None:
    """A published or reported cell as a number; '-' or empty -> None."""
    cell = cell.strip()
    if cell in ("", "-"):
        return None
    return float(cell)


def difference(ours: float | None, published: float | None) -> str:
    """ours − published, signed, 2 decimals; '-' when either is missing."""
    if ours is None or published is None:
        return "-"
    return f"{ours - published:+.2f}"


def format_markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]],
                          align: dict[str, str] | None = None) -> str:
    align = align or {}
    widths = [max(len(str(h)), 3, *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        padded = [str(c).rjust(w) if align.get(h) == "right" else str(c).ljust(w)
                  for c, w, h in zip(cells, widths, header, strict=True)]
        return "| " + " | ".join(padded) + " |"

    separators = []
    for h, w in zip(header, widths, strict=True):   # a marker spans the cell and its two padding spaces
        separators.append("-" * (w + 1) + (":" if align.get(h) == "right" else "-"))
    return "\n".join([line(header), "|" + "|".join(separators) + "|", *(line(r) for r in rows)])
