"""`vlmalign demo`: the three alignment recipes on `shapes`, with the real packaged models,
from the same initial weights on the same data, compared in one table (through the
experiment runner: `--seeds` for several seeds, intervals in `table.md`).

Everything that does not depend on the recipe is done once and shared: the loaded
backbones, the frozen tower features, the frozen text states (and the centring mean).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console

from vlmalign.cache import TextStateCache
from vlmalign.config import load_config
from vlmalign.eval.evaluate import (
    METRICS_NAME,
    CachedTextEmbedder,
    EvalData,
    comparison_table,
    evaluate,
)
from vlmalign.eval.html_report import write_report
from vlmalign.eval.report import write_metrics
from vlmalign.eval.run import write_plots
from vlmalign.experiments import stats
from vlmalign.experiments.runner import Experiment, Metric, Variant, VariantResult, run_experiment
from vlmalign.experiments.scoring import embedding_items
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

@dataclass
class _Shared:
    common: list[str]
    model: VLM
    initial: dict
    text_cache: TextStateCache
    train_data: TrainData
    eval_data: EvalData
    out: Path


def _setup(common: list[str], out: Path):
    def setup(seed: int) -> _Shared:
        seeded = common + [f"train.seed={seed}"]
        base = load_config(recipe_config("align"), seeded)
        set_seed(seed)
        t = time.perf_counter()
        model = VLM.build(base)
        console.print(f"loaded {base.llm.name} + {base.vision.tower} in {time.perf_counter() - t:.1f} s")
        initial = copy.deepcopy(model.projector.state_dict())
        text_cache = TextStateCache()
        train_data = TrainData.prepare(model, base, "captions", text_cache)
        # the demo compares recipes; `vlmalign eval` adds Karpathy and zero-shot
        eval_data = EvalData.prepare(model, base, benchmarks=False)
        return _Shared(seeded, model, initial, text_cache, train_data, eval_data, out)

    return setup


def _recipe(name: str) -> Variant:
    def run(sh: _Shared, seed: int) -> VariantResult:
        run_dir = sh.out / (name if seed == 0 else f"{name}-seed{seed}")
        cfg = load_config(recipe_config(name), sh.common + [f"train.out_dir={run_dir}"])
        sh.model.projector.load_state_dict(sh.initial)  # same initial weights for every recipe
        sh.model.embed_mean_ready.fill_(False)  # each recipe estimates its own centring mean
        result = train(cfg, model=sh.model, data=sh.train_data)
        metrics = evaluate(sh.model, sh.eval_data, cfg, sh.text_cache)
        metrics["train_s"] = result.wall_time_s
        metrics["train_ntp_loss"] = result.history[-1]["ntp_loss"] if result.history else float("nan")
        write_metrics(result.checkpoint / METRICS_NAME, metrics, meta={"recipe": name, "seed": seed})
        write_plots(sh.model, sh.eval_data, run_dir, result.history, metrics)
        _, items = embedding_items(CachedTextEmbedder(sh.model, sh.text_cache), sh.eval_data)
        items = {f"emb_{k}" if not k.startswith("comp") else f"{k}_emb": v for k, v in items.items()}
        console.print(f"  {name}: trained in {result.wall_time_s:.0f} s, evaluated in {metrics['eval_seconds']:.0f} s")
        return VariantResult(metrics | {k: sum(v) / len(v) for k, v in items.items()}, items)

    return Variant(name, run, RECIPE_NOTES[name])


RECIPE_NOTES = {
    "align": "next-token loss only (LLaVA stage 1)",
    "align-cg": "+ patch-token contrastive (CG-VLM)",
    "align-clip": "+ CLIP loss on prompted embeddings (Ak et al.)",
}


def claims() -> list[stats.Claim]:
    return [
        stats.Claim("clip-retrieval", "joint NTP + CLIP alignment gives retrievable embeddings (text->image R@5)",
                    "emb_t2i_R@5", "align-clip", "align", 2.0, paper="Ak et al. 2024"),
        stats.Claim("cg-ntp", "the patch-token term lowers the held-out caption loss", "heldout_ntp_loss", "align-cg",
                    "align", 0.0, lower_is_better=True, paper="CG-VLM (Liu et al. 2023)"),
    ]


def metrics(n_pairs: int) -> list[Metric]:
    r5 = 500.0 / max(n_pairs, 1)
    return [
        Metric("emb_t2i_R@5", "text->image R@5, prompted embeddings", r5),
        Metric("emb_i2t_R@5", "image->text R@5, prompted embeddings", r5),
        Metric("patch_t2i_R@5", "text->image R@5, patch-token similarity", r5),
        Metric("comp_emb", "compositional accuracy (embeddings)", 50.0),
        Metric("heldout_ntp_loss", "held-out caption loss", None, lower_is_better=True, unit=""),
        Metric("train_s", "training time (s)", None, lower_is_better=True, unit=""),
    ]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, extra: list[str] | None = None,
             llm: str = "smollm2-135m", tower: str = "efficientnet-lite0",
             seeds: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Train and evaluate align, align-cg and align-clip on each seed (through the
    experiment runner: resumable, intervals over items and seeds); return {recipe: mean
    metrics over the seeds}."""
    t0 = time.perf_counter()
    out = Path(out)
    seeds = list(seeds) if seeds else [seed]
    settings = QUICK if quick else FULL
    common = [f"{k}={v}" for k, v in settings.items()] + [
        f"data.root={out / 'shapes'}", f"data.shapes_seed={seeds[0]}", f"llm.name={llm}", f"vision.tower={tower}",
    ] + list(extra or [])
    console.print(f"[bold]vlmalign demo[/] ({'quick' if quick else 'full'}): {', '.join(RECIPES)} on shapes, "
                  f"seeds {', '.join(map(str, seeds))}")
    n_pairs = load_config(recipe_config("align"), common).data.eval_max_samples
    exp = Experiment(
        name="demo", title="vlmalign demo: the three alignment recipes on shapes",
        variants=[_recipe(name) for name in RECIPES], seeds=seeds, setup=_setup(common, out),
        metrics=metrics(n_pairs), claims=claims(), settings={"common": common},
        data_files=lambda: [out / "shapes" / "train.jsonl", out / "shapes" / "test.jsonl"],
    )
    summary = run_experiment(exp, out, log=console.print)
    results: dict[str, dict[str, float]] = {}
    for name in RECIPES:
        recs = [r["metrics"] for r in summary["records"] if r["variant"] == name and r["seed"] in summary["seeds"]]
        keys = set.intersection(*(set(m) for m in recs)) if recs else set()
        results[name] = {k: sum(m[k] for m in recs) / len(recs) for k in keys}
    total = time.perf_counter() - t0
    n = int(next(iter(results.values())).get("eval_pairs", 0)) or 1
    console.print(comparison_table(results, f"shapes demo, seeds {', '.join(map(str, summary['seeds']))}: {n} held-out "
                                            f"pairs (chance R@1 {100 / n:.1f}%, R@5 {500 / n:.1f}%); means over seeds"))
    console.print(
        "emb = prompted last-token embeddings (Ak et al.); patch = CG-VLM patch-token similarity;\n"
        "comp = SugarCrepe-style accuracy, mean over hard-negative categories (chance 50%)"
    )
    for c in summary["claims"]:
        console.print(f"{c['verdict']}: {c['text']}")
    console.print(f"total wall time {total:.0f} s; checkpoints and metrics.json under {out}; intervals in {out / 'table.md'}")
    report = write_report([out / name for name in RECIPES], out / "report.html")
    console.print(f"plots under {out}/<recipe>/plots, comparison page {report}")
    (out / "demo_summary.json").write_text(json.dumps({"seeds": summary["seeds"], "quick": quick, "total_s": total,
                                                       "results": results}, indent=2))
    return results
