"""One `align-clip` run per arm, from the same initial projector on the same captions, each
arm a change of the recipe's config (an embedding prompt, a caption format), evaluated on
held-out pairs through the runner. `vlmalign experiment prompts` and `caption-format`
are such studies.

Each arm trains with its own text state cache (text states depend on the prompt) and its
own centring mean; it is scored per item on retrieval and compositionality
(`scoring.embedding_items`), plus whatever the study's `measure` adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console

from vlmalign.cache import TextStateCache
from vlmalign.config import Config, load_config
from vlmalign.eval.evaluate import CachedTextEmbedder, EvalData
from vlmalign.experiments import stats
from vlmalign.experiments.runner import Experiment, Metric, Variant, VariantResult, run_experiment
from vlmalign.experiments.scoring import embedding_items
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import TrainData
from vlmalign.train.trainer import train

console = Console()

# Sized like the demo (800 scenes, 40 align-clip steps of 16, 80 held-out pairs): one
# align-clip run per arm and seed.
TRAIN_FULL = {"data.shapes_n": 800, "train.max_steps": 40, "train.batch_size": 16, "data.eval_max_samples": 80,
              "train.log_every": 10, "train.eval_at_end": "false", "train.save_every": 0}
TRAIN_QUICK = {"data.shapes_n": 120, "train.max_steps": 3, "train.batch_size": 8, "data.eval_max_samples": 16,
               "train.log_every": 1, "train.eval_at_end": "false", "train.save_every": 0}

# (model after training, the study's shared data, the arm's config) -> (metrics, per-item values)
Measure = Callable[[VLM, dict, Config], tuple[dict[str, float], dict[str, list[float]]]]


@dataclass
class Arm:
    """A variant of the study: `change` turns the recipe's config into the arm's."""

    name: str
    description: str
    change: Callable[[Config], Config]
    extra: dict = dataclasses.field(default_factory=dict)  # recorded with each of its results


@dataclass
class Study:
    name: str
    title: str
    arms: list[Arm]
    claims: list[stats.Claim]
    metrics: list[Metric] = dataclasses.field(default_factory=list)  # beyond retrieval and comp
    measure: Measure | None = None
    recipe: str = "align-clip"


def retrieval_metrics(pairs: int) -> list[Metric]:
    return [Metric("t2i_R@1", "text->image R@1", 100 / pairs), Metric("t2i_R@5", "text->image R@5", 500 / pairs),
            Metric("i2t_R@5", "image->text R@5", 500 / pairs), Metric("comp", "compositional accuracy", 50.0),
            Metric("train_s", "training time (s)", None, lower_is_better=True, unit="")]


def run_study(study: Study, out: str | Path, quick: bool = False, seeds: list[int] | None = None,
              llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
              command: str = "", report_only: bool = False) -> dict:
    """Run the study (resumable); writes results.json, table.md and plot.png under `out`."""
    out = Path(out)
    settings = TRAIN_QUICK if quick else TRAIN_FULL
    common = [f"{k}={v}" for k, v in settings.items()] + [
        f"data.root={out / 'shapes'}", f"llm.name={llm}", f"vision.tower={tower}", *(extra or [])]

    def setup(seed: int) -> dict:
        cfg = load_config(recipe_config(study.recipe), common + [f"train.seed={seed}"])
        set_seed(seed)
        model = VLM.build(cfg)
        return {"model": model, "initial": {k: v.detach().clone() for k, v in model.projector.state_dict().items()},
                "data": TrainData.prepare(model, cfg, "captions"), "eval": EvalData.prepare(model, cfg, benchmarks=False)}

    def variant(arm: Arm) -> Variant:
        def run(sh: dict, seed: int) -> VariantResult:
            model = sh["model"]
            cfg = arm.change(load_config(recipe_config(study.recipe), common + [
                f"train.seed={seed}", f"train.out_dir={out / 'runs' / (arm.name.replace(' ', '-') + f'-seed{seed}')}"]))
            model.projector.load_state_dict(sh["initial"])
            model.embed_mean_ready.fill_(False)  # the centring mean under this arm's prompt
            cache = TextStateCache()
            result = train(cfg, model=model, data=dataclasses.replace(sh["data"], text_cache=cache))
            model.eval()
            with torch.no_grad():
                metrics, items = embedding_items(CachedTextEmbedder(model, cache), sh["eval"])
                if study.measure is not None:
                    more, more_items = study.measure(model, sh, cfg)
                    metrics, items = metrics | more, items | more_items
            return VariantResult(metrics | {"train_s": result.wall_time_s}, items, {"description": arm.description, **arm.extra})

        return Variant(arm.name, run, arm.description)

    n = settings["data.eval_max_samples"]
    exp = Experiment(
        name=study.name, title=study.title, variants=[variant(a) for a in study.arms],
        seeds=list(seeds or ([0] if quick else [0, 1, 2])), setup=setup,
        metrics=retrieval_metrics(n) + study.metrics, claims=study.claims, settings={"common": common},
        data_files=lambda: [out / "shapes" / "train.jsonl", out / "shapes" / "test.jsonl"], command=command,
    )
    summary = run_experiment(exp, out, log=console.print, execute=not report_only)
    for c in summary["claims"]:
        console.print(f"[bold]{c['verdict']}[/]: {c['text']}")
    return summary
