"""`vlmalign experiment vladva`: VladVA's claims in miniature, through the runner.

VladVA (Ouali et al., CVPR 2025) turns a generative LVLM into an embedding model with a
contrastive loss on short captions, a next-token loss on long captions, soft prompts and
LoRA. It claims (1) to beat CLIP-like models of similar size on retrieval and, notably,
compositionality, and (2) in its ablation, that each component helps and that
contrastive training on long captions alone is worse. Arms, on `shapes` with the real
packaged models (SmolLM2-135M + EfficientNet-Lite0), all from the same initial projector
on the same training records for a seed:

1. `contrastive short`: CLIP loss on short captions (projector trains, LLM frozen);
2. `+ NTP long`: + next-token loss on the long captions (cut to whole sentences within
   `long_tokens` tokens);
3. `+ soft prompts + LoRA`: + learned prompts and LoRA on the attention projections
   (the `discriminative` recipe);
4. `contrastive long`: CLIP loss on the long captions only;
5. `CLIP peer`: open_clip dual encoder (the same frozen EfficientNet-Lite0 + MiniLM,
   baseline/clip.py) on the same short captions, steps and batch.

Fair tuning: before the seeds run, every arm gets the same learning-rate sweep (the
`lrs` grid, `sweep_steps` steps each, one sweep seed) scored on the validation split;
each arm then runs at its best lr. The sweep is its own resumable experiment
(`<out>/sweep`) and its table is part of the report.

Evaluation on held-out data (per item, so the runner can bootstrap over items and
seeds): text->image and image->text R@1 / R@5 on the test pairs, SugarCrepe-style
compositional accuracy per category, Winoground-style text / image / group scores on
word-order pairs (data/winoground.py), zero-shot classification of the shapes' 24
colour x shape classes, and, for the VLM arms, the held-out caption loss (does
captioning survive discriminative tuning?).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from vlmalign.cache import TextStateCache, tower_features
from vlmalign.config import Config, load_config
from vlmalign.data.sample import Sample
from vlmalign.data.splits import ensure_data
from vlmalign.data.winoground import write_word_order_pairs
from vlmalign.eval.evaluate import CachedTextEmbedder, EvalData, heldout_ntp_loss
from vlmalign.experiments import stats
from vlmalign.experiments.data_efficiency import warmup_steps
from vlmalign.experiments.runner import Experiment, Metric, Variant, VariantResult, run_experiment
from vlmalign.experiments.scoring import WORD_ORDER_CHANCE, WordOrderData, embedding_items
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import TrainData
from vlmalign.train.trainer import train

console = Console()

PLAIN = ["lora.enabled=false", "embedding.soft_prompts=false"]
ATTENTION = "lora.target_modules=q_proj,k_proj,v_proj,o_proj"
ARMS: dict[str, tuple[list[str], str]] = {
    "contrastive short": (["objective.ntp_weight=0", *PLAIN], "CLIP loss on short captions; projector trains"),
    "+ NTP long": (PLAIN, "+ next-token loss on long captions"),
    "+ soft prompts + LoRA": ([ATTENTION], "+ soft prompts + LoRA (attention projections): VladVA's recipe"),
    "contrastive long": (["objective.ntp_weight=0", *PLAIN, "data.short_field=long_caption", "data.long_field=",
                          "data.short_max_tokens=1000"], "CLIP loss on long captions only"),
}
CLIP = "CLIP peer"
FULL_ARM = "+ soft prompts + LoRA"
CATEGORIES = ("replace_obj", "replace_att", "replace_rel", "swap_att", "add_obj")
# Sized for the 45-minute budget on an idle 2-core CPU. Evaluation dominates the arms
# whose text path trains (every text is embedded again: ~17 texts/s idle), the LoRA arm's
# steps the training (~7 s/step idle at batch 8). 1500 scenes -> 1200 train (a 0.27
# fraction, 324 records, trains: 40 steps of 8 is one epoch), 150 validation pairs (the
# sweep), 150 test pairs + 30 SugarCrepe items per category, 100 word-order pairs (200
# new images), 48 zero-shot images. Measured idle: each seed ~11 min (5 arms); the sweep
# at 20 steps took ~16 min, over the budget with the seeds, so it runs 10 (a quarter of
# the training): sweep + 3 seeds took 43 min idle.
FULL: dict[str, Any] = {"scenes": 1500, "train_fraction": 0.27, "steps": 40, "batch": 8, "eval": 150,
                        "comp_per_category": 30, "wino_pairs": 100, "long_tokens": 64, "seeds": [0, 1, 2],
                        "sweep_steps": 10, "lrs": [2e-4, 1e-3], "sweep_seed": 100}
# A smoke run: every arm, one seed, one lr (no sweep), a few steps and items.
QUICK: dict[str, Any] = {"scenes": 200, "train_fraction": 0.2, "steps": 4, "batch": 8, "eval": 16,
                         "comp_per_category": 6, "wino_pairs": 8, "long_tokens": 64, "seeds": [0],
                         "sweep_steps": 2, "lrs": [1e-3], "sweep_seed": 100}
# The smallest effect (points) we treat as a reproduction of a "beats" claim: VladVA's
# reported gains over CLIP-like models of its size are several points; 2 points is our
# choice of the smallest that would matter.
EFFECT = 2.0


def claims() -> list[stats.Claim]:
    p = "VladVA (Ouali et al. 2025)"
    return [
        stats.Claim("compositional-vs-clip", "VladVA beats the CLIP peer on compositionality", "comp", FULL_ARM, CLIP,
                    EFFECT, paper=p),
        stats.Claim("retrieval-vs-clip", "VladVA beats the CLIP peer on text->image retrieval", "t2i_R@1", FULL_ARM,
                    CLIP, EFFECT, paper=p),
        stats.Claim("word-order-vs-clip", "VladVA beats the CLIP peer on word order (Winoground text score)",
                    "wino_text", FULL_ARM, CLIP, EFFECT, paper=p),
        stats.Claim("ntp-long-helps", "+ NTP on long captions beats contrastive on short captions (retrieval)",
                    "t2i_R@1", "+ NTP long", "contrastive short", EFFECT, paper=p),
        stats.Claim("ntp-long-helps-comp", "+ NTP on long captions beats contrastive on short captions "
                    "(compositionality)", "comp", "+ NTP long", "contrastive short", EFFECT, paper=p),
        stats.Claim("peft-helps", "soft prompts + LoRA beat the projector-only model (retrieval)", "t2i_R@1", FULL_ARM,
                    "+ NTP long", EFFECT, paper=p),
        stats.Claim("long-only-worse", "contrastive on long captions only is worse than short + long (retrieval)",
                    "t2i_R@1", "+ NTP long", "contrastive long", EFFECT, paper=p),
    ]


def metrics(eval_pairs: int) -> list[Metric]:
    r1, r5 = 100.0 / max(eval_pairs, 1), 500.0 / max(eval_pairs, 1)
    return [
        Metric("t2i_R@1", "text->image R@1", r1), Metric("i2t_R@1", "image->text R@1", r1),
        Metric("t2i_R@5", "text->image R@5", r5),
        Metric("comp", "compositional accuracy (all items)", 50.0),
        *[Metric(f"comp_{c}", f"compositional: {c}", 50.0) for c in CATEGORIES],
        Metric("wino_text", "word order: text score", WORD_ORDER_CHANCE["text"]),
        Metric("wino_image", "word order: image score", WORD_ORDER_CHANCE["image"]),
        Metric("wino_group", "word order: group score", WORD_ORDER_CHANCE["group"]),
        Metric("zs_acc", "zero-shot top-1 (24 classes)", 100.0 / 24),
        Metric("heldout_caption_loss", "held-out caption NTP loss", None, lower_is_better=True, unit=""),
        Metric("train_s", "training time (s)", None, lower_is_better=True, unit=""),
    ]


# ---------------------------------------------------------------- data


def cut_long_captions(path: Path, tokenizer, max_tokens: int) -> int:
    """Rewrite the `long_caption` of each JSONL record to its longest prefix of whole
    sentences within `max_tokens` tokens (at least the first sentence); returns how many
    were cut. Idempotent."""
    lines = path.read_text().splitlines()
    out, cut = [], 0
    for line in lines:
        rec = json.loads(line)
        text = rec.get("long_caption", "")
        if text and len(tokenizer(text, add_special_tokens=False).input_ids) > max_tokens:
            sentences = [s if s.endswith(".") else s + "." for s in text.split(". ")]
            keep = sentences[:1]
            for s in sentences[1:]:
                candidate = " ".join([*keep, s])
                if len(tokenizer(candidate, add_special_tokens=False).input_ids) > max_tokens:
                    break
                keep.append(s)
            rec["long_caption"] = " ".join(keep)
            cut += 1
        out.append(json.dumps(rec))
    path.write_text("\n".join(out) + "\n")
    return cut


def cap_items(data: EvalData, per_category: int) -> EvalData:
    """`data` with at most `per_category` SugarCrepe items of each category (the first
    ones in file order): every text is embedded again for each arm whose text path trains,
    so the item count sets most of the evaluation's cost."""
    if per_category <= 0:
        return data
    seen: dict[str, int] = {}
    keep = []
    for i, it in enumerate(data.items):
        if seen.get(it.category, 0) < per_category:
            seen[it.category] = seen.get(it.category, 0) + 1
            keep.append(i)
    return dataclasses.replace(data, items=[data.items[i] for i in keep], item_to_image=data.item_to_image[keep])


