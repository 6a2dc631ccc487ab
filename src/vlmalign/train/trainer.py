"""The training loop, on Accelerate: AdamW, warmup + cosine, accumulation, clipping,
per-part loss logging, periodic checkpoints.

`train(cfg)` builds everything from the config. The demo passes an already loaded `model`
and a `TrainData` so several recipes share one backbone and one set of cached features.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from vlmalign import cache
from vlmalign.config import Config
from vlmalign.data.collate import CaptionCollator, CaptionDataset
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.sampler import LengthGroupedBatchSampler
from vlmalign.data.splits import train_samples
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train.recipes import RECIPES, apply_recipe

log = logging.getLogger(__name__)
console = Console()

OBJECTIVE_NAME = "objective.safetensors"
STATE_NAME = "trainer_state.json"


@dataclass
class TrainData:
    """Training samples with what can be computed once: tower features (frozen tower) and
    a text-state cache (frozen text path)."""

    samples: list[Sample]
    features: torch.Tensor | None
    text_cache: cache.TextStateCache
    report: LoadReport = field(default_factory=LoadReport)

    @classmethod
    def prepare(cls, model: VLM, cfg: Config, text_cache: cache.TextStateCache | None = None) -> TrainData:
        report = LoadReport()
        samples = train_samples(cfg.data, report)
        features = None
        if cfg.train.cache_vision_features and cfg.vision.frozen:
            t = time.perf_counter()
            features, samples = cache.tower_features(model, samples, report=report)
            log.info("cached tower features for %d images in %.1f s", len(samples), time.perf_counter() - t)
        if report.total_skipped():
            console.print(f"[yellow]data: {report.summary()}")
        if not samples:
            raise ValueError(f"no usable training samples in {cfg.data.root}")
        return cls(samples, features, text_cache or cache.TextStateCache(), report)


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict]
    wall_time_s: float
    model: VLM
    objective: Objective


class TrainStep(nn.Module):
    """Model + objective as one module, so Accelerate wraps every trainable parameter."""

    def __init__(self, model: VLM, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict):
        return self.objective(self.model, batch)


def text_path_frozen(model: VLM) -> bool:
    return not any(p.requires_grad for p in model.llm.parameters())


def save_checkpoint(directory: Path, model: VLM, objective: Objective, state: dict) -> Path:
    """One folder: trainable weights + resolved config (VLM.from_pretrained reloads it),
    the objective's learnable temperature, and the trainer state."""
    model.save_pretrained(directory)
    obj = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
    if obj:
        save_file(obj, str(directory / OBJECTIVE_NAME))
    (directory / STATE_NAME).write_text(json.dumps(state, indent=2))
    return directory


def _format_parts(parts: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in parts.items())


def train(cfg: Config, model: VLM | None = None, data: TrainData | None = None) -> TrainResult:
    """Train `cfg.recipe` for `cfg.train.max_steps` optimizer steps; returns the final
    checkpoint folder and the logged history."""
    t0 = time.perf_counter()
    tc = cfg.train
    recipe = RECIPES.get(cfg.recipe)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum_steps,
        mixed_precision=tc.mixed_precision,
        cpu=not torch.cuda.is_available(),
    )
    set_seed(tc.seed)
    if model is None:
        model = VLM.build(cfg)
    model.cfg = cfg
    apply_recipe(model, recipe)
    model.to(accelerator.device)
    objective = Objective(cfg.objective, gather=accelerator.num_processes > 1).to(accelerator.device)
    if data is None:
        data = TrainData.prepare(model, cfg)

    text_states = None
    needs_text = objective.uses_embeddings or cfg.embedding.centre
    if needs_text and tc.cache_text_embeddings and text_path_frozen(model):
        text_states = data.text_cache.states(model, [s.caption for s in data.samples])
    if cfg.embedding.centre and not bool(model.embed_mean_ready):
        if text_states is None:
            raise ValueError("embedding.centre needs train.cache_text_embeddings with a frozen text path")
        model.set_embedding_mean(text_states[: cfg.embedding.centre_samples])
    if not objective.uses_embeddings:
        text_states = None

    dataset = CaptionDataset(data.samples, data.features, text_states, model.preprocess)
    collator = CaptionCollator(
        model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens
    )
    if tc.group_by_length:
        lengths = [len(collator.caption_ids(s.caption)) for s in data.samples]
        collator.truncated = 0
        batches = LengthGroupedBatchSampler(lengths, tc.batch_size, seed=tc.seed)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collator)
    else:
        loader = DataLoader(
            dataset,
            batch_size=tc.batch_size,
            shuffle=True,
            drop_last=len(dataset) >= tc.batch_size,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(tc.seed),
        )
    step_module = TrainStep(model, objective)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    step_module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)

    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    history: list[dict] = []
    running: dict[str, float] = {}
    step, micro, t_log = 0, 0, time.perf_counter()
    console.print(
        f"[bold]{recipe.name}[/] ({recipe.paper}): {len(dataset)} samples, batch {tc.batch_size}"
        f" x accum {tc.grad_accum_steps}, {tc.max_steps} steps, trains {', '.join(recipe.trains)}"
    )
    step_module.train()
    model.llm.eval()  # no dropout in frozen or partly trained backbones
    model.vision.eval()
    while step < tc.max_steps:
        for batch in loader:
            with accelerator.accumulate(step_module):
                loss, parts = step_module(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step}: {_format_parts({k: float(v) for k, v in parts.items()})}")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            for k, v in parts.items():
                if k != "ntp_tokens":
                    running[k] = running.get(k, 0.0) + float(v.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if step % tc.log_every == 0 or step == tc.max_steps:
                dt = time.perf_counter() - t_log
                entry = {k: v / micro for k, v in running.items()}
                entry |= {"step": step, "lr": scheduler.get_last_lr()[0], "s_per_step": dt / tc.log_every}
                if grad_norm is not None:
                    entry["grad_norm"] = float(grad_norm)
                history.append(entry)
                console.print(f"  step {step:4d}  " + _format_parts({k: entry[k] for k in running}) + f"  lr {entry['lr']:.2e}  {entry['s_per_step']:.2f} s/step")
                running, micro, t_log = {}, 0, time.perf_counter()
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                save_checkpoint(out_dir / f"checkpoint-{step}", model, objective, {"step": step})
            if step >= tc.max_steps:
                break
    if collator.truncated:
        console.print(f"[yellow]data: {collator.truncated} captions truncated to {cfg.data.max_caption_tokens} tokens")
    final = save_checkpoint(
        out_dir / f"checkpoint-{step}",
        model,
        objective,
        {"step": step, "history": history, "skipped": data.report.as_dict(), "truncated": collator.truncated},
    )
    (out_dir / "latest").write_text(final.name)
    with open(out_dir / "history.jsonl", "w") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")
    return TrainResult(final, history, time.perf_counter() - t0, model, objective)
