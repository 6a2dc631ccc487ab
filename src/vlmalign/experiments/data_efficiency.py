"""`vlmalign experiment data-efficiency`: CG-VLM's zero-shot efficiency claim, through the runner.

CG-VLM (Liu et al. 2023) reports that after contrastive + generative alignment, 10% of
the instruction data reaches 95% of LLaVA's accuracy (generative alignment, all the
data) on zero-shot ScienceQA-IMG. Here, on `shapes` with the real packaged models:

- stage 1: the projector is aligned with `align` (NTP only, LLaVA) and with `align-cg`
  (NTP + patch-token contrastive), from the same initial weights on the same captions;
- stage 2: LoRA instruction tuning (`instruct`) on FREE-FORM question answering about the
  training images (`instruct_train.json`: no multiple-choice format anywhere in training,
  so the multiple-choice test is zero-shot in format), at 10% and 100% of those
  conversations, for the same number of epochs (so 10% takes a tenth of the steps), with
  warmup a fraction of each run;
- test: multiple-choice questions on held-out images, scored by option likelihood and by
  generation (`eval/mcq.py`).

Arms per seed: `align` and `align-cg` before stage 2 (fraction 0: the image-information
check and the aligned projectors' retrieval), `align @ 10%`, `align @ 100%`,
`align-cg @ 10%`, `align-cg @ 100%`. The claim is judged on the ratio
acc(align-cg @ 10%) / acc(align @ 100%) with its paired bootstrap interval, beside the
paper's 0.95.

The image-information check: held-out caption loss with the true image vs with the
images of other captions (a fixed derangement). An aligned projector carries image
information when the first is clearly lower; the gap is reported for both alignments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from vlmalign.cache import TextStateCache
from vlmalign.config import Config, load_config
from vlmalign.data.scienceqa import MCQItem, load_mcq_json
from vlmalign.data.splits import ensure_data
from vlmalign.eval.evaluate import CachedTextEmbedder, EvalData, heldout_ntp_loss
from vlmalign.eval.mcq import _argmax_no_tie, mcq_image_features, parse_answer, scores_and_answers
from vlmalign.experiments import stats
from vlmalign.experiments.runner import Experiment, Metric, Variant, VariantResult, run_experiment
from vlmalign.experiments.scoring import retrieval_hits
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import TrainData
from vlmalign.train.trainer import train

console = Console()

ALIGNMENTS = ("align", "align-cg")
FRACTIONS = (0.1, 1.0)
FREE_FORM = "instruct_train.json"  # QA conversations only: no multiple-choice format
ATTENTION = "lora.target_modules=q_proj,k_proj,v_proj,o_proj"
# Sized for ~45 minutes on an idle 2-core CPU (align ~2.5 s/step at batch 16, LoRA
# instruction tuning ~5 s/step at batch 8 with short conversations, likelihood +
# generation ~0.3 s/item): 1000 scenes -> 800 training images; the instruction pool is a
# seeded 0.3 of their conversations (240, 30 steps of 8 at 100%; 24, 3 steps at 10%);
# 100 held-out test images x 3 questions = 300 multiple-choice items.
FULL: dict[str, Any] = {"scenes": 1000, "align_steps": 60, "align_batch": 16, "batch": 8, "pool": 0.3,
                        "epochs": 1.0, "eval_items": 300, "warmup": 0.1, "seeds": [0, 1, 2],
                        "align_lr": 1e-3, "instruct_lr": 2e-4}
QUICK: dict[str, Any] = {"scenes": 120, "align_steps": 3, "align_batch": 8, "batch": 8, "pool": 1.0,
                         "epochs": 1.0, "eval_items": 12, "warmup": 0.1, "seeds": [0],
                         "align_lr": 1e-3, "instruct_lr": 2e-4}
PAPER_RATIO = 0.95


def instruct_steps(records: int, batch: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `records` at `batch` (at least 1)."""
    return max(1, math.ceil(epochs * records / batch))