def word_order_data(model, root: Path, n: int, seed: int = 0) -> WordOrderData:
    pairs = write_word_order_pairs(root, n, seed)
    probe = [Sample(id=f"{p.id}_{k}", image=img) for p in pairs for k, img in enumerate((p.image_0, p.image_1))]
    feats, kept = tower_features(model, probe)
    if len(kept) != len(probe):
        raise RuntimeError(f"could not read {len(probe) - len(kept)} word-order images under {root}")
    return WordOrderData(pairs, feats[0::2], feats[1::2])


@dataclass
class Shared:
    """What the arms of one seed share."""

    common: list[str]
    base: VLM
    initial: dict[str, torch.Tensor]
    text_cache: TextStateCache
    data: TrainData
    data_long: TrainData
    eval_data: EvalData
    word_order: WordOrderData | None
    out: Path
    clip_overrides: list[str]


def _overrides(s: dict, out: Path, llm: str, tower: str, extra: list[str]) -> list[str]:
    return [f"data.root={out / 'shapes'}", f"data.shapes_n={s['scenes']}", f"data.data_fraction={s['train_fraction']}",
            "data.fraction_seed=0", f"train.max_steps={s['steps']}", f"train.batch_size={s['batch']}",
            f"data.eval_max_samples={s['eval']}", f"data.long_max_tokens={s['long_tokens']}", f"llm.name={llm}",
            f"vision.tower={tower}", "train.log_every=5", "train.eval_at_end=false", "train.save_every=0",
            f"train.warmup_steps={warmup_steps(s['steps'], 0.1)}", f"train.feature_cache_dir={out / 'features'}", *extra]


