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
from vlmalign.eval.evaluate import METRICS_NAME, EvalData, evaluate
from vlmalign.eval.report import print_table, write_metrics
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.trainer import TrainData, train

console = Console()

RECIPES = ("align", "align-cg", "align-clip")

# Full demo: ~10 minutes on a 2-core CPU; quick: ~2 minutes (FINDINGS.md step costs).
FULL = {"data.shapes_n": 1280, "train.max_steps": 90, "train.batch_size": 16, "data.eval_max_samples": 128}
QUICK = {"data.shapes_n": 400, "train.max_steps": 16, "train.batch_size": 16, "data.eval_max_samples": 64}

COLUMNS = {
    "emb_i2t_R@1": "emb i2t R@1",
    "emb_i2t_R@5": "emb i2t R@5",
    "emb_t2i_R@1": "emb t2i R@1",
    "emb_t2i_R@5": "emb t2i R@5",
    "patch_i2t_R@5": "patch i2t R@5",
    "patch_t2i_R@5": "patch t2i R@5",
    "comp_emb_mean": "comp (emb)",
    "comp_patch_mean": "comp (patch)",
    "heldout_ntp_loss": "NTP loss",
    "train_s": "train s",
}


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
    train_data = TrainData.prepare(model, base, text_cache)
    eval_data = EvalData.prepare(model, base)
    console.print(f"tower features for {len(train_data.samples)} train + {len(eval_data.images)} eval images in {time.perf_counter() - t:.1f} s")

    results: dict[str, dict[str, float]] = {}
    for name in RECIPES:
        cfg = load_config(recipe_config(name), common + [f"train.out_dir={out / name}"])
        model.projector.load_state_dict(initial)  # same initial weights for every recipe
        result = train(cfg, model=model, data=train_data)
        metrics = evaluate(model, eval_data, cfg, text_cache)
        metrics["train_s"] = result.wall_time_s
        write_metrics(result.checkpoint / METRICS_NAME, metrics, meta={"recipe": name, "seed": seed})
        results[name] = metrics
        console.print(f"  {name}: trained in {result.wall_time_s:.0f} s, evaluated in {metrics['eval_seconds']:.0f} s")
    total = time.perf_counter() - t0
    rows = {name: {COLUMNS[k]: m[k] for k in COLUMNS if k in m} for name, m in results.items()}
    print_table(rows, title=f"shapes demo: {len(eval_data.captions)} held-out pairs, seed {seed} (chance R@1 {100 / max(1, len(eval_data.captions)):.1f}%, R@5 {500 / max(1, len(eval_data.captions)):.1f}%)",
                formats={"NTP loss": "{:.3f}", "train s": "{:.0f}"})
    console.print("emb = prompted last-token embeddings (Ak et al.); patch = CG-VLM patch-token similarity; comp = SugarCrepe-style accuracy, mean over categories (chance 50%)")
    console.print(f"total wall time {total:.0f} s; results in {out}")
    (out / "demo_summary.json").write_text(json.dumps({"seed": seed, "quick": quick, "total_s": total, "results": results}, indent=2))
    return results