def warmup_steps(steps: int, fraction: float) -> int:
    """Warmup as a fraction of the run, rounded down, and none below 2 steps: the first
    warmup step of the cosine-with-warmup schedule runs at lr 0, so a 1-step warmup would
    only waste a step of a short run."""
    n = int(fraction * steps)
    return n if n >= 2 else 0


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A permutation of range(n) with no fixed point (n >= 2): the shuffled-image pairing."""
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(n, generator=g)
        if n < 2 or bool((p != torch.arange(n)).all()):
            return p


def image_information(model: VLM, data: EvalData, cfg: Config) -> dict[str, float]:
    """Held-out caption loss with each caption's own image and with another caption's
    image (`derangement`), and their difference (positive: the projector carries image
    information the LLM uses)."""
    true = heldout_ntp_loss(model, data, cfg)
    shuffled_rows = data.text_to_image[derangement(len(data.captions))]
    shuffled = heldout_ntp_loss(model, dataclasses.replace(data, text_to_image=shuffled_rows), cfg)
    return {"caption_loss_true_image": true, "caption_loss_shuffled_image": shuffled,
            "image_information_gap": shuffled - true}


def mcq_items(model: VLM, items: list[MCQItem], features: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per item: right by option likelihood, right by generation (0 / 100)."""
    scores, texts = scores_and_answers(model, items, features, max_new_tokens=6)
    lik = [100.0 * (_argmax_no_tie(s) == it.answer) for s, it in zip(scores, items, strict=True)]
    gen = [100.0 * (parse_answer(t, it.choices) == it.answer) for t, it in zip(texts, items, strict=True)]
    return {"mcq_lik": sum(lik) / len(lik), "mcq_gen": sum(gen) / len(gen)}, {"mcq_lik": lik, "mcq_gen": gen}


@dataclass
class Shared:
    common: list[str]
    model: VLM
    initial: dict[str, torch.Tensor]
    captions: TrainData
    conversations: TrainData
    eval_data: EvalData
    items: list[MCQItem]
    features: dict
    text_cache: TextStateCache
    aligned: dict[str, Path]
    out: Path
    settings: dict


def _overrides(s: dict, out: Path, llm: str, tower: str, extra: list[str]) -> list[str]:
    return [f"data.root={out / 'shapes'}", f"data.shapes_n={s['scenes']}", f"llm.name={llm}", f"vision.tower={tower}",
            "train.log_every=10", "train.eval_at_end=false", "train.save_every=0", "data.eval_max_samples=100", *extra]


def _setup(s: dict, out: Path, llm: str, tower: str, extra: list[str]):
    state: dict[str, Any] = {}

    def setup(seed: int) -> Shared:
        common = _overrides(s, out, llm, tower, extra) + [f"train.seed={seed}"]
        cfg = load_config(recipe_config("align"), common)
        root = ensure_data(cfg.data)
        set_seed(seed)
        model = VLM.build(cfg)
        initial = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
        text_cache = state.setdefault("text_cache", TextStateCache())
        captions = TrainData.prepare(model, cfg, "captions", text_cache)
        icfg = load_config(recipe_config("instruct"), common + [f"data.train_file={FREE_FORM}",
                                                                f"data.data_fraction={s['pool']}", "data.fraction_seed=0"])
        conversations = TrainData.prepare(model, icfg, "conversations")
        if "eval" not in state:
            state["eval"] = EvalData.prepare(model, cfg, benchmarks=False)
            items = load_mcq_json(root / "mcq_test.json", image_root=root)[: s["eval_items"]]
            state["items"], state["features"] = items, mcq_image_features(model, items)
        return Shared(common, model, initial, captions, conversations, state["eval"], state["items"],
                      state["features"], text_cache, {}, out, s)

    return setup


def align(sh: Shared, recipe: str, seed: int, extra: tuple[str, ...] = (), key: str | None = None) -> Path:
    """The seed's alignment checkpoint of `recipe` (+ `extra` overrides), trained once per
    seed from the seed's initial projector and reused by its instruction arms; its config
    is kept in `sh.aligned[key + ":cfg"]`."""
    key = key or recipe
    if key not in sh.aligned:
        cfg = load_config(recipe_config(recipe), sh.common + list(extra) + [
            f"train.out_dir={sh.out / 'runs' / f'{_slug(key)}-seed{seed}'}", f"train.max_steps={sh.settings['align_steps']}",
            f"train.batch_size={sh.settings['align_batch']}", f"train.lr={sh.settings['align_lr']}",
            f"train.warmup_steps={warmup_steps(sh.settings['align_steps'], sh.settings['warmup'])}"])
        sh.model.projector.load_state_dict(sh.initial)
        sh.model.embed_mean_ready.fill_(False)
        result = train(cfg, model=sh.model, data=sh.captions)
        sh.aligned[key] = result.checkpoint
        sh.aligned[f"{key}:cfg"] = cfg  # type: ignore[assignment]
    return sh.aligned[key]


