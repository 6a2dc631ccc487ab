"""The evaluation of a run (`vlmalign train` at the end, `vlmalign eval`): what the
recipe's `evals` name and the `eval.*` switches allow, on the data the run trained on.

Before computing anything it prints what it will evaluate (each task, its count and
source, and one line per task left out naming the file that would enable it) and, for
a long evaluation, an estimate of its time. It writes `metrics.json` (with the count
behind every accuracy and each task's skips apart), `skipped.jsonl` (every skipped
record), the held-out split of a user's file (`heldout.jsonl`), the TensorBoard scalars
and the plots: after training next to the checkpoint and into its run folder; for
`vlmalign eval`, all into `out_dir`, so the checkpoint folder is never written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from vlmalign.config import Config
from vlmalign.data.images import BadImageError, load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.eval.evaluate import METRICS_NAME, EvalData, EvalPlan, comparison_table, evaluate
from vlmalign.eval.plots import write_run_plots
from vlmalign.eval.report import write_metrics
from vlmalign.models.vlm import VLM
from vlmalign.train.recipes import RECIPES
from vlmalign.train.runlog import log_eval_metrics

console = Console()

# Embeddings drawn in the run's similarity-matrix and projection plots.
PLOT_PAIRS = 32
# Below this many images an evaluation takes seconds: no time estimate is measured.
ESTIMATE_FROM_IMAGES = 64
SKIPPED_NAME = "skipped.jsonl"
HELDOUT_NAME = "heldout.jsonl"


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


def evaluate_mcq_split(model: VLM, cfg: Config, items: list | None = None) -> dict[str, float]:
    """Multiple-choice accuracy (likelihood and generation) on the held-out MCQ file."""
    from vlmalign.data.splits import mcq_items
    from vlmalign.eval.mcq import evaluate_mcq

    return evaluate_mcq(model, items if items is not None else mcq_items(cfg.data))


def evaluate_captions(model: VLM, cfg: Config) -> dict[str, float]:
    """CIDEr / BLEU of generated captions for the held-out images (needs the `caption`
    extra): plain LLaVA stage-1 captioning after alignment, a chat-template request after
    instruction tuning."""
    from vlmalign.data.splits import eval_samples
    from vlmalign.eval.captioning import caption_prompt, evaluate_captioning

    prompt = caption_prompt(model.tokenizer) if RECIPES.get(cfg.recipe).data == "conversations" else ""
    return evaluate_captioning(model, eval_samples(cfg.data), prompt=prompt)


@torch.no_grad()
def estimate_seconds(model: VLM, plan: EvalPlan | None, mcq_items: list | None = None, probe: int = 4) -> float | None:
    """Seconds the evaluation of `plan` and `mcq_items` should take, from the time of the
    tower on `probe` of their images and of the LLM on `probe` of their texts; None when
    there is nothing to time."""
    mcq_items = mcq_items or []
    paths = (plan.images() if plan is not None else []) + [it.image for it in mcq_items if it.image is not None]
    loaded = []
    for p in paths[: 4 * probe]:
        try:
            loaded.append(load_image(p))
        except BadImageError:
            continue
        if len(loaded) == probe:
            break
    texts = [s.caption for s in plan.samples] + [it.caption for it in plan.items] if plan is not None else []
    texts = (texts + [it.question for it in mcq_items])[:probe]
    if not loaded and not texts:
        return None
    dev = model.projector_device()
    per_image = per_text = 0.0
    if loaded:
        t = time.perf_counter()
        model.tower_features(model.preprocess(loaded).to(dev))
        per_image = (time.perf_counter() - t) / len(loaded)
    if texts:
        t = time.perf_counter()
        model.text_states(texts)
        per_text = (time.perf_counter() - t) / len(texts)
    passes = plan.text_passes() if plan is not None else 0
    # an MCQ item: its options scored and a few generated tokens, about 10 text passes
    return len(paths) * per_image + passes * per_text + len(mcq_items) * 10 * per_text


def announce(plan: EvalPlan | None, mcq_lines: list[str], estimate: float | None) -> None:
    """Print what the evaluation will run on, what it leaves out and why, and its time."""
    lines = (plan.describe() if plan is not None else []) + mcq_lines
    head = "evaluation" + (f" (about {estimate:.0f} s)" if estimate is not None else "")
    console.print(f"[bold]{head}:[/]")
    for line in lines:
        console.print(f"  {line}", markup=False, highlight=False)


def _mcq_plan(cfg: Config) -> tuple[list | None, list[str], LoadReport]:
    """(items, or None when MCQ does not run; description lines; load report)."""
    from vlmalign.data.splits import mcq_items, mcq_path

    report = LoadReport()
    if not cfg.eval.mcq:
        return None, ["multiple choice: off (eval.mcq=false)"], report
    path = mcq_path(cfg.data)
    if path is None:
        return None, ["multiple choice: skipped; set data.mcq_file=FILE (ScienceQA-style JSON: question, "
                      "choices, answer, image) to run it"], report
    items = mcq_items(cfg.data, report)
    return items, [f"multiple choice: {len(items)} items from {path}"], report


def _drop_eval_skips(path: Path) -> None:
    """Remove the lines an earlier evaluation wrote (`task` "eval:...") from skipped.jsonl."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if not json.loads(line).get("task", "").startswith("eval:")]
    path.write_text("".join(kept), encoding="utf-8")


