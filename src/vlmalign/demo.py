"""`vlmalign demo`: the three alignment recipes on `shapes`, with the real packaged models,
from the same initial weights on the same data, compared in one table.

Everything that does not depend on the recipe is done once and shared: the loaded
backbones, the frozen tower features, the frozen text states (and the centring mean).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console

from vlmalign.cache import TextStateCache
from vlmalign.config import load_config
from vlmalign.eval.evaluate import METRICS_NAME, EvalData, comparison_table, evaluate
from vlmalign.eval.html_report import write_report
from vlmalign.eval.report import write_metrics
from vlmalign.eval.run import write_plots
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import TrainData
from vlmalign.train.trainer import train

console = Console()

RECIPES = ("align", "align-cg", "align-clip")

# Sized for a 2-core CPU: full under 10 minutes, quick (a smoke run: too few steps to
# separate the recipes reliably) about 2 minutes. 800 scenes -> 640 train = 40 steps x 16,
# 80 held-out pairs.
FULL = {"data.shapes_n": 800, "train.max_steps": 40, "train.batch_size": 16, "data.eval_max_samples": 80, "train.log_every": 5}
QUICK = {"data.shapes_n": 200, "train.max_steps": 12, "train.batch_size": 8, "data.eval_max_samples": 32, "train.log_every": 4}

def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, extra: list[str] | None = None,
             llm: str = "smollm2-135m", tower: str = "efficientnet-lite0") -> dict[str, dict[str, float]]:
    """Train and evaluate align, align-cg and align-clip; return {recipe: metrics}."""
    t0 = time.perf_counter()
    out = Path(out)
    settings = QUICK if quick else FULL
    common = [f"{k}={v}" for k, v in settings.items()] + [
        f"data.root={out / 'shapes'}",
        f"data.shapes_seed={seed}",
        f"train.seed={seed}",
        f"llm.name={llm}",
        f"vision.tower={tower}",
    ] + list(extra or [])
    base = load_config(recipe_config("align"), common)
    console.print(f"[bold]vlmalign demo[/] ({'quick' if quick else 'full'}): {', '.join(RECIPES)} on shapes, seed {seed}")
    set_seed(seed)
    t = time.perf_counter()
    model = VLM.build(base)
    console.print(f"loaded {base.llm.name} + {base.vision.tower} in {time.perf_counter() - t:.1f} s")
    initial = copy.deepcopy(model.projector.state_dict())
    t = time.perf_counter()
    text_cache = TextStateCache()
    train_data = TrainData.prepare(model, base, "captions", text_cache)
    eval_data = EvalData.prepare(model, base, benchmarks=False)  # the demo compares recipes; `vlmalign eval` adds Karpathy and zero-shot
    console.print(f"tower features for {len(train_data.samples)} train + {len(eval_data.images)} eval images in {time.perf_counter() - t:.1f} s")

    results: dict[str, dict[str, float]] = {}
    for name in RECIPES:
        cfg = load_config(recipe_config(name), common + [f"train.out_dir={out / name}"])
        model.projector.load_state_dict(initial)  # same initial weights for every recipe
        result = train(cfg, model=model, data=train_data)
        metrics = evaluate(model, eval_data, cfg, text_cache)
        metrics["train_s"] = result.wall_time_s
        metrics["train_ntp_loss"] = result.history[-1]["ntp_loss"] if result.history else float("nan")
        write_metrics(result.checkpoint / METRICS_NAME, metrics, meta={"recipe": name, "seed": seed})
        write_plots(model, eval_data, out / name, result.history, metrics)
        results[name] = metrics
        console.print(f"  {name}: trained in {result.wall_time_s:.0f} s, evaluated in {metrics['eval_seconds']:.0f} s")
    total = time.perf_counter() - t0
    n = max(1, len(eval_data.captions))
    console.print(comparison_table(results, f"shapes demo, seed {seed}: {n} held-out pairs (chance R@1 {100 / n:.1f}%, R@5 {500 / n:.1f}%)"))
    console.print(
        "emb = prompted last-token embeddings (Ak et al.); patch = CG-VLM patch-token similarity;\n"
        "comp = SugarCrepe-style accuracy, mean over hard-negative categories (chance 50%)"
    )
    console.print(f"total wall time {total:.0f} s; checkpoints and metrics.json under {out}")
    report = write_report([out / name for name in RECIPES], out / "report.html")
    console.print(f"plots under {out}/<recipe>/plots, comparison page {report}")
    (out / "demo_summary.json").write_text(json.dumps({"seed": seed, "quick": quick, "total_s": total, "results": results}, indent=2))
    return results
