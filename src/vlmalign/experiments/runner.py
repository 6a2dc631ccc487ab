"""The experiment runner: named variants x seeds, results appended as they finish,
intervals and verdicts computed in one place.

An `Experiment` is data: its variants (a name and a function that trains and evaluates
one variant on one seed), its seeds, a per-seed `setup` (everything the variants of a
seed share: the initial weights, the data, the loaded backbones), the metrics it reports
(with their chance levels) and the papers' claims it tests. `run_experiment`:

1. for each seed, for each variant: skip it when `results.jsonl` already holds it (a
   stopped run resumes at the first unfinished (variant, seed)); otherwise call `setup`
   once for the seed, run the variant, and append one JSON line with its per-seed
   metrics, its per-item values and its wall time;
2. summarise every line into `results.json` (raw values, means, 95% intervals over
   items and seeds, chance levels, the MDE and verdict of every claim, provenance),
   `table.md` and `plot.png` (experiments/report.py).

[Contract] Fairness is the variants' and the setup's job: every variant of a seed must
start from the weights `setup` made and train on its data; the runner guarantees only
that each seed's setup runs before its variants, that the settings of a resumed run are
those it started with (else it refuses), and that every value lands on disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmalign.experiments import stats

RESULTS_LINES = "results.jsonl"
RESULTS = "results.json"
SETTINGS = "experiment.json"


@dataclass
class VariantResult:
    """What a variant returns for one seed: `metrics` (name -> value for this seed) and
    `items` (name -> per-item values, e.g. 0/1 correct, for metrics that are a mean over
    items; their mean must equal `metrics[name]`), plus anything to keep in `extra`."""

    metrics: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    """A named arm: `run(shared, seed) -> VariantResult`, where `shared` is what the
    experiment's `setup(seed)` returned."""

    name: str
    run: Callable[[Any, int], VariantResult]
    description: str = ""


@dataclass
class Metric:
    """A reported metric: its key, label, chance level (None: no meaningful chance) and
    whether lower is better (losses)."""

    key: str
    label: str
    chance: float | None = None
    lower_is_better: bool = False
    unit: str = "%"


@dataclass
class Experiment:
    name: str
    title: str
    variants: list[Variant]
    seeds: list[int]
    setup: Callable[[int], Any]
    metrics: list[Metric]
    claims: list[stats.Claim] = field(default_factory=list)
    # Everything that decides the results (sizes, overrides, models): a resumed run must
    # match it exactly.
    settings: dict[str, Any] = field(default_factory=dict)
    # Files whose sha256 goes into the provenance (data files; computed at the end).
    data_files: Callable[[], list[Path]] = lambda: []
    # Extra summary entries computed from the records (e.g. a ratio with its interval).
    extra_summary: Callable[[list[dict]], dict] | None = None
    # The command that reproduces the run, for the docs.
    command: str = ""


class SettingsMismatch(FileExistsError):
    """The output folder holds results of an experiment run with other settings."""


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `results.jsonl`; a last line cut short by a kill is ignored."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # the write the kill interrupted: that (variant, seed) runs again
            raise ValueError(f"{path}:{n + 1} is not valid JSON; remove the line to resume") from None
    return records


def _append(path: Path, record: dict) -> None:
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):  # drop a line a kill cut short
        path.write_text(text[: text.rfind("\n") + 1])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Replace `results.jsonl` with `records` in one step (a kill leaves the old or the new
    file, never half of one)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))


def check_settings(out: Path, exp: Experiment) -> None:
    """Write the settings on a fresh run; on a resumed one, refuse other settings."""
    path = out / SETTINGS
    mine = {"experiment": exp.name, "variants": [v.name for v in exp.variants], "settings": _jsonable(exp.settings)}
    if path.is_file():
        saved = json.loads(path.read_text())
        same = {k: saved.get(k) for k in mine} == mine
        if not same:
            raise SettingsMismatch(
                f"{out} holds a run of {saved.get('experiment')!r} with other settings ({path}); "
                f"use another --out, or delete {out / RESULTS_LINES} to start over")
        return
    path.write_text(json.dumps(mine | {"seeds": exp.seeds}, indent=2) + "\n")


