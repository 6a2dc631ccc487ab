"""`vlmalign experiment ak`: Ak et al.'s joint alignment, through the runner.

Ak et al. (ECCV Workshops 2024) add a CLIP loss on prompted LLM embeddings to the
next-token loss of the alignment stage and report about +2% on multimodal benchmarks
after the same instruction tuning, across several LLMs. Arms per seed, from the same
initial projector on the same captions, each followed by the same LoRA instruction
tuning on free-form QA (data_efficiency.py's stages):

- `align`: next-token loss only (LLaVA stage 1);
- `align-clip`: + CLIP loss on mean-centred prompted embeddings (our default);
- `align-clip (raw)`: the same on raw last-token states (no centring).

Measured: before stage 2, the held-out caption loss (true vs shuffled image) and
text->image retrieval with the prompted embeddings (primary: a +2-point multiple-choice
gain is inside the interval of a few hundred items); after stage 2, multiple-choice
accuracy on held-out images by likelihood and by generation (secondary).
`--llm gemma3-270m` (an override `llm.name=...`) repeats it with Gemma-3-270M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlmalign.config import load_config
from vlmalign.data.scienceqa import load_mcq_json
from vlmalign.data.splits import ensure_data
from vlmalign.experiments import data_efficiency as de
from vlmalign.experiments import stats
from vlmalign.experiments.runner import Experiment, Metric, Variant, VariantResult, run_experiment
from vlmalign.paths import recipe_config

console = Console()

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "align": ("align", ()),
    "align-clip": ("align-clip", ()),
    "align-clip (raw)": ("align-clip", ("embedding.centre=false",)),
}
FULL: dict[str, Any] = de.FULL | {"pool": 0.2}
QUICK: dict[str, Any] = de.QUICK


def _arm(name: str) -> Variant:
    recipe, extra = ARMS[name]

    def run(sh: de.Shared, seed: int) -> VariantResult:
        init = de.align(sh, recipe, seed, extra, key=name)
        metrics, items = de.aligned_scores(sh, name)
        model, kept = de.instruct(sh, init, 1.0, seed, name)
        with torch.no_grad():
            m, i = de.mcq_items(model, sh.items, sh.features)
        return VariantResult(metrics | m | {"train_s": kept["train_s"]}, items | i, kept)

    return Variant(name, run, f"{recipe} {' '.join(extra)}, then LoRA instruction tuning on the free-form QA".strip())


def claims() -> list[stats.Claim]:
    p = "Ak et al. 2024"
    return [
        stats.Claim("mcq-gain", "joint NTP + CLIP alignment improves accuracy after instruction tuning (+2 points)",
                    "mcq_lik", "align-clip", "align", 2.0, paper=p),
        stats.Claim("mcq-gain-gen", "the same, scored by generation", "mcq_gen", "align-clip", "align", 2.0, paper=p),
        stats.Claim("retrieval", "joint alignment gives retrievable prompted embeddings (text->image R@5)", "t2i_R@5",
                    "align-clip", "align", 2.0, paper=p),
        stats.Claim("caption-loss", "joint alignment lowers the held-out caption loss (before stage 2)",
                    "caption_loss_true_image", "align-clip", "align", 0.0, lower_is_better=True, paper=p),
        stats.Claim("centring", "centred states train the CLIP loss better than raw ones (text->image R@5)", "t2i_R@5",
                    "align-clip", "align-clip (raw)", 2.0, paper="our design choice (FINDINGS.md)"),
    ]


def run_ak(out: str | Path = "runs/ak", quick: bool = False, seeds: list[int] | None = None,
           llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
           sizes: dict | None = None, command: str = "", report_only: bool = False) -> dict:
    """Run the experiment (resumable); writes results.json, table.md and plot.png."""
    out = Path(out)
    s = (QUICK if quick else FULL) | {k: v for k, v in (sizes or {}).items() if v is not None}
    if seeds:
        s["seeds"] = list(seeds)
    extra = list(extra or [])
    root = ensure_data(load_config(recipe_config("align"), de._overrides(s, out, llm, tower, extra)).data)
    items = load_mcq_json(root / "mcq_test.json", image_root=root)[: s["eval_items"]]
    chance = sum(100.0 / len(it.choices) for it in items) / max(len(items), 1)
    exp = Experiment(
        name="ak", title="Ak et al. on shapes: joint NTP + CLIP alignment, then the same instruction tuning",
        variants=[_arm(n) for n in ARMS], seeds=list(s["seeds"]), setup=de._setup(s, out, llm, tower, extra),
        metrics=[m for m in de.metrics(chance) if m.key != "image_information_gap"] + [
            Metric("image_information_gap", "caption loss: shuffled - true image", 0.0, unit="")],
        claims=claims(), settings={"sizes": {k: v for k, v in s.items() if k != "seeds"}, "llm": llm, "tower": tower,
                                   "extra": extra},
        data_files=lambda: [root / "train.jsonl", root / de.FREE_FORM, root / "mcq_test.json", root / "test.jsonl"],
        command=command,
    )
    summary = run_experiment(exp, out, log=console.print, execute=not report_only)
    for c in summary["claims"]:
        console.print(f"[bold]{c['verdict']}[/]: {c['text']}")
    return summary
