"""The evaluation after training (`vlmalign train`, `eval.at_end`): what the recipe's
`evals` name, written as `metrics.json` next to the checkpoint, logged to TensorBoard,
printed as a table and drawn as plots in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from vlmalign.config import Config
from vlmalign.eval.evaluate import METRICS_NAME, EvalData, comparison_table, evaluate
from vlmalign.eval.plots import write_run_plots
from vlmalign.eval.report import write_metrics
from vlmalign.models.vlm import VLM
from vlmalign.train.recipes import RECIPES
from vlmalign.train.runlog import log_eval_metrics

console = Console()

# Embeddings drawn in the run's similarity-matrix and projection plots.
PLOT_PAIRS = 32


def write_plots(model: VLM, data: EvalData, run_dir: Path, history: list[dict], metrics: dict[str, float]) -> list[Path]:
    """The run's PNGs: loss curves, R@K bars, and (from the first PLOT_PAIRS held-out pairs)
    the similarity matrix and the 2-D projection of image and text embeddings."""
    n = min(PLOT_PAIRS, len(data.captions))
    img = txt = None
    if n:
        with torch.no_grad():
            img = model.embed_images(data.features[data.text_to_image[:n]].to(model.projector_device()))
            txt = model.embed_texts(data.captions[:n])
    return write_run_plots(run_dir, history, metrics, img, txt, data.captions[:n] if n else None)


def evaluate_mcq_split(model: VLM, cfg: Config) -> dict[str, float]:
    """Multiple-choice accuracy (likelihood and generation) on the held-out MCQ file."""
    from vlmalign.data.splits import mcq_items
    from vlmalign.eval.mcq import evaluate_mcq

    return evaluate_mcq(model, mcq_items(cfg.data))


def evaluate_captions(model: VLM, cfg: Config) -> dict[str, float]:
    """CIDEr / BLEU of generated captions for the held-out images (needs the `caption`
    extra): plain LLaVA stage-1 captioning after alignment, a chat-template request after
    instruction tuning."""
    from vlmalign.data.splits import eval_samples
    from vlmalign.eval.captioning import caption_prompt, evaluate_captioning

    prompt = caption_prompt(model.tokenizer) if RECIPES.get(cfg.recipe).data == "conversations" else ""
    return evaluate_captioning(model, eval_samples(cfg.data), prompt=prompt)


def evaluate_run(model: VLM, cfg: Config, checkpoint: Path, history: list[dict] | None = None,
                 captions: bool = False, training: dict | None = None) -> dict[str, float]:
    """Run the recipe's evaluations on the held-out split (and captioning when asked);
    write, log, print and plot. `training`: what the training run skipped (its bad
    records, truncations, non-finite steps), kept in the metrics JSON."""
    evals = RECIPES.get(cfg.recipe).evals
    metrics: dict[str, float] = {}
    meta: dict = {"recipe": cfg.recipe, "checkpoint": str(checkpoint)}
    if training is None and (checkpoint / "trainer_state.json").exists():
        record = json.loads((checkpoint / "trainer_state.json").read_text())
        training = {k: record[k] for k in ("skipped", "truncated", "nonfinite") if k in record}
    if training:
        meta["training"] = training
    data = None
    if "retrieval" in evals:
        data = EvalData.prepare(model, cfg)
        metrics |= evaluate(model, data, cfg)
        meta["eval_skipped"] = data.report.as_dict()
    if "mcq" in evals:
        metrics |= evaluate_mcq_split(model, cfg)
    if captions:
        metrics |= evaluate_captions(model, cfg)
    if history:
        last = history[-1]
        metrics |= {f"train_{k}": float(v) for k, v in last.items() if k.endswith("_loss")}
    write_metrics(checkpoint / METRICS_NAME, metrics, meta=meta)
    run_dir = checkpoint.parent
    step = int(history[-1]["step"]) if history else 0
    log_eval_metrics(run_dir, step, metrics)  # the table below is what the terminal shows
    console.print(comparison_table({cfg.recipe: metrics}, f"{cfg.recipe}: held-out evaluation"))
    if data is not None:
        write_plots(model, data, run_dir, history or [], metrics)
    else:
        write_run_plots(run_dir, history or [], metrics)
    return metrics
