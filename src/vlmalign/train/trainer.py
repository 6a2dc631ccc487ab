"""The training loop, on Accelerate: AdamW, warmup + cosine, accumulation, clipping,
per-part loss logging, periodic checkpoints, exact resume (`train.resume`, see
train/checkpoint.py).

`train(cfg)` builds everything from the config. The demo passes an already loaded `model`
and a `TrainData` so several recipes share one backbone and one set of cached features.
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
from accelerate.utils import gather_object, send_to_device, set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from vlmalign.config import Config
from vlmalign.data.sample import LoadReport
from vlmalign.data.sampler import LengthGroupedBatchSampler
from vlmalign.data.shards import ShardStream, StreamPosition, rank_position
from vlmalign.errors import explain_oom
from vlmalign.models import compiled
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train import checkpoint, sharded
from vlmalign.train.checkpoint import TrainingState
from vlmalign.train.datasets import TrainData, TrainSet, build_stream, build_trainset
from vlmalign.train.guard import NonFiniteGuard, StopSignal
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.runlog import RunLog
from vlmalign.train.step import accumulate_gradients

log = logging.getLogger(__name__)
console = Console()

# Batches per length-sorted mega-batch when train.group_by_length is on.
LENGTH_GROUP = 8


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


class TrainStep(nn.Module):
    """Model + objective as one module, so Accelerate wraps every trainable parameter."""

    def __init__(self, model: VLM, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict, replay: dict | None = None):
        return self.objective(self.model, batch, replay)


def batch_sampler(lengths: list[int], cfg: Config) -> LengthGroupedBatchSampler:
    """Shuffled batches whose order depends only on (seed, epoch), so resume can skip into
    an epoch: length-grouped (train.group_by_length) or plain (group of 1, equal lengths)."""
    tc = cfg.train
    if not tc.group_by_length:
        return LengthGroupedBatchSampler([0] * len(lengths), tc.batch_size, seed=tc.seed, group=1)
    return LengthGroupedBatchSampler(lengths, tc.batch_size, seed=tc.seed, group=LENGTH_GROUP)


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after saving the checkpoint of its current step."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(f"training stopped by signal {signum}; saved {checkpoint}; resume with train.resume=latest")
        self.checkpoint, self.signum = checkpoint, signum


@dataclass
class _Batches:
    """The training batches of an epoch: a length-grouped map-style dataset, or a stream
    from shards (then moved to the device here and ended together on every rank)."""

    trainset: TrainSet
    loader: DataLoader
    sampler: LengthGroupedBatchSampler | None
    report: LoadReport
    accelerator: Accelerator
    size: int | str

    @property
    def stream(self) -> ShardStream | None:
        return self.trainset.stream

    # A stream's position after the last batch the loop took (this rank), for the checkpoint.
    position: StreamPosition | None = None

    def skip(self, epoch: int, batches_done: int, saved: dict | None = None) -> None:
        """Resume inside `epoch` after `batches_done` batches (all processes together); a
        stream continues from this rank's entry of `saved` (the checkpoint's "stream"
        record, `stream_record`), exact even after skipped records."""
        if self.stream is None:
            self.sampler.skip_next(batches_done)
            return
        acc = self.accelerator
        position = rank_position(saved, acc.process_index, acc.num_processes, epoch)
        if position is not None:
            self.stream.resume(position)
            return
        if saved:
            console.print(f"[yellow]resume: the checkpoint's stream positions (world {saved.get('world')}) do not "
                          f"apply to rank {acc.process_index} of {acc.num_processes} in epoch {epoch}; continuing "
                          f"after {batches_done} batches, which repeats or drops records if some were skipped")
        per_rank = batches_done // acc.num_processes
        self.stream.skip(per_rank * self.loader.batch_size, epoch=epoch)

    def stream_record(self) -> dict:
        """{"stream": {"world": n, "ranks": [position dict per rank]}} for the training
        state, gathered from every rank (collective: call it on all of them); {} for
        map-style data (its position is `batches_done`)."""
        if self.stream is None:
            return {}
        mine = self.position.as_dict() if self.position is not None else None
        return {"stream": {"world": self.accelerator.num_processes, "ranks": gather_object([mine])}}

    def epoch(self, epoch: int):
        if self.stream is None:
            self.loader.set_epoch(epoch)  # one process: Accelerate's loader passes it on
            self.sampler.set_epoch(epoch)  # several: its batch-sampler shard does not
            yield from self.loader
            return
        self.stream.set_epoch(epoch)
        self.position = self.stream.position(self.loader.num_workers)
        for batch in self.loader:
            if not _agree(self.accelerator, False):  # every rank still has a batch
                self.position.advance(batch["index"].tolist())  # streamed items' index = position
                yield send_to_device(batch, self.accelerator.device)
            else:
                return
        _agree(self.accelerator, True)  # tell the ranks still iterating that this one ran out


def _batches(model: VLM, objective: Objective, data: TrainData | None, cfg: Config, kind: str,
             accelerator: Accelerator) -> _Batches:
    tc = cfg.train
    if cfg.data.shards:
        trainset = build_stream(model, cfg, accelerator.process_index, accelerator.num_processes, kind=kind,
                                objective=objective)
        loader = DataLoader(trainset.dataset, batch_size=tc.batch_size, collate_fn=trainset.collator)
        return _Batches(trainset, loader, None, trainset.stream.report, accelerator, f"{trainset.stream.total} streamed")
    if data is None:
        data = TrainData.prepare(model, cfg, kind)
    elif data.kind != kind:
        raise ValueError(f"recipe {cfg.recipe} trains on {kind!r} data, got {data.kind!r}")
    data.report.check_skip_fraction(cfg.data.max_skip_fraction, "training data")
    trainset = build_trainset(model, objective, data, cfg)
    sampler = batch_sampler(trainset.lengths, cfg)
    # A private generator: the loader draws a seed from it each epoch, which would
    # otherwise shift the global torch RNG between an interrupted run and its resumption.
    loader = DataLoader(trainset.dataset, batch_sampler=sampler, collate_fn=trainset.collator,
                        generator=torch.Generator().manual_seed(tc.seed))
    return _Batches(trainset, loader, sampler, data.report, accelerator, len(trainset.dataset))


def _groups(loader, k: int):
    """Micro-batches in groups of k (one optimizer step each); the epoch's last group may
    be shorter."""
    group: list[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def _agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is True on any (a stop request must reach all ranks
    before the collective save)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(int(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum") > 0)


def train(cfg: Config, model: VLM | None = None, data: TrainData | None = None) -> TrainResult:
    """Train `cfg.recipe` for `cfg.train.max_steps` optimizer steps, from scratch or from
    `cfg.train.resume`; returns the final checkpoint folder and the logged history."""
    t0 = time.perf_counter()
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
            console.print(f"[yellow]resume: config differs from {resume_from} in {', '.join(changed)}; the run will not match an uninterrupted one")
        checkpoint.load_weights(resume_from, model, objective)
    elif tc.init_from:
        model.load_trainable(tc.init_from)
        console.print(f"initialised trainable weights from {tc.init_from}")
    batches = _batches(model, objective, data, cfg, recipe.data, accelerator)
    step_module = TrainStep(model, objective)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    if accelerator.state.deepspeed_plugin is not None:  # batches come from a batch sampler
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tc.batch_size
    if batches.stream is None:
        step_module, optimizer, batches.loader = accelerator.prepare(step_module, optimizer, batches.loader)
    else:  # a stream splits itself across ranks: Accelerate must not shard it again
        step_module, optimizer = accelerator.prepare(step_module, optimizer)
    # FSDP2 replaces the parameters at prepare(): clip and guard the ones that train now.
    params = [p for p in step_module.parameters() if p.requires_grad]
    if tc.compile:  # after prepare, as FSDP2 wants; the layers' parameter names do not change
        console.print(f"compiling {compiled.set_compiled(model.llm, True)} decoder layers (the first steps are slow)")

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    state = TrainingState()
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from, optimizer, scheduler, accelerator.scaler,
                                               accelerator=accelerator, module=step_module)
        batches.skip(state.epoch, state.batches_done, state.extra.get("stream"))
        console.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    elif latest := checkpoint.find_latest(out_dir):
        console.print(f"[yellow]{out_dir} already holds checkpoints (newest {latest.name}); this run replaces those of the same steps")

    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    guard.load_state_dict(state.extra.get("nonfinite", {}))

    def save(extra: dict | None = None) -> Path:
        """The checkpoint of this step: written by the main process, with every rank
        gathering the shards first under FSDP2 / DeepSpeed (train/sharded.py)."""
        state.extra = (extra or state.extra) | {"nonfinite": guard.state_dict()} | batches.stream_record()
        path = out_dir / f"checkpoint-{state.step}"
        if sharded.is_sharded(accelerator):
            checkpoint.save_checkpoint_sharded(accelerator, out_dir, state, step_module, model, objective, optimizer,
                                               scheduler, accelerator.scaler)
        elif accelerator.is_main_process:
            checkpoint.save_checkpoint(out_dir, state, model, objective, optimizer, scheduler, accelerator.scaler)
        accelerator.wait_for_everyone()
        return path

    console.print(
        f"[bold]{recipe.name}[/] ({recipe.paper}): {batches.size} samples, batch {tc.batch_size}"
        f" x accum {tc.grad_accum_steps} x {accelerator.num_processes} processes, {tc.max_steps} steps,"
        f" trains {', '.join(trains)}"
    )
    step_module.train()
    model.llm.eval()  # no dropout in frozen or partly trained backbones
    model.vision.eval()
    runlog = RunLog(out_dir, tc.max_steps, enabled=accelerator.is_main_process, start_step=state.step, title=cfg.recipe,
                    samples_per_step=tc.batch_size * tc.grad_accum_steps * accelerator.num_processes, console=console)
    logged: list[dict[str, float]] = []
    t_log = time.perf_counter()
    with runlog, StopSignal() as stop, explain_oom(tc.batch_size, tc.grad_accum_steps):
        while state.step < tc.max_steps and not _agree(accelerator, stop.requested):
            fresh_epoch, stepped = state.batches_done == 0, False
            for group in _groups(batches.epoch(state.epoch), tc.grad_accum_steps):
                stepped = True
                parts = accumulate_gradients(accelerator, step_module, objective, group)
                grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                ids = [i for b in group for i in b["index"].tolist()]
                if not guard.check(torch.tensor(parts.get("loss", 0.0)), params, state.step, ids, grad_norm=grad_norm):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                state.batches_done += len(group) * accelerator.num_processes
                logged.append(parts)
                runlog.step(state.step, parts)
                if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                    entry = {k: sum(p.get(k, 0.0) for p in logged) / len(logged) for k in logged[-1]}
                    entry |= {"step": state.step, "lr": scheduler.get_last_lr()[0],
                              "s_per_step": (time.perf_counter() - t_log) / len(logged), "grad_norm": float(grad_norm)}
                    state.history.append(entry)
                    runlog.log(state.step, entry)
                    logged, t_log = [], time.perf_counter()
                stopping = _agree(accelerator, stop.requested)
                if stopping or (tc.save_every and state.step % tc.save_every == 0 and state.step < tc.max_steps):
                    save()
                    if accelerator.is_main_process:
                        checkpoint.prune_checkpoints(out_dir, tc.keep_checkpoints, state.step)
                if state.step >= tc.max_steps or stopping:
                    break
            else:  # the epoch ran out (not a break at max_steps)
                if fresh_epoch and not stepped:  # would loop for ever
                    raise ValueError(f"epoch {state.epoch} gave no batch of {tc.batch_size} x {tc.grad_accum_steps}: "
                                     f"too few usable samples ({batches.report.summary()})")
                state.epoch, state.batches_done = state.epoch + 1, 0
                if batches.report.total_skipped() and accelerator.is_main_process:
                    console.print(f"[yellow]end of epoch {state.epoch}: {batches.report.summary()}")
    if stop.requested:
        console.print(f"[yellow]stopped by signal {stop.signum} at step {state.step}; resume with train.resume=latest")
        raise TrainingInterrupted(out_dir / f"checkpoint-{state.step}", stop.signum or 15)
    if truncated := batches.trainset.truncated():
        console.print(f"[yellow]data: {truncated} training sequences truncated to the length limit")
    final = save({"skipped": batches.report.as_dict(), "truncated": truncated})
    if accelerator.is_main_process:
        (out_dir / "latest.tmp").write_text(final.name)
        os.replace(out_dir / "latest.tmp", out_dir / "latest")
        with open(out_dir / "history.jsonl", "w") as f:
            for entry in state.history:
                f.write(json.dumps(entry) + "\n")
    return TrainResult(final, state.history, time.perf_counter() - t0, model, objective, dict(state.extra))