def _setup(s: dict, out: Path, llm: str, tower: str, extra: list[str], split: str = "test"):
    """The per-seed setup: data (written and cut once), backbones, initial projector,
    training records of both caption kinds, held-out data with tower features."""
    state: dict[str, Any] = {}

    def setup(seed: int) -> Shared:
        clip_overrides = [o[len("baseline."):] for o in extra if o.startswith("baseline.")]
        common = _overrides(s, out, llm, tower, [o for o in extra if not o.startswith("baseline.")])
        common += [f"train.seed={seed}"]
        if split == "val":
            common += ["data.eval_file=val.jsonl", "data.compositional_file=sugarcrepe_val"]
        cfg = load_config(recipe_config("discriminative"), common + PLAIN)
        root = ensure_data(cfg.data)
        set_seed(seed)
        base = VLM.build(cfg)
        if "cut" not in state:
            state["cut"] = cut_long_captions(root / "train.jsonl", base.tokenizer, s["long_tokens"] - 4)
            console.print(f"long captions: {state['cut']} cut to whole sentences within {s['long_tokens'] - 4} tokens")
        text_cache = state.setdefault("text_cache", TextStateCache())
        data = TrainData.prepare(base, cfg, "short_long", text_cache)
        long_cfg = load_config(recipe_config("discriminative"), common + ARMS["contrastive long"][0])
        data_long = TrainData.prepare(base, long_cfg, "short_long", text_cache)
        if "eval" not in state:
            # the sweep scores retrieval and SugarCrepe on the validation split only
            state["eval"] = cap_items(EvalData.prepare(base, cfg, benchmarks=split == "test"), s["comp_per_category"])
            state["wino"] = (word_order_data(base, out / "word_order", s["wino_pairs"]) if split == "test"
                             else None)
        initial = {k: v.detach().clone() for k, v in base.projector.state_dict().items()}
        return Shared(common, base, initial, text_cache, data, data_long, state["eval"], state["wino"], out,
                      clip_overrides)

    return setup


# ---------------------------------------------------------------- arms


