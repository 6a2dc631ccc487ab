"""What a training run reports while it runs: a rich progress bar (ETA, loss parts,
throughput), the experiment trackers (TensorBoard, Weights & Biases, MLflow) and a plain
`train.log`, all from one object.

```
with RunLog(out_dir, total_steps=tc.max_steps, start_step=state.step) as runlog:
    ...                               # every optimizer step:
    runlog.step(state.step, {"loss": 2.31, "ntp_loss": 2.31})
    ...                               # every train.log_every steps:
    runlog.log(state.step, entry)     # trackers train/<key> + a line in train.log
runlog.log_eval(step, metrics)        # trackers eval/<key> + a line
```

Trackers: `train.report_to` (read from the run's `config.yaml`, which the trainer writes
before the loop) names them: "tensorboard" (the default), "wandb", "mlflow", several, or
"none". Each is Accelerate's tracker class (`accelerate.tracking`), so the files are
those the tools expect; the resolved config goes to each as hyperparameters when a run
starts, and the evaluation metrics as `eval/<key>`.

- tensorboard: event files in `out_dir/tb` (`tensorboard --logdir runs/`).
- wandb: `wandb.init(project=$WANDB_PROJECT or "vlmalign", dir=out_dir)`; offline with
  `WANDB_MODE=offline` (files under `out_dir/wandb/`, `wandb sync` uploads them).
- mlflow: `$MLFLOW_TRACKING_URI`, else the local file store `out_dir/mlruns`
  (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/x/mlruns`; MLflow 3
  wants that opt-in for file stores); experiment `$MLFLOW_EXPERIMENT_NAME` or
  "vlmalign". MLflow metric names cannot hold "@": R@1 is logged as R_at_1.

The run ids are kept in `out_dir/tracker.json`: a resumed run (start_step > 0) and the
evaluation after training log into the same W&B and MLflow runs.

`train.log` is appended to, so a resumed run continues the same file. `enabled=False`
(ranks other than the main one) turns everything into a no-op that writes nothing.

The bar needs an interactive terminal. When stdout is a pipe or a file (CI, `nohup`,
`| tee`), rich cannot redraw in place, so the bar is left out and the log lines (which
carry the step, ETA and throughput themselves) are printed as plain text instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import track as rich_track

T = TypeVar("T")

LOG_NAME = "train.log"
TB_DIR = "tb"
TRACKER_FILE = "tracker.json"
CONFIG_FILE = "config.yaml"
TRACKERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_PROJECT = "vlmalign"
# Steps the throughput and the ETA are averaged over.
RATE_WINDOW = 50

__all__ = ["RunLog", "Trackers", "format_entry", "log_eval_metrics", "track", "LOG_NAME", "TB_DIR", "TRACKER_FILE"]


def _number(value: Any) -> float | None:
    """`value` as a float when it is a real number (bools and strings are not), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)  # int, float, numpy scalar, 0-d tensor
    except (TypeError, ValueError):
        return None
    return out


def _format_value(key: str, value: Any) -> str:
    """lr in scientific notation, integers as integers, other numbers with 4 significant
    digits (enough to see a loss move, short enough for one line)."""
    x = _number(value)
    if x is None:
        return str(value)
    if key == "lr" or key.endswith("_lr"):
        return f"{x:.2e}"
    if isinstance(value, int):
        return str(value)
    return f"{x:.4g}"


def format_entry(entry: dict[str, Any], skip: tuple[str, ...] = ("step",)) -> str:
    """One log entry as `key value  key value ...` (keys in the entry's order)."""
    return "  ".join(f"{k} {_format_value(k, v)}" for k, v in entry.items() if k not in skip)


def _format_duration(seconds: float) -> str:
    """7 -> "7s", 168 -> "2m48s", 4000 -> "1h06m"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _scalars(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """`prefix/key: float` for each finite real number of `values` ("step" excluded)."""
    out = {}
    for key, value in values.items():
        x = _number(value)
        if key != "step" and x is not None and math.isfinite(x):
            out[f"{prefix}/{key}"] = x
    return out


def _run_config(out_dir: Path) -> dict[str, Any] | None:
    """The resolved config the trainer saved as `out_dir/config.yaml` (None if absent)."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists become strings (hyperparameter
    values must be numbers, strings or bools)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = ",".join(str(v) for v in value)
        else:
            out[f"{prefix}{key}"] = value
    return out


