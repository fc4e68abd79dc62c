"""The datasets, one module each; a module defining `DATASET = DatasetSpec(...)` is registered.

Adding a dataset is one module here (classes, palette, reader, label conversion) plus its entry in
params.yaml `data.datasets` (its source, which generates its `prepare@<name>` DVC stage); see docs/.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from components.learning.data.datasets.spec import DatasetSpec

__all__ = ["DatasetSpec", "dataset_names", "get_dataset"]


@functools.cache
def _registry() -> dict[str, DatasetSpec]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "DATASET", None)
        if isinstance(spec, DatasetSpec):
            found[spec.name] = spec
    return found


def dataset_names() -> tuple[str, ...]:
    return tuple(sorted(_registry()))


def get_dataset(name: str) -> DatasetSpec:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"dataset: expected one of {', '.join(sorted(registry))}, got {name!r}")
    return registry[name]