def run_experiment(exp: Experiment, out: str | Path, log: Callable[[str], None] = print,
                   execute: bool = True) -> dict:
    """Run every unfinished (variant, seed) of `exp`, appending to `out/results.jsonl`,
    then write `results.json`, `table.md` and `plot.png`; return the summary. With
    `execute=False` nothing runs: the summary covers the seeds finished so far (a report
    of a run still going, or stopped)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, exp)
    lines = out / RESULTS_LINES
    t0 = time.perf_counter()
    done = {(r["variant"], r["seed"]) for r in read_records(lines)}
    for seed in exp.seeds if execute else []:
        todo = [v for v in exp.variants if (v.name, seed) not in done]
        if not todo:
            log(f"seed {seed}: all {len(exp.variants)} variants already in {lines}")
            continue
        t = time.perf_counter()
        shared = exp.setup(seed)
        log(f"seed {seed}: set up in {time.perf_counter() - t:.0f} s")
        for v in todo:
            t = time.perf_counter()
            result = v.run(shared, seed)
            wall = time.perf_counter() - t
            for key, items in result.items.items():
                if key in result.metrics and items and abs(float(np.mean(items)) - result.metrics[key]) > 1e-6 * max(
                        1.0, abs(result.metrics[key])):
                    raise AssertionError(f"{v.name}: the items of {key} average {np.mean(items)}, "
                                         f"the metric says {result.metrics[key]}")
            _append(lines, {"variant": v.name, "seed": seed, "wall_s": wall, "metrics": result.metrics,
                            "items": result.items, "extra": result.extra})
            log(f"seed {seed}: {v.name} done in {wall:.0f} s")
        del shared
    summary = summarise(exp, read_records(lines), out)
    summary["run_wall_s"] = time.perf_counter() - t0
    (out / RESULTS).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def values_of(records: list[dict], metric: str, variants: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
    """variant -> [S, N] per-item values of `metric` (or [S, 1] per-seed values) over
    `seeds`, for the variants that have it on every seed. Per-item values are used only
    when every (variant, seed) has the same number of them (the same items)."""
    by = {(r["variant"], r["seed"]): r for r in records}
    out: dict[str, np.ndarray] = {}
    if not seeds:  # no seed finished every variant yet
        return out
    use_items = all(metric in by[(v, s)].get("items", {}) for v in variants for s in seeds if (v, s) in by)
    lengths = {len(by[(v, s)]["items"][metric]) for v in variants for s in seeds if (v, s) in by} if use_items else set()
    use_items = use_items and len(lengths) == 1
    for v in variants:
        if not all((v, s) in by and metric in by[(v, s)]["metrics"] for s in seeds):
            continue
        if use_items:
            out[v] = np.array([by[(v, s)]["items"][metric] for s in seeds], dtype=np.float64)
        else:
            out[v] = np.array([[by[(v, s)]["metrics"][metric]] for s in seeds], dtype=np.float64)
    return out


def summarise(exp: Experiment, records: list[dict], out: Path) -> dict:
    """The summary of the records: raw values, intervals, chance, claims, provenance;
    also writes `table.md` and `plot.png` under `out`."""
    from vlmalign.experiments import report

    variants = [v.name for v in exp.variants]
    seeds = [s for s in exp.seeds if any(r["seed"] == s for r in records)]
    complete = [s for s in seeds if all(any(r["seed"] == s and r["variant"] == v for r in records) for v in variants)]
    metrics: dict[str, dict] = {}
    for m in exp.metrics:
        vals = values_of(records, m.key, variants, complete)
        if vals:
            metrics[m.key] = {"label": m.label, "chance": m.chance, "lower_is_better": m.lower_is_better,
                              "unit": m.unit, "variants": stats.summarise_metric(vals, m.chance)}
    claims = []
    for c in exp.claims:
        vals = values_of(records, c.metric, [c.better, c.worse], complete)
        if len(vals) == 2:
            claims.append(stats.judge(c, vals))
        else:
            claims.append({**c.__dict__, "verdict": "not run", "difference": None, "mde": None})
    summary = {
        "experiment": exp.name,
        "title": exp.title,
        "command": exp.command,
        "settings": _jsonable(exp.settings),
        "variants": {v.name: v.description for v in exp.variants},
        "seeds": complete,
        "incomplete_seeds": [s for s in seeds if s not in complete],
        "metrics": metrics,
        "claims": claims,
        "records": records,
        "provenance": provenance(exp.data_files()),
        "wall_s_total": sum(r["wall_s"] for r in records),
    }
    if exp.extra_summary is not None and complete:
        summary["derived"] = exp.extra_summary([r for r in records if r["seed"] in complete])
    (out / "table.md").write_text(report.markdown(summary))
    report.plot(summary, out / "plot.png")
    return summary


# ---------------------------------------------------------------- provenance

PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "open_clip_torch", "timm", "pillow")


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file; a folder gets one hash over its files' names and hashes."""
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            out[str(p)] = sha256_file(p)
        elif p.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                h.update(f"{f.relative_to(p)}\0{sha256_file(f)}\n".encode())
            out[f"{p}/"] = h.hexdigest()
    return out


def provenance(data_files: list[Path] | None = None) -> dict:
    """vlmalign version and git commit, package versions, hardware, data hashes."""
    import vlmalign

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    hardware = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        hardware["torch_threads"] = torch.get_num_threads()
        hardware["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # the stats tests need no torch
        pass
    return {
        "vlmalign_version": vlmalign.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": [line[3:] for line in _git("status", "--porcelain", "--", "src").splitlines()],
        "packages": versions,
        "hardware": hardware,
        "data_sha256": hash_files(data_files or []),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
