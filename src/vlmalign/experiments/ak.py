"""`vlmalign experiment ak`: Ak et al.'s joint alignment, through the runner.

Ak et al. (ECCV Workshops 2024) add a CLIP loss on prompted LLM embeddings to the
next-token loss of the alignment stage and report about +2% on multimodal benchmarks
after the same instruction tuning, across several LLMs. Arms per seed, from the same
initial projector on the same captions, the first two followed by the same LoRA
instruction tuning on free-form QA (data_efficiency.py's stages):

- `align`: next-token loss only (LLaVA stage 1);
- `align-clip`: + CLIP loss on mean-centred prompted embeddings (our default);
- `align-clip (raw)`: the same on raw last-token states (no centring), alignment only:
  the centring claim is about the alignment stage.

Measured: before stage 2, the held-out caption loss (true vs shuffled image) and
text->image retrieval with the prompted embeddings (primary: a +2-point multiple-choice
gain is inside the interval of a few hundred items); after stage 2, multiple-choice
accuracy on held-out images by likelihood and by generation, and captioning CIDEr of the
held-out images (secondary). Records written before captioning was measured get it from
their saved instruction-tuned checkpoint when the experiment runs again
(`backfill_captioning`).
`--llm gemma3-270m` (an override `llm.name=...`) repeats it with Gemma-3-270M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

from vlmalign.config import load_config
from vlmalign.data.scienceqa import load_mcq_json
from vlmalign.data.splits import ensure_data
from vlmalign.eval.captioning import (
    caption_images,
    caption_prompt,
    cider_per_image,
    require_scorers,
)
from vlmalign.eval.evaluate import EvalData
from vlmalign.experiments import data_efficiency as de
from vlmalign.experiments import stats
from vlmalign.experiments.runner import (
    RESULTS_LINES,
    Experiment,
    Metric,
    Variant,
    VariantResult,
    read_records,
    rewrite_records,
    run_experiment,
)
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.checkpoint import find_latest

console = Console()

class Arm(NamedTuple):
    recipe: str
    overrides: tuple[str, ...] = ()
    instructed: bool = True  # LoRA instruction tuning (and its scoring) after alignment


# The raw arm answers the centring question, which is about the alignment stage (its
# retrieval before stage 2): it stops there.
ARMS: dict[str, Arm] = {
    "align": Arm("align"),
    "align-clip": Arm("align-clip"),
    "align-clip (raw)": Arm("align-clip", ("embedding.centre=false",), instructed=False),
}
# Sized for 45 minutes here: the raw arm stops after alignment and 50 of the 100 held-out
# images are captioned (with every arm instruction-tuned and 100 captions the default
# took ~48 min on the idle CPU; greedy captioning costs ~30 s per 100 images).
FULL: dict[str, Any] = de.FULL | {"pool": 0.2, "caption_images": 50}
QUICK: dict[str, Any] = de.QUICK | {"caption_images": None}


def _arm(name: str) -> Variant:
    recipe, extra, instructed = ARMS[name]

    def run(sh: de.Shared, seed: int) -> VariantResult:
        init = de.align(sh, recipe, seed, extra, key=name)
        metrics, items = de.aligned_scores(sh, name)
        if not instructed:
            return VariantResult(metrics, items, {"steps": 0})
        model, kept = de.instruct(sh, init, 1.0, seed, name)
        with torch.no_grad():
            m, i = de.mcq_items(model, sh.items, sh.features)
            cm, ci, captions = captioning_items(model, sh.eval_data, sh.settings.get("caption_images"))
        return VariantResult(metrics | m | cm | {"train_s": kept["train_s"]}, items | i | ci, kept | {"captions": captions})

    stage2 = ", then LoRA instruction tuning on the free-form QA" if instructed else " (alignment only)"
    return Variant(name, run, f"{recipe} {' '.join(extra)}".strip() + stage2)


CAPTION_TOKENS = 24  # shapes captions are 10-25 tokens


@torch.no_grad()
def captioning_items(model: VLM, data: EvalData, images: int | None = None,
                     ) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """After instruction tuning: a greedy caption of each held-out image (the first
    `images` of them, all when None), asked with `caption_prompt`, scored by CIDEr against
    that image's held-out captions (per image, pycocoevalcap's scale, "simple"
    tokenisation: no Java), and the same captions against another image's captions
    (`caption_cider_shuffled`: the level of a model that ignores the image). Returns
    (metrics, per-image values, the captions)."""
    refs: dict[int, list[str]] = {}
    for text, row in zip(data.captions, data.text_to_image.tolist(), strict=True):
        refs.setdefault(row, []).append(text)
    rows = sorted(refs)[:images]
    texts = caption_images(model, data.features[rows], caption_prompt(model.tokenizer), max_new_tokens=CAPTION_TOKENS)
    preds = {str(r): t for r, t in zip(rows, texts, strict=True)}
    other = de.derangement(len(rows)).tolist()
    true = cider_per_image(preds, {str(r): refs[r] for r in rows}, tokenizer="simple")
    shuffled = cider_per_image(preds, {str(r): refs[rows[o]] for r, o in zip(rows, other, strict=True)}, "simple")
    items = {"caption_cider": [true[str(r)] for r in rows], "caption_cider_shuffled": [shuffled[str(r)] for r in rows]}
    items[GROUNDED] = grounded(items)
    return {k: sum(v) / len(v) for k, v in items.items()}, items, texts


GROUNDED = "caption_cider_grounded"


def grounded(items: dict[str, list[float]]) -> list[float]:
    """Per image, CIDEr against its own captions minus CIDEr against another image's: what
    the caption says about this image rather than about shapes scenes in general (0 for a
    model that ignores the image)."""
    return [t - s for t, s in zip(items["caption_cider"], items["caption_cider_shuffled"], strict=True)]


def derive_grounded(out: Path) -> int:
    """Records measured before `GROUNDED` existed get it from their stored per-image
    values (arithmetic only, nothing is measured again); returns how many."""
    lines = out / RESULTS_LINES
    records = read_records(lines) if lines.exists() else []
    todo = [r for r in records if {"caption_cider", "caption_cider_shuffled"} <= set(r["items"])
            and GROUNDED not in r["items"]]
    for r in todo:
        r["items"][GROUNDED] = grounded(r["items"])
        r["metrics"][GROUNDED] = sum(r["items"][GROUNDED]) / len(r["items"][GROUNDED])
    if todo:
        rewrite_records(lines, records)
    return len(todo)


def backfill_captioning(out: Path, cfg_overrides: list[str], images: int | None = None) -> int:
    """Measure `captioning_items` for every finished record that lacks it, from the arm's
    saved instruction-tuned checkpoint (the same weights the record's other metrics were
    measured on), on the held-out pairs of the experiment's own config; returns how many
    records gained it. A record whose checkpoint is gone keeps its metrics and is counted."""
    from vlmalign.inference import load_checkpoint

    lines = out / RESULTS_LINES
    records = read_records(lines)
    todo = [r for r in records if "caption_cider" not in r["metrics"] and ARMS.get(r["variant"], Arm("")).instructed]
    data, filled, missing = None, 0, 0
    for r in todo:
        checkpoint = find_latest(de.instruct_dir(out, r["variant"], 1.0, r["seed"]))
        if checkpoint is None:
            missing += 1
            continue
        model = load_checkpoint(checkpoint)
        if data is None:
            data = EvalData.prepare(model, load_config(recipe_config("align"), cfg_overrides), benchmarks=False)
        metrics, items, captions = captioning_items(model, data, images)
        r["metrics"] |= metrics
        r["items"] |= items
        r["extra"]["captions"] = captions
        filled += 1
        rewrite_records(lines, records)
        console.print(f"seed {r['seed']}: {r['variant']}: captioning measured from {checkpoint}")
    if missing:
        console.print(f"[yellow]{missing} record(s) without captioning: their instruction-tuned checkpoint is gone")
    return filled


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
        stats.Claim("captioning", "joint alignment improves captioning after instruction tuning (CIDEr)",
                    "caption_cider", "align-clip", "align", 0.0, paper=p),
        stats.Claim("captioning-grounded", "the same, counting only CIDEr above the shuffled-image level (the image's"
                    " own content)", GROUNDED, "align-clip", "align", 0.0, paper=p),
        stats.Claim("centring", "centred states train the CLIP loss better than raw ones (text->image R@5)", "t2i_R@5",
                    "align-clip", "align-clip (raw)", 2.0, paper="our design choice (FINDINGS.md)"),
    ]


def run_ak(out: str | Path = "runs/ak", quick: bool = False, seeds: list[int] | None = None,
           llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
           sizes: dict | None = None, command: str = "", report_only: bool = False) -> dict:
    """Run the experiment (resumable); writes results.json, table.md and plot.png."""
    out = Path(out)
    require_scorers()  # captioning is scored at the end of every arm
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
            Metric("image_information_gap", "caption loss: shuffled - true image", 0.0, unit=""),
            Metric("caption_cider", "captioning CIDEr after instruction tuning", None, unit=""),
            Metric("caption_cider_shuffled", "the same captions against another image's captions", None, unit=""),
            Metric(GROUNDED, "CIDEr above the shuffled-image level", 0.0, unit="")],
        claims=claims(), settings={"sizes": {k: v for k, v in s.items() if k != "seeds"}, "llm": llm, "tower": tower,
                                   "extra": extra},
        data_files=lambda: [root / "train.jsonl", root / de.FREE_FORM, root / "mcq_test.json", root / "test.jsonl"],
        command=command,
    )
    if not report_only:
        backfill_captioning(out, de._overrides(s, out, llm, tower, extra), s.get("caption_images"))
    derive_grounded(out)
    summary = run_experiment(exp, out, log=console.print, execute=not report_only)
    for c in summary["claims"]:
        console.print(f"[bold]{c['verdict']}[/]: {c['text']}")
    return summary
