"""Pool several runs of one experiment into one report: seeds run in separate folders (on
another machine, on another day) summarised together.

`vlmalign experiment --out DIR --pool RUN [RUN ...] -- NAME` copies the records of every
RUN into the new folder DIR; the experiment's report mode then summarises all their
seeds (nothing trains). Records pool only when they answer the same question:

- every RUN is a run of NAME with the same variants and the same settings, apart from its
  seeds and its own data folder (the studies' `data.root=<run>/shapes`);
- the data files hashed in the provenance of each RUN's `results.json` have the same
  sha256 (compared by their path inside the run);
- a (variant, seed) found in two RUNs holds the same values in both (the same run copied
  twice); two different results for one (variant, seed) are refused;
- DIR is new (or an empty folder): the pool never writes beside other files.

A sub-experiment the report reads (VladVA's learning-rate sweep in `sweep/`) comes from
the first RUN: equal settings mean equal chosen rates. The report's own check
(`runner.check_settings`) then compares the pooled settings with those the current code
builds, so a pool made with code whose defaults moved since the runs is refused too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

from vlmalign.experiments.runner import (
    RESULTS,
    RESULTS_LINES,
    SETTINGS,
    read_records,
    rewrite_records,
)

SUBEXPERIMENTS = ("sweep",)
_OWN_DATA = re.compile(r"^data\.root=.*[/\\]shapes$")


class PoolMismatch(ValueError):
    """The runs to pool do not answer the same question (other settings, data or values)."""


def relocate(settings: dict, out: str | Path) -> dict:
    """`settings` with the run's own data folder (`data.root=<run>/shapes`) moved to `out`."""
    moved = copy.deepcopy(settings)
    common = moved.get("common")
    if isinstance(common, list):
        moved["common"] = [f"data.root={Path(out) / 'shapes'}" if isinstance(c, str) and _OWN_DATA.match(c) else c
                           for c in common]
    return moved


def _load(run: Path) -> dict:
    path = run / SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no experiment run ({SETTINGS} not found)")
    saved = json.loads(path.read_text())
    return saved | {"records": read_records(run / RESULTS_LINES)}


def data_hashes(run: Path) -> dict[str, str] | None:
    """sha256 of the data files in `run/results.json`'s provenance, keyed by their path
    below the folder they share (None when the run wrote no summary)."""
    path = run / RESULTS
    if not path.is_file():
        return None
    hashes = json.loads(path.read_text()).get("provenance", {}).get("data_sha256") or {}
    if not hashes:
        return {}
    keys = [k.rstrip("/") for k in hashes]
    root = os.path.commonpath(keys) if len(keys) > 1 else os.path.dirname(keys[0])
    return {os.path.relpath(k.rstrip("/"), root): v for k, v in hashes.items()}


def _values(record: dict) -> str:
    return json.dumps({"metrics": record.get("metrics"), "items": record.get("items")}, sort_keys=True)


def pool_runs(name: str, runs: list[str | Path], out: str | Path, log=print) -> list[int]:
    """Write the pooled records of `runs` and their settings into `out`; return the seeds."""
    runs, out = [Path(r) for r in runs], Path(out)
    if len(runs) < 2:
        raise ValueError("--pool takes two or more run folders")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; pool into a new folder")
    saved = {run: _load(run) for run in runs}
    first = runs[0]
    ref = saved[first]
    for run, s in saved.items():
        if s.get("experiment") != name:
            raise PoolMismatch(f"{run} is a run of {s.get('experiment')!r}, not {name!r}")
        if s.get("variants") != ref.get("variants"):
            raise PoolMismatch(f"{run} has other variants than {first}: {s.get('variants')} vs {ref.get('variants')}")
        if relocate(s.get("settings", {}), "<run>") != relocate(ref.get("settings", {}), "<run>"):
            raise PoolMismatch(f"{run} ran with other settings than {first} (compare their {SETTINGS})")
    hashes = {run: data_hashes(run) for run in runs}
    checked = [run for run in runs if hashes[run]]
    for run in checked[1:]:
        if hashes[run] != hashes[checked[0]]:
            raise PoolMismatch(f"{run} ran on other data than {checked[0]} (data_sha256 in their {RESULTS})")
    order = {v: i for i, v in enumerate(ref["variants"])}
    pooled: dict[tuple[str, int], dict] = {}
    for run in runs:
        for r in saved[run]["records"]:
            key = (r["variant"], r["seed"])
            if key in pooled and _values(pooled[key]) != _values(r):
                raise PoolMismatch(f"{key[0]!r} seed {key[1]} has different results in two of the runs ({run}); "
                                   "pool runs of different seeds")
            pooled.setdefault(key, r)
    records = sorted(pooled.values(), key=lambda r: (r["seed"], order.get(r["variant"], len(order))))
    seeds = sorted({r["seed"] for r in records})
    out.mkdir(parents=True, exist_ok=True)
    rewrite_records(out / RESULTS_LINES, records)
    (out / SETTINGS).write_text(json.dumps({"experiment": name, "variants": ref["variants"],
                                            "settings": relocate(ref.get("settings", {}), out), "seeds": seeds},
                                           indent=2) + "\n")
    for sub in SUBEXPERIMENTS:
        if (first / sub / SETTINGS).is_file():  # `out` was new or empty
            (out / sub).mkdir()
            for fname in (SETTINGS, RESULTS_LINES):  # records and settings, not the sub-runs' checkpoints
                if (first / sub / fname).is_file():
                    shutil.copy2(first / sub / fname, out / sub / fname)
    log(f"pooled {len(records)} records of seeds {seeds} from {len(runs)} runs into {out} "
        f"(data hashes compared for {len(checked)} of them)")
    return seeds