def instruct(sh: Shared, init: Path, fraction: float, seed: int, tag: str) -> tuple[VLM, dict]:
    """LoRA instruction tuning from the alignment checkpoint `init` on `fraction` of the
    free-form QA pool, for the same epochs whatever the fraction; returns the model and
    what the record keeps (steps, records, warmup steps, train_s)."""
    s = sh.settings
    rows = _subset_rows(len(sh.conversations.records), fraction, seed)
    data = TrainData(sh.conversations.kind, [sh.conversations.records[i] for i in rows],
                     sh.conversations.features[rows] if sh.conversations.features is not None else None,
                     sh.conversations.text_cache, sh.conversations.report)
    steps = instruct_steps(len(rows), s["batch"], s["epochs"])
    cfg = load_config(recipe_config("instruct"), sh.common + [
        ATTENTION, f"data.train_file={FREE_FORM}", f"train.init_from={init}", f"train.max_steps={steps}",
        f"train.batch_size={s['batch']}", f"train.lr={s['instruct_lr']}",
        f"train.warmup_steps={warmup_steps(steps, s['warmup'])}",
        f"train.out_dir={instruct_dir(sh.out, tag, fraction, seed)}"])
    set_seed(seed)
    model = VLM.build(cfg)  # fresh LoRA adapters, the same for every arm of the seed
    result = train(cfg, model=model, data=data)
    model.eval()
    return model, {"steps": steps, "records": len(rows), "warmup_steps": warmup_steps(steps, s["warmup"]),
                   "train_s": result.wall_time_s}


