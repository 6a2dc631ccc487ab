"""The training loop, on Accelerate: AdamW, warmup + cosine, accumulation, clipping,
per-part loss logging, periodic checkpoints, exact resume (`train.resume`, see
train/checkpoint.py).

`train(cfg)` builds everything from the config. The demo and the experiments pass an
already loaded `model` and a `TrainData` so several runs share one backbone and one set of
cached features. Reading order: `train` (one screen) -> `setup` (model, objective, data,
optimizer, resume) -> `run_loop` (steps, logging, saving) -> `finish`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from transformers import get_cosine_schedule_with_warmup

from vlmalign.config import Config
from vlmalign.errors import explain_oom
from vlmalign.models import compiled
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train import checkpoint, rundir, sharded
from vlmalign.train.batches import Batches, agree, groups, make_batches
from vlmalign.train.checkpoint import TrainingState
from vlmalign.train.datasets import TrainData
from vlmalign.train.guard import NonFiniteGuard, StopSignal
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.runlog import RunLog
from vlmalign.train.step import TrainStep, optimizer_step

log = logging.getLogger(__name__)
console = Console()

__all__ = ["TrainResult", "TrainStep", "TrainingInterrupted", "train"]


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict]
    wall_time_s: float
    model: VLM
    objective: Objective
    # What the run dropped or skipped: {"skipped": LoadReport.as_dict(), "truncated": n,
    # "nonfinite": {"skipped_total", ...}}; written into metrics.json by the evaluation.
    data_report: dict = field(default_factory=dict)


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after saving the checkpoint of its current step."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(f"training stopped by signal {signum}; saved {checkpoint}; resume with train.resume=latest")
        self.checkpoint, self.signum = checkpoint, signum


@dataclass
class Run:
    """Everything a training run holds between setup and finish."""

    cfg: Config
    accelerator: Accelerator
    model: VLM
    objective: Objective
    batches: Batches
    step_module: torch.nn.Module
    params: list[torch.Tensor]  # the prepared parameters that train (FSDP2 replaces them)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainingState
    guard: NonFiniteGuard
    trains: list[str]

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def save(self, extra: dict | None = None) -> Path:
        """The checkpoint of this step: written by the main process, with every rank
        gathering the shards first under FSDP2 / DeepSpeed (train/sharded.py)."""
        state, acc = self.state, self.accelerator
        state.extra = (extra or state.extra) | {"nonfinite": self.guard.state_dict()} | self.batches.stream_record()
        if sharded.is_sharded(acc):
            checkpoint.save_checkpoint_sharded(acc, self.out_dir, state, self.step_module, self.model, self.objective,
                                               self.optimizer, self.scheduler, acc.scaler)
        elif acc.is_main_process:
            checkpoint.save_checkpoint(self.out_dir, state, self.model, self.objective, self.optimizer,
                                       self.scheduler, acc.scaler)
        acc.wait_for_everyone()
        return self.out_dir / f"checkpoint-{state.step}"


def train(cfg: Config, model: VLM | None = None, data: TrainData | None = None) -> TrainResult:
    """Train `cfg.recipe` for `cfg.train.max_steps` optimizer steps, from scratch or from
    `cfg.train.resume`; returns the final checkpoint folder and the logged history."""
    t0 = time.perf_counter()
    tc = cfg.train
    with rundir.RunLock(tc.out_dir):  # a second live run into the same out_dir refuses
        run = setup(cfg, model, data)
        runlog = RunLog(run.out_dir, tc.max_steps, enabled=run.accelerator.is_main_process,
                        start_step=run.state.step, title=cfg.recipe, console=console,
                        samples_per_step=tc.batch_size * tc.grad_accum_steps * run.accelerator.num_processes)
        with runlog, StopSignal() as stop, explain_oom(tc.batch_size, tc.grad_accum_steps):
            run_loop(run, runlog, stop)
        return finish(run, stop, time.perf_counter() - t0)


def setup(cfg: Config, model: VLM | None, data: TrainData | None) -> Run:
    """Build (or adopt) the model, apply the recipe, load a resumed or initial state, and
    prepare model, optimizer and data with Accelerate."""
    tc = cfg.train
    recipe = RECIPES.get(cfg.recipe)
    out_dir = Path(tc.out_dir)
    resume_from = checkpoint.resolve_resume(tc.resume, out_dir)  # fail before loading anything
    accelerator = Accelerator(  # accumulation is done here (train/step.py), not by Accelerate
        mixed_precision=tc.mixed_precision or None,  # "": the launcher's setting
        cpu=not torch.cuda.is_available(),
    )
    set_seed(tc.seed)
    if model is None:
        model = VLM.build(cfg)
    model.set_config(cfg)
    trains = apply_recipe(model, recipe)
    model.to(accelerator.device)
    objective = Objective(cfg.objective, gather=accelerator.num_processes > 1).to(accelerator.device)
    if resume_from is not None:
        if changed := checkpoint.config_changes(resume_from, cfg):
            console.print(f"[yellow]resume: config differs from {resume_from} in {', '.join(changed)}; "
                          "the run will not match an uninterrupted one")
        checkpoint.load_weights(resume_from, model, objective)
    elif tc.init_from:
        model.load_trainable(tc.init_from)
        console.print(f"initialised trainable weights from {tc.init_from}")
    batches = make_batches(model, objective, data, cfg, recipe.data, accelerator)
    step_module = TrainStep(model, objective)
    optimizer = torch.optim.AdamW([p for p in step_module.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    if accelerator.state.deepspeed_plugin is not None:  # batches come from a batch sampler
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tc.batch_size
    if batches.stream is None:
        step_module, optimizer, batches.loader = accelerator.prepare(step_module, optimizer, batches.loader)
    else:  # a stream splits itself across ranks: Accelerate must not shard it again
        step_module, optimizer = accelerator.prepare(step_module, optimizer)
    if tc.compile:  # after prepare, as FSDP2 wants; the layers' parameter names do not change
        console.print(f"compiling {compiled.set_compiled(model.llm, True)} decoder layers (the first steps are slow)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    if accelerator.is_main_process:  # versions, hardware, data hashes (copied into each checkpoint)
        rundir.write_provenance(out_dir, rundir.provenance(cfg))
    state = TrainingState()
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from, optimizer, scheduler, accelerator.scaler,
                                               accelerator=accelerator, module=step_module)
        batches.skip(state.epoch, state.batches_done, state.extra.get("stream"))
        console.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    elif latest := checkpoint.find_latest(out_dir):
        console.print(f"[yellow]{out_dir} already holds checkpoints (newest {latest.name}); "
                      "this run replaces those of the same steps")
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    guard.load_state_dict(state.extra.get("nonfinite", {}))
    # FSDP2 replaces the parameters at prepare(): clip and guard the ones that train now.
    params = [p for p in step_module.parameters() if p.requires_grad]
    console.print(
        f"[bold]{recipe.name}[/] ({recipe.paper}): {batches.size} samples, batch {tc.batch_size}"
        f" x accum {tc.grad_accum_steps} x {accelerator.num_processes} processes, {tc.max_steps} steps,"
        f" trains {', '.join(trains)}"
    )
    return Run(cfg, accelerator, model, objective, batches, step_module, params, optimizer, scheduler, state, guard,
               trains)


def run_loop(run: Run, runlog: RunLog, stop: StopSignal) -> None:
    """Optimizer steps until `train.max_steps` or a stop signal, epoch after epoch:
    logging every `train.log_every` steps, saving every `train.save_every`."""
    tc, state, acc = run.cfg.train, run.state, run.accelerator
    run.step_module.train()
    run.model.llm.eval()  # no dropout in frozen or partly trained backbones
    if not any(p.requires_grad for p in run.model.vision.parameters()):
        run.model.vision.eval()
    window: list[dict[str, float]] = []
    t_log = time.perf_counter()
    while state.step < tc.max_steps and not agree(acc, stop.requested):
        fresh_epoch, stepped = state.batches_done == 0, False
        for group in groups(run.batches.epoch(state.epoch), tc.grad_accum_steps):
            stepped = True
            parts, grad_norm = optimizer_step(acc, run.step_module, run.objective, group, run.params, run.optimizer,
                                              tc.max_grad_norm, run.guard, state.step)
            run.scheduler.step()
            state.step += 1
            state.batches_done += len(group) * acc.num_processes
            window.append(parts)
            runlog.step(state.step, parts)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                log_window(run, runlog, window, grad_norm, time.perf_counter() - t_log)
                window, t_log = [], time.perf_counter()
            stopping = agree(acc, stop.requested)
            if stopping or (tc.save_every and state.step % tc.save_every == 0 and state.step < tc.max_steps):
                run.save()
                if acc.is_main_process:
                    checkpoint.prune_checkpoints(run.out_dir, tc.keep_checkpoints, state.step)
            if state.step >= tc.max_steps or stopping:
                return
        if fresh_epoch and not stepped:  # would loop for ever
            raise ValueError(f"epoch {state.epoch} gave no batch of {tc.batch_size} x {tc.grad_accum_steps}: "
                             f"too few usable samples ({run.batches.report.summary()})")
        state.epoch, state.batches_done = state.epoch + 1, 0
        if run.batches.report.total_skipped() and acc.is_main_process:
            console.print(f"[yellow]end of epoch {state.epoch}: {run.batches.report.summary()}")


def log_window(run: Run, runlog: RunLog, window: list[dict[str, float]], grad_norm, seconds: float) -> None:
    """The mean of each logged part over the steps since the last entry, with the step,
    learning rate, seconds per step and gradient norm, into the history and the run log."""
    entry = {k: sum(p.get(k, 0.0) for p in window) / len(window) for k in window[-1]}
    entry |= {"step": run.state.step, "lr": run.scheduler.get_last_lr()[0], "s_per_step": seconds / len(window),
              "grad_norm": float(grad_norm)}
    run.state.history.append(entry)
    runlog.log(run.state.step, entry)


def finish(run: Run, stop: StopSignal, wall_s: float) -> TrainResult:
    """Save the final checkpoint (or raise `TrainingInterrupted` after a signal), point
    `latest` at it and write the history."""
    if stop.requested:
        console.print(f"[yellow]stopped by signal {stop.signum} at step {run.state.step}; resume with train.resume=latest")
        raise TrainingInterrupted(run.out_dir / f"checkpoint-{run.state.step}", stop.signum or 15)
    if truncated := run.batches.trainset.truncated():
        console.print(f"[yellow]data: {truncated} training sequences truncated to the length limit")
    final = run.save({"skipped": run.batches.report.as_dict(), "truncated": truncated})
    if run.accelerator.is_main_process:
        rundir.write_skipped(run.out_dir, run.batches.report)  # every skipped record, with its reason
        (run.out_dir / "latest.tmp").write_text(final.name)
        os.replace(run.out_dir / "latest.tmp", run.out_dir / "latest")
        with open(run.out_dir / "history.jsonl", "w") as f:
            for entry in run.state.history:
                f.write(json.dumps(entry) + "\n")
    return TrainResult(final, run.state.history, wall_s, run.model, run.objective, dict(run.state.extra))
