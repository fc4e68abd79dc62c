"""Stage `weights@<backbone>`: the backbone's initial weights under the current profile, fetched once
into the download cache and checked (sha256 prefix in the file name, every backbone tensor present),
recorded in weights/<backbone>.json. The training stages depend on that record: other weights, another
run (their sha256 is also in each run's identity and MLflow params)."""

from __future__ import annotations

import json
from pathlib import Path

from components.atomic import atomic_write_text
from components.learning.backbones import get_backbone
from components.learning.models.checkpoint import check_pretrained_backbone
from components.weights import fetch, sha256_file
from pipeline.config import Params, weights_record


def fetch_weights(params: Params, backbone: str, *, out_root: Path | str | None = None) -> dict:
    spec = params.pretrained(backbone)
    record = {"backbone": backbone, "pretrained": spec}
    if spec != "none":
        path = fetch(spec, root=params.root, cache_dir=params.cache_dir)
        check_pretrained_backbone(path, get_backbone(backbone).depth)
        record["sha256"] = sha256_file(path)   # not the cache path: the record is the same on every machine
    atomic_write_text(weights_record(Path(out_root or params.root), backbone), json.dumps(record, indent=2) + "\n")
    init = f"{spec} (sha256 {record['sha256'][:12]}, {path})" if spec != "none" else "random init"
    print(f"[weights] {backbone}: {init}", flush=True)
    return record