def _vlm_arm(name: str, lr: float, tag: str, heldout: bool = True) -> Variant:
    """`heldout=False` (the sweep) skips the held-out caption loss, which no choice reads."""
    overrides, description = ARMS[name]

    def run(sh: Shared, seed: int) -> VariantResult:
        slug = _slug(name)
        cfg = load_config(recipe_config("discriminative"), sh.common + overrides + [
            f"train.lr={lr}", f"train.out_dir={sh.out / 'runs' / f'{tag}{slug}-seed{seed}'}"])
        if cfg.lora.enabled or cfg.embedding.soft_prompts:
            set_seed(seed)  # the same adapters and soft prompts for this seed, whatever ran before
            model = VLM.build(cfg)
        else:
            model = sh.base
        model.projector.load_state_dict(sh.initial)  # the seed's initial projector, for every arm
        model.embed_mean_ready.fill_(False)  # each arm estimates its own centring mean
        data = sh.data_long if name == "contrastive long" else sh.data
        result = train(cfg, model=model, data=data)
        model.eval()
        embedder = CachedTextEmbedder(model, sh.text_cache) if model.text_path_frozen() else model
        with torch.no_grad():
            metrics, items = embedding_items(embedder, sh.eval_data, sh.word_order, CATEGORIES)
            if heldout:
                metrics["heldout_caption_loss"] = heldout_ntp_loss(model, sh.eval_data, cfg)
        metrics["train_s"] = result.wall_time_s
        last = result.history[-1] if result.history else {}
        return VariantResult(metrics, items, {"lr": lr, "last_log": last, "steps": cfg.train.max_steps})

    return Variant(name, run, f"{description}; lr {lr:g}")


def _clip_arm(lr: float, tag: str, text_tower: str) -> Variant:
    def run(sh: Shared, seed: int) -> VariantResult:
        from vlmalign.baseline.clip import ClipBaselineConfig, ClipDualEncoder, train_clip_baseline
        from vlmalign.config import _update, parse_overrides

        out = sh.out / "runs" / f"{tag}clip-peer-seed{seed}"
        # no on-disk feature store: it holds the VLM's patch features, the peer pools them
        cfg = load_config(recipe_config("align-clip"), sh.common + [f"train.lr={lr}", f"train.out_dir={out}",
                                                                    "train.feature_cache_dir="])
        # the text transformer at a tenth of the projections' lr (2e-5 at the default 2e-4)
        options = ClipBaselineConfig(text_tower=text_tower, text_lr=lr / 10)
        _update(options, parse_overrides(sh.clip_overrides), "baseline.")
        trained = train_clip_baseline(cfg, out, options)
        model = ClipDualEncoder.from_pretrained(out)
        model.eval()
        with torch.no_grad():
            metrics, items = embedding_items(model, sh.eval_data, sh.word_order, CATEGORIES)
        metrics["train_s"] = trained["train_s"]
        return VariantResult(metrics, items, {"lr": lr, "text_lr": lr / 10,
                                              "train_clip_loss": trained.get("train_clip_loss")})

    return Variant(CLIP, run, f"open_clip dual encoder (EfficientNet-Lite0 + MiniLM); lr {lr:g}, text lr {lr / 10:g}")


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _arm(name: str, lr: float, tag: str, text_tower: str, heldout: bool = True) -> Variant:
    return _clip_arm(lr, tag, text_tower) if name == CLIP else _vlm_arm(name, lr, tag, heldout)


ARM_NAMES = (*ARMS, CLIP)


# ---------------------------------------------------------------- the experiment


def sweep_experiment(s: dict, out: Path, llm: str, tower: str, extra: list[str], text_tower: str) -> Experiment:
    """Every arm at every lr of the grid, `sweep_steps` steps, scored on the validation
    split (selection score: text->image R@1 + compositional accuracy)."""
    # the seeds of the main run are not the sweep's (it runs `sweep_seed`): a rerun with
    # other seeds in the same folder resumes the finished sweep
    ss = {k: v for k, v in s.items() if k != "seeds"} | {"steps": s["sweep_steps"]}
    variants = []
    for name in ARM_NAMES:
        for lr in s["lrs"]:
            v = _arm(name, lr, f"sweep-lr{lr:g}-", text_tower, heldout=False)
            variants.append(Variant(f"{name} @ {lr:g}", v.run, v.description))
    return Experiment(
        name="vladva-sweep", title="VladVA: learning-rate sweep (validation split)", variants=variants,
        seeds=[s["sweep_seed"]], setup=_setup(ss, out, llm, tower, extra, split="val"),
        metrics=[Metric("t2i_R@1", "val text->image R@1", 100.0 / s["eval"]), Metric("comp", "val compositional", 50.0)],
        claims=sweep_claims(s["lrs"]),
        settings={"sizes": ss, "llm": llm, "tower": tower, "extra": extra, "text_tower": text_tower},
        data_files=lambda: [out / "shapes" / "train.jsonl", out / "shapes" / "val.jsonl"],
    )