def instruct_dir(out: Path, tag: str, fraction: float, seed: int) -> Path:
    """The run folder of an arm's instruction tuning (its checkpoints)."""
    return out / "runs" / f"{_slug(tag)}-instruct-{fraction:g}-seed{seed}"


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def aligned_scores(sh: Shared, key: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Before stage 2: the image-information check and the prompted-embedding retrieval
    (text->image R@1 and R@5 per caption) of the aligned model `sh.model`."""
    cfg = sh.aligned[f"{key}:cfg"]
    model = sh.model
    model.eval()
    with torch.no_grad():
        metrics = image_information(model, sh.eval_data, cfg)
        img = model.embed_images(sh.eval_data.features)
        txt = CachedTextEmbedder(model, sh.text_cache).embed_texts(sh.eval_data.captions).to(img.device)
        items = {f"t2i_R@{k}": retrieval_hits(img, txt, sh.eval_data.text_to_image, k)["t2i"] for k in (1, 5)}
    return metrics | {k: sum(v) / len(v) for k, v in items.items()}, items


def _aligned_arm(name: str) -> Variant:
    def run(sh: Shared, seed: int) -> VariantResult:
        align(sh, name, seed)
        metrics, items = aligned_scores(sh, name)
        with torch.no_grad():
            m, i = mcq_items(sh.model, sh.items, sh.features)
        return VariantResult(metrics | m, items | i, {"steps": 0})

    return Variant(f"{name} (no instruct)", run, f"{name} alignment, before instruction tuning")


def _instruct_arm(name: str, fraction: float) -> Variant:
    def run(sh: Shared, seed: int) -> VariantResult:
        model, kept = instruct(sh, align(sh, name, seed), fraction, seed, name)
        with torch.no_grad():
            metrics, items = mcq_items(model, sh.items, sh.features)
        metrics["train_s"] = kept["train_s"]
        return VariantResult(metrics, items, kept)

    return Variant(f"{name} @ {fraction:.0%}", run, f"{name}, then LoRA instruction tuning on {fraction:.0%} of the "
                                                     "free-form QA")


def _subset_rows(n: int, fraction: float, seed: int) -> list[int]:
    from vlmalign.data.splits import subsample

    return subsample(list(range(n)), fraction, seed)


def variants() -> list[Variant]:
    return [_aligned_arm(a) for a in ALIGNMENTS] + [_instruct_arm(a, f) for a in ALIGNMENTS for f in FRACTIONS]


def claims() -> list[stats.Claim]:
    p = "CG-VLM (Liu et al. 2023)"
    return [
        stats.Claim("cg-helps-at-10", "with 10% of the instruction data, CG alignment beats generative alignment",
                    "mcq_lik", "align-cg @ 10%", "align @ 10%", 2.0, paper=p),
        stats.Claim("cg-helps-at-10-gen", "the same, scored by generation", "mcq_gen", "align-cg @ 10%",
                    "align @ 10%", 2.0, paper=p),
        stats.Claim("cg-aligns-better", "CG alignment lowers the held-out caption loss (before stage 2)",
                    "caption_loss_true_image", "align-cg (no instruct)", "align (no instruct)", 0.0,
                    lower_is_better=True, paper=p),
    ]


def ratio_summary(records: list[dict]) -> dict:
    """acc(align-cg @ 10%) / acc(align @ 100%) with its paired interval, beside 0.95."""
    from vlmalign.experiments.runner import values_of

    seeds = sorted({r["seed"] for r in records})
    out: dict[str, Any] = {}
    for key in ("mcq_lik", "mcq_gen"):
        vals = values_of(records, key, ["align-cg @ 10%", "align @ 100%"], seeds)
        if len(vals) < 2:
            continue
        r = stats.ratio_interval(vals["align-cg @ 10%"], vals["align @ 100%"])
        out[f"ratio_{key}"] = r.to_dict() | {
            "verdict": stats.threshold_verdict(r, PAPER_RATIO, 0.05),
            "note": f"acc(align-cg @ 10%) / acc(align @ 100%); paper: {PAPER_RATIO}; verdict "
                    f"{stats.threshold_verdict(r, PAPER_RATIO, 0.05)}"}
    return out


def metrics(chance: float) -> list[Metric]:
    return [
        Metric("mcq_lik", "MCQ accuracy, option likelihood", chance),
        Metric("mcq_gen", "MCQ accuracy, generation", chance),
        Metric("caption_loss_true_image", "held-out caption loss, true image", None, lower_is_better=True, unit=""),
        Metric("caption_loss_shuffled_image", "held-out caption loss, shuffled image", None, lower_is_better=True,
               unit=""),
        Metric("image_information_gap", "caption loss: shuffled - true image", 0.0, unit=""),
        Metric("t2i_R@1", "aligned projector: text->image R@1 (prompted embeddings)", 1.0),
        Metric("t2i_R@5", "aligned projector: text->image R@5 (prompted embeddings)", 5.0),
        Metric("train_s", "instruction-tuning time (s)", None, lower_is_better=True, unit=""),
    ]


def run_data_efficiency(out: str | Path = "runs/data-efficiency", quick: bool = False, seeds: list[int] | None = None,
                        llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
                        sizes: dict | None = None, command: str = "", report_only: bool = False) -> dict:
    """Run the experiment (resumable); writes results.json, table.md and plot.png."""
    out = Path(out)
    s = (QUICK if quick else FULL) | {k: v for k, v in (sizes or {}).items() if v is not None}
    if unknown := set(s) - set(FULL):
        raise ValueError(f"unknown data-efficiency sizes {sorted(unknown)}; known: {', '.join(FULL)}")
    if seeds:
        s["seeds"] = list(seeds)
    extra = list(extra or [])
    root = ensure_data(load_config(recipe_config("align"), _overrides(s, out, llm, tower, extra)).data)
    items = load_mcq_json(root / "mcq_test.json", image_root=root)[: s["eval_items"]]
    chance_items = sum(100.0 / len(it.choices) for it in items) / max(len(items), 1)
    exp = Experiment(
        name="data-efficiency", title="CG-VLM on shapes: instruction-data efficiency, zero-shot multiple choice",
        variants=variants(), seeds=list(s["seeds"]), setup=_setup(s, out, llm, tower, extra),
        metrics=metrics(chance_items), claims=claims(),
        settings={"sizes": {k: v for k, v in s.items() if k != "seeds"}, "llm": llm, "tower": tower, "extra": extra},
        data_files=lambda: [root / "train.jsonl", root / FREE_FORM, root / "mcq_test.json", root / "test.jsonl"],
        extra_summary=ratio_summary, command=command,
    )
    summary = run_experiment(exp, out, log=console.print, execute=not report_only)
    for c in summary["claims"]:
        console.print(f"[bold]{c['verdict']}[/]: {c['text']}")
    for k, v in (summary.get("derived") or {}).items():
        console.print(f"{k}: {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] -> {v['verdict']}")
    return summary