def _write_heldout(path: Path, samples: list[Sample]) -> None:
    """The held-out records (id, image, caption), one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "image": str(s.image), "caption": s.caption}, ensure_ascii=False) + "\n")


def evaluate_run(model: VLM, cfg: Config, checkpoint: Path, history: list[dict] | None = None,
                 captions: bool = False, training: dict | None = None, out_dir: Path | None = None) -> dict[str, float]:
    """Run the recipe's evaluations (and captioning when asked) on the run's held-out data;
    write, log, print and plot. `training`: what the training run skipped (its bad
    records, truncations, non-finite steps), kept in the metrics JSON. `out_dir`: where
    everything goes (`vlmalign eval --out`); None after training: metrics.json next to the
    checkpoint, the rest into its run folder."""
    from vlmalign.data.splits import holds_out

    checkpoint = Path(checkpoint)
    evals = RECIPES.get(cfg.recipe).evals
    metrics_path = (out_dir / METRICS_NAME) if out_dir is not None else checkpoint / METRICS_NAME
    run_dir = out_dir if out_dir is not None else checkpoint.parent
    metrics: dict[str, float] = {}
    meta: dict = {"recipe": cfg.recipe, "checkpoint": str(checkpoint)}
    if training is None and (checkpoint / "trainer_state.json").exists():
        record = json.loads((checkpoint / "trainer_state.json").read_text())
        training = {k: record[k] for k in ("skipped", "truncated", "nonfinite") if k in record}
    if training:
        meta["training"] = training
    plan = EvalPlan.load(cfg) if "retrieval" in evals else None
    mcq_items, mcq_lines, mcq_report = _mcq_plan(cfg) if "mcq" in evals else (None, [], LoadReport())
    n_images = len(plan.images()) if plan is not None else 0
    estimate = None
    if n_images + len(mcq_items or []) > ESTIMATE_FROM_IMAGES:
        estimate = estimate_seconds(model, plan, mcq_items)
    announce(plan, mcq_lines, estimate)
    skipped_path = run_dir / SKIPPED_NAME
    _drop_eval_skips(skipped_path)  # an evaluation run again replaces its own lines, not the training run's
    data = None
    if plan is not None:
        if holds_out(cfg.data) and plan.samples:
            _write_heldout(run_dir / HELDOUT_NAME, plan.samples)
            meta["heldout"] = {"file": str(run_dir / HELDOUT_NAME), "pairs": len(plan.samples),
                               "of": cfg.data.train_file, "seed": cfg.data.heldout_seed}
        if plan.samples or plan.items or plan.kp_captions or plan.zs_images:
            data = EvalData.prepare(model, cfg, plan=plan)
            metrics |= evaluate(model, data, cfg)
            meta["eval_skipped"] = data.skip_summary()
            for task, report in data.reports.items():
                if report.records:
                    report.write_jsonl(skipped_path, task=f"eval:{task}")
        meta["eval_plan"] = plan.describe()
    if mcq_items:
        metrics |= evaluate_mcq_split(model, cfg, mcq_items)
        meta.setdefault("eval_skipped", {})["mcq"] = mcq_report.as_dict()
        if mcq_report.records:
            mcq_report.write_jsonl(skipped_path, task="eval:mcq")
    if captions:
        metrics |= evaluate_captions(model, cfg)
    if history:
        last = history[-1]
        metrics |= {f"train_{k}": float(v) for k, v in last.items() if k.endswith("_loss")}
    write_metrics(metrics_path, metrics, meta=meta)
    step = int(history[-1]["step"]) if history else 0
    log_eval_metrics(run_dir, step, metrics)  # the table below is what the terminal shows
    console.print(comparison_table({cfg.recipe: metrics}, f"{cfg.recipe}: held-out evaluation"))
    if not metrics:
        console.print("[yellow]nothing was evaluated:[/] see the lines above for the files that enable each task")
    if data is not None:
        write_plots(model, data, run_dir, history or [], metrics)
    else:
        write_run_plots(run_dir, history or [], metrics)
    return metrics


def default_eval_dir(checkpoint: Path) -> Path:
    """`vlmalign eval`'s output folder when no `--out` is given: beside the checkpoint,
    never inside it (`runs/x/checkpoint-90` -> `runs/x/eval-checkpoint-90`)."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent / f"eval-{checkpoint.name}"