def sweep_claims(lrs: list[float]) -> list[stats.Claim]:
    """Per arm, whether its highest rate of the grid beats its lowest on validation R@1:
    "inconclusive" says the sweep could not tell the rates apart (its choice is then noise)."""
    if len(lrs) < 2:
        return []
    hi, lo = f"{max(lrs):g}", f"{min(lrs):g}"
    return [stats.Claim(f"lr-{_slug(name)}", f"{name}: lr {hi} beats lr {lo} (val text->image R@1)", "t2i_R@1",
                        f"{name} @ {hi}", f"{name} @ {lo}", 0.0, paper="the sweep's choice") for name in ARM_NAMES]


def parse_sizes(overrides: list[str]) -> dict[str, Any]:
    """`size.KEY=VALUE` overrides (e.g. `size.steps=10 size.lrs=1e-3,2e-4 size.seeds=0,1,2`)
    as sizes: numbers parsed, comma lists as lists."""
    def value(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    out: dict[str, Any] = {}
    for o in overrides:
        key, _, text = o[len("size."):].partition("=")
        out[key] = [value(t) for t in text.split(",")] if key in ("lrs", "seeds") else value(text)
    return out


def best_lrs(summary: dict, lrs: list[float]) -> dict[str, float]:
    """Per arm, the lr of the best validation score (t2i R@1 + compositional)."""
    def score(name: str, lr: float) -> float:
        key = f"{name} @ {lr:g}"
        return sum(summary["metrics"][m]["variants"][key]["mean"] for m in ("t2i_R@1", "comp")
                   if key in summary["metrics"].get(m, {}).get("variants", {}))

    return {name: max(lrs, key=lambda lr, n=name: score(n, lr)) for name in ARM_NAMES}


def run_vladva(out: str | Path = "runs/vladva", quick: bool = False, seeds: list[int] | None = None,
               llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
               clip_text_tower: str = "minilm", sizes: dict | None = None, command: str = "",
               report_only: bool = False) -> dict:
    """Sweep the lr of every arm, then run every arm on every seed; returns the summary
    (also `results.json`, `table.md`, `plot.png` under `out`, the sweep's under
    `out/sweep`)."""
    out = Path(out)
    extra = list(extra or [])
    sizes = dict(sizes or {}) | parse_sizes([o for o in extra if o.startswith("size.")])
    extra = [o for o in extra if not o.startswith("size.")]
    s = (QUICK if quick else FULL) | {k: v for k, v in sizes.items() if v is not None}
    if unknown := set(s) - set(FULL):
        raise ValueError(f"unknown vladva sizes {sorted(unknown)}; known: {', '.join(FULL)}")
    if seeds:
        s["seeds"] = list(seeds)
    log = console.print
    if len(s["lrs"]) > 1:
        sweep = run_experiment(sweep_experiment(s, out, llm, tower, extra, clip_text_tower), out / "sweep", log=log,
                               execute=not report_only)
        lrs = best_lrs(sweep, s["lrs"])
        log(f"chosen learning rates (validation): {lrs}")
    else:  # one lr for every arm: nothing to choose, no sweep
        sweep = {"metrics": {}}
        lrs = {name: s["lrs"][0] for name in ARM_NAMES}
        log(f"one learning rate for every arm, no sweep: {s['lrs'][0]:g}")
    exp = Experiment(
        name="vladva", title="VladVA on shapes: ablation and the CLIP peer",
        variants=[_arm(name, lrs[name], "", clip_text_tower) for name in ARM_NAMES],
        seeds=list(s["seeds"]), setup=_setup(s, out, llm, tower, extra), metrics=metrics(s["eval"]), claims=claims(),
        settings={"sizes": {k: v for k, v in s.items() if k != "seeds"}, "llm": llm, "tower": tower, "extra": extra,
                  "text_tower": clip_text_tower, "lrs": lrs},
        data_files=lambda: [out / "shapes" / "train.jsonl", out / "shapes" / "test.jsonl", out / "shapes" / "sugarcrepe",
                            out / "word_order", out / "shapes" / "zeroshot"],
        extra_summary=lambda records: {"learning_rates": lrs, "sweep": {
            k: {v: round(x["mean"], 2) for v, x in m["variants"].items()} for k, m in sweep["metrics"].items()}},
        command=command,
    )
    summary = run_experiment(exp, out, log=log, execute=not report_only)
    for c in summary["claims"]:
        log(f"[bold]{c['verdict']}[/]: {c['text']}")
    log(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'plot.png'}")
    return summary


def config_for(name: str, common: list[str]) -> Config:
    """The config an arm trains with (for inspection and tests)."""
    return load_config(recipe_config("align-clip" if name == CLIP else "discriminative"), common + ARMS.get(name, ([], ""))[0])