def report_to_names(value: Any) -> list[str]:
    """`train.report_to` as tracker names, checked: "wandb,mlflow" or a list; "none" or
    an empty list turns the trackers off."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else list(value or [])) if str(v).strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"train.report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)} or none")
    return list(dict.fromkeys(names))


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"train.report_to={extra} needs the {module} package: pip install 'vlmalign[{extra}]'")


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class Trackers:
    """The experiment trackers of one run folder, through Accelerate's tracker classes.

    `Trackers(out_dir, ["wandb"], resume=True)` reopens the runs whose ids `tracker.json`
    holds (a resumed run, or metrics logged after training); otherwise new runs start and
    their ids are written there.
    """

    def __init__(self, out_dir: str | Path, names: list[str], title: str = "", resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.names = list(names)
        saved = self._read_ids() if resume else {}
        self.resumed = bool(saved)
        self._trackers: dict[str, Any] = {}
        ids: dict[str, str] = {}
        run_name = f"{title or 'train'} ({self.out_dir.name})"
        for name in self.names:
            tracker, run_id = self._open(name, saved.get(name), run_name)
            self._trackers[name] = tracker
            if run_id:
                ids[name] = run_id
        if ids and (saved | ids) != saved:
            (self.out_dir / TRACKER_FILE).write_text(json.dumps(saved | ids, indent=2) + "\n", encoding="utf-8")

    def _read_ids(self) -> dict[str, str]:
        path = self.out_dir / TRACKER_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _open(self, name: str, run_id: str | None, run_name: str) -> tuple[Any, str | None]:
        from accelerate import tracking

        if name == "tensorboard":
            tracker = tracking.TensorBoardTracker(TB_DIR, self.out_dir)
            tracker.start()
            return tracker, None
        if name == "wandb":
            _require("wandb", "wandb")
            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            tracker = tracking.WandBTracker(
                os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), dir=str(self.out_dir), name=run_name, **resume,
            )
            tracker.start()
            return tracker, tracker.run.id
        _require("mlflow", "mlflow")
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # The local file store: no server, no database, readable files. MLflow 3.x
            # keeps it behind an opt-in, which only this default sets.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.out_dir / "mlruns").resolve().as_uri())
        tracker = tracking.MLflowTracker(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT), run_id=run_id, run_name=run_name,
        )
        tracker.start()
        return tracker, tracker.active_run.info.run_id

    def store_config(self, config: dict[str, Any]) -> None:
        """The resolved config (nested dict) as the runs' hyperparameters."""
        flat = _flatten(config)
        for tracker in self._trackers.values():
            tracker.store_init_configuration(flat)

    def log(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        for name, tracker in self._trackers.items():
            if name == "mlflow":
                tracker.log({_MLFLOW_BAD.sub("_", k.replace("@", "_at_")): v for k, v in values.items()}, step=step)
            else:
                tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self._trackers.values():
            tracker.finish()
        self._trackers = {}


def _trackers_of_run(out_dir: Path, title: str, resume: bool, report_to: Any = None) -> tuple[Trackers, dict | None]:
    """The trackers `train.report_to` names for the run in `out_dir` (`report_to` when
    given, else the run's config.yaml, else TensorBoard), and that config."""
    config = _run_config(out_dir)
    if report_to is None:
        report_to = ((config or {}).get("train") or {}).get("report_to", ["tensorboard"])
    return Trackers(out_dir, report_to_names(report_to), title=title, resume=resume), config


class RunLog:
    """Progress bar + TensorBoard + `train.log` for one training run.

    Args:
        out_dir: the run folder; `tb/` and `train.log` go under it (created on first use).
        total_steps: optimizer steps of the whole run (`train.max_steps`).
        enabled: False on every rank but the main one: nothing is shown or written.
        start_step: the step a resumed run starts from (the bar and the ETA start there).
        title: shown left of the bar and at the top of each run's section in `train.log`.
        samples_per_step: samples in one optimizer step over all ranks (batch x accum x
            ranks); when given the bar shows samples/s, else steps/s.
        console: the console to draw on (the trainer's, so its prints land above the bar);
            a new `rich.console.Console()` by default.
        report_to: tracker names (see `train.report_to`); None reads them from the run's
            `config.yaml`, TensorBoard when there is none.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        enabled: bool = True,
        start_step: int = 0,
        title: str = "",
        samples_per_step: int = 0,
        console: Console | None = None,
        *,
        report_to: list[str] | str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.start_step = int(start_step)
        self.title = title or "train"
        self.samples_per_step = int(samples_per_step)
        self.console = console if console is not None else (Console() if enabled else None)
        self._trackers: Trackers | None = None
        self._log_file = None
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()
        # (time, step) of recent steps; the first entry is the start (or resume) point,
        # taken when the first step() or log() arrives, not at construction (setup time).
        self._marks: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)
        self._last_step = self.start_step
        self._closed = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.out_dir / LOG_NAME, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        stamp = datetime.now().isoformat(timespec="seconds")
        self._log_file.write(f"# {stamp} {self.title}: steps {self.start_step}..{self.total_steps}\n")
        self._log_file.flush()
        # A resumed run continues the runs it started (their ids are in tracker.json).
        self._trackers, config = _trackers_of_run(self.out_dir, self.title, self.start_step > 0, report_to)
        if config is not None and not self._trackers.resumed:
            self._trackers.store_config(config)
        # is_interactive: a real terminal that is not TERM=dumb; Jupyter also redraws.
        if self.console.is_interactive or self.console.is_jupyter:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[dim]elapsed"),
                TimeElapsedColumn(),
                TextColumn("[dim]ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}  {task.fields[parts]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                self.title, total=self.total_steps, completed=self.start_step, rate="", parts=""
            )
            self._progress.start()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------ helpers
    @property
    def uses_progress_bar(self) -> bool:
        """Whether a live progress bar is drawn (an interactive terminal), or plain lines."""
        return self._progress is not None

    def _mark(self, step: int) -> None:
        """Remember when `step` was reached (the window the throughput is measured on)."""
        if not self._marks or self._marks[-1][1] != step:
            self._marks.append((time.perf_counter(), step))

    def _rate(self, step: int) -> tuple[float, str]:
        """(seconds per step, "12.3 samples/s" or "0.81 steps/s") over the last
        RATE_WINDOW steps, so model loading and a mid-run evaluation fade out of the ETA."""
        if len(self._marks) < 2:
            return float("nan"), ""
        (t_old, s_old), (t_new, s_new) = self._marks[0], self._marks[-1]
        if s_new <= s_old or t_new <= t_old:
            return float("nan"), ""
        sps = (t_new - t_old) / (s_new - s_old)
        if self.samples_per_step:
            return sps, f"{self.samples_per_step / sps:.1f} samples/s"
        return sps, f"{1 / sps:.2f} steps/s"

    def _eta(self, step: int) -> str:
        sps, _ = self._rate(step)
        return _format_duration(sps * (self.total_steps - step))

    def print(self, message: str) -> None:
        """Print a message above the bar (or as a plain line), without rich markup."""
        if self.enabled and not self._closed:
            # soft_wrap: a long line stays one line in a pipe or file (no hard wraps at 80)
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _write_line(self, line: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self._log_file.write(f"{stamp} {line}\n")
        self._log_file.flush()
        self.print(line)

    # --------------------------------------------------------------------------- API
    def step(self, step: int, parts: dict[str, float]) -> None:
        """Called after every optimizer step: advance the bar to `step` and show the loss
        parts of this step (`{"loss": 2.31, "ntp_loss": 2.31}`) and the throughput."""
        if not self.enabled or self._closed:
            return
        self._last_step = step
        self._mark(step)
        if self._progress is None:
            return
        _, rate = self._rate(step)
        shown = "  ".join(f"{k} {float(v):.3f}" for k, v in parts.items() if _number(v) is not None)
        self._progress.update(self._task, completed=step, rate=rate, parts=shown)

    def log(self, step: int, entry: dict[str, Any]) -> None:
        """At a log interval: every finite numeric value of `entry` (loss parts, lr,
        grad_norm, logit_scale, s_per_step, ...) goes to the trackers as `train/<key>` at `step`, and
        one line (`step 10/90  ntp_loss 3.214  lr 1.00e-03 ... ETA 2m48s`) to `train.log`
        and the console."""
        if not self.enabled or self._closed:
            return
        self._mark(step)
        self._trackers.log(_scalars("train", entry), step)
        _, rate = self._rate(step)
        tail = f"  {rate}  ETA {self._eta(step)}" if rate else ""
        self._write_line(f"step {step:>{len(str(self.total_steps))}d}/{self.total_steps}  {format_entry(entry)}{tail}")

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Evaluation metrics at `step`: the trackers' `eval/<key>` for each finite numeric
        value, and one `eval step N ...` line. Works after `close()` too (evaluation often
        runs after the training loop has finished): it then reopens the runs briefly."""
        if not self.enabled:
            return
        if self._closed:
            log_eval_metrics(self.out_dir, step, metrics, self.console)
            return
        self._trackers.log(_scalars("eval", metrics), step)
        self._write_line(f"eval step {step}  {format_entry(metrics)}")

    def close(self) -> None:
        """Stop the bar, finish the trackers' runs and close the log. Safe to call twice."""
        if not self.enabled or self._closed:
            return
        if self._progress is not None:
            self._progress.stop()
        self._closed = True
        elapsed = time.perf_counter() - self._t0
        stamp = datetime.now().strftime("%H:%M:%S")
        self._log_file.write(f"{stamp} done at step {self._last_step} in {_format_duration(elapsed)}\n")
        self._log_file.close()
        self._trackers.finish()


def log_eval_metrics(out_dir: str | Path, step: int, metrics: dict[str, Any], console: Console | None = None) -> None:
    """Append evaluation metrics to a run folder without a live RunLog (e.g. `vlmalign
    eval` on a finished run, or the evaluation after training): `eval/<key>` in the runs
    of the run's trackers (the same W&B / MLflow runs, through `tracker.json`) and one line
    in `out_dir/train.log`; also printed to `console` when one is given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trackers, _ = _trackers_of_run(out_dir, "eval", resume=True)
    try:
        trackers.log(_scalars("eval", metrics), step)
    finally:
        trackers.finish()
    line = f"eval step {step}  {format_entry(metrics)}"
    with open(out_dir / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(f"{datetime.now().strftime('%H:%M:%S')} {line}\n")
    if console is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def track(iterable: Iterable[T], description: str, total: int | None = None, console: Console | None = None) -> Iterator[T]:
    """`for batch in track(batches, "eval: text embeddings"):` a progress bar with ETA on
    an interactive terminal; on a pipe or file, the plain iterable (no control codes)."""
    console = console if console is not None else Console()
    if not (console.is_interactive or console.is_jupyter):
        yield from iterable
        return
    yield from rich_track(iterable, description=description, total=total, console=console, transient=True)
