"""Writing evaluation results: a JSON file next to the checkpoint and a printed table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

__all__ = ["write_metrics", "metrics_table", "print_table", "to_jsonable"]


def to_jsonable(value: Any, where: str = "metrics") -> Any:
    """Convert tensors, numpy values, paths and nested containers to plain JSON types.

    0-d tensors / numpy scalars become Python floats (ints and bools stay ints and bools),
    larger tensors and arrays become nested lists, ``Path`` becomes ``str``. Non-finite
    floats (NaN, +-inf) become ``null``, since strict JSON has no NaN.
    ``where`` names the key path in the error raised for an unsupported type.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.ndim == 0 else value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} has a value of type {type(value).__name__} that cannot be written to JSON; "
        "pass numbers, strings, lists, dicts, tensors or numpy arrays"
    )


def write_metrics(path: str | Path, metrics: dict, meta: dict | None = None) -> Path:
    """Write ``{"metrics": ..., "meta": ...}`` as indented JSON, atomically.

    Parent folders are created. The JSON goes to a temporary file in the same folder and
    is moved into place with ``os.replace``, so a reader never sees a half-written file
    and an interrupted run leaves the previous file intact. Values go through
    :func:`to_jsonable` (tensors and numpy become numbers/lists, NaN becomes ``null``).

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {"metrics": to_jsonable(metrics, "metrics"), "meta": to_jsonable(meta or {}, "meta")}
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _format_value(key: str, value: Any, formats: Mapping[str, str]) -> str:
    """Format one cell: caller's format first, then percentages with 1 decimal, else 3."""
    if value is None:
        return "-"
    if isinstance(value, torch.Tensor | np.generic) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if key in formats:
        return formats[key].format(value)
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        if "R@" in key or "acc" in key or abs(value) > 1.5:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def metrics_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str = "",
    formats: Mapping[str, str] | None = None,
) -> Table:
    """Build a rich table: one row per run name, one column per metric key.

    Args:
        rows: ``{run_name: {metric_key: value}}``.
        columns: metric keys to show, in order; default: the union of the rows' keys in
            first-seen order.
        title: table title.
        formats: per-key format strings, e.g. ``{"gap": "{:.4f}"}``. Otherwise a float
            prints with 1 decimal if its key contains ``"R@"`` or ``"acc"`` or
            ``|value| > 1.5`` (percentages), and with 3 decimals otherwise (cosines, gaps).
            A metric missing from a row prints as ``"-"``.
    """
    formats = dict(formats or {})
    if columns is None:
        columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics))
    table = Table(title=title or None)
    table.add_column("run", style="bold")
    for col in columns:
        table.add_column(col, justify="right")
    for name, metrics in rows.items():
        table.add_row(str(name), *(_format_value(c, metrics.get(c), formats) for c in columns))
    return table


def print_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str = "",
    formats: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> None:
    """Print :func:`metrics_table` to ``console`` (a new rich ``Console`` by default)."""
    (console or Console()).print(metrics_table(rows, columns, title, formats))
