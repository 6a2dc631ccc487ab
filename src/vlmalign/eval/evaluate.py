"""Evaluate a model on held-out data.

Two layers:

- `embedding_metrics(embedder, data)`: everything computed from L2-normalised image and
  text embeddings, for ANY embedder (an object with `embed_images(features_or_images) ->
  [N, D]` and `embed_texts(list[str]) -> [N, D]`): the VLM's prompted embeddings and the
  CLIP peer baseline (baseline/clip.py) run through this same code. Keys: `emb_` retrieval
  on the held-out pairs, `gap_` modality gap, `comp_emb_` compositional accuracy per
  hard-negative category, `kp_` retrieval on a Karpathy-split file (5 captions per image,
  COCO/Flickr30k protocol) and `zs_acc` zero-shot classification, the last two when their
  files exist under the data root (see `benchmark_paths`).
- `evaluate(model, data, cfg, text_cache)`: the VLM: the above, plus CG-VLM patch-token
  similarity (`patch_`, `comp_patch_`) and the held-out next-token loss.

Writes metrics JSON next to the checkpoint and prints a table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from rich.table import Table
from torch import Tensor

from vlmalign import cache, losses
from vlmalign.config import Config
from vlmalign.data.classification import DEFAULT_TEMPLATES, class_embeddings, load_image_folder
from vlmalign.data.collate import CaptionCollator
from vlmalign.data.karpathy import load_karpathy
from vlmalign.data.sample import CompositionalItem, LoadReport, Sample
from vlmalign.data.splits import (
    benchmark_paths,
    compositional_items,
    compositional_path,
    eval_samples,
    holds_out,
)
from vlmalign.eval.metrics import (
    compositional_accuracy,
    modality_gap,
    retrieval_metrics,
    zero_shot_accuracy,
)
from vlmalign.models.vlm import VLM
from vlmalign.objective import next_token_part

METRICS_NAME = "metrics.json"

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """What the embedding metrics need. `embed_images` takes cached tower features (the
    rows of `EvalData.features`) or PIL images; both return L2-normalised [N, D]."""

    def embed_images(self, images: Tensor | list[Image.Image]) -> Tensor: ...

    def embed_texts(self, texts: list[str]) -> Tensor: ...


class FeatureModel(Protocol):
    """What `EvalData.prepare` needs to compute (frozen) tower features once per image
    (the contract of `cache.tower_features`; VLM and the CLIP baseline satisfy it)."""

    def preprocess(self, images: list[Image.Image]) -> Tensor: ...

    def tower_features(self, pixel_values: Tensor) -> Tensor: ...

    def projector_device(self) -> torch.device: ...


def _rows(rows: list[int]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class EvalData:
    """Held-out data of every task, with tower features of each distinct image computed
    once (the tower is frozen in every recipe evaluated here). Each task refers to images
    by their row in `features`."""

    images: list[Path]  # distinct images, all tasks together
    features: Tensor  # [N_img, ...] tower features, one row per image
    captions: list[str]  # held-out pairs
    text_to_image: Tensor  # [N_txt] row in `features` of each caption's image
    items: list[CompositionalItem]
    item_to_image: Tensor  # [N_items]
    report: LoadReport = field(default_factory=LoadReport)
    # Karpathy-split retrieval (all captions of each test image); empty when absent.
    kp_captions: list[str] = field(default_factory=list)
    kp_text_to_image: Tensor = field(default_factory=lambda: _rows([]))  # [N_kp_txt]
    # Zero-shot classification; empty when absent.
    zs_image_rows: Tensor = field(default_factory=lambda: _rows([]))  # [N_zs]
    zs_labels: Tensor = field(default_factory=lambda: _rows([]))  # [N_zs] class index
    zs_class_names: list[str] = field(default_factory=list)
    # Skips per task (`pairs`, `compositional`, `karpathy`, `zeroshot`, `images`).
    reports: dict[str, LoadReport] = field(default_factory=dict)

    def skip_summary(self) -> dict[str, dict]:
        """Each task's skips apart (`LoadReport.as_dict()` per task)."""
        return {task: r.as_dict() for task, r in self.reports.items()}

    @classmethod
    def prepare(cls, model: FeatureModel, cfg: Config, benchmarks: bool = True, plan: EvalPlan | None = None) -> EvalData:
        """Tower features of every distinct image of `plan` (default `EvalPlan.load(cfg,
        benchmarks)`: the held-out pairs, SugarCrepe items and, with `benchmarks`, the
        Karpathy and zero-shot files), computed once with `model`."""
        plan = plan if plan is not None else EvalPlan.load(cfg, benchmarks)
        report = plan.report
        samples, items = plan.samples, plan.items
        kp_images, kp_captions, kp_owner = plan.kp_images, plan.kp_captions, plan.kp_owner
        zs_images, zs_labels = plan.zs_images, plan.zs_labels
        images = plan.images()
        probe = [Sample(id=str(i), image=p) for i, p in enumerate(images)]
        image_report = plan.reports.setdefault("images", LoadReport())
        feats, kept = cache.tower_features(model, probe, report=image_report)
        report.absorb(image_report)
        row = {str(s.image): i for i, s in enumerate(kept)}
        samples = [s for s in samples if str(s.image) in row]
        items = [it for it in items if str(it.image) in row]
        kp = [(c, row[str(kp_images[o])]) for c, o in zip(kp_captions, kp_owner.tolist(), strict=True)
              if str(kp_images[o]) in row]
        zs = [(row[str(p)], y) for p, y in zip(zs_images, zs_labels.tolist(), strict=True) if str(p) in row]
        if report.total_skipped():
            log.warning("eval data: %s", report.summary())
        return cls(
            images=[s.image for s in kept],
            features=feats,
            captions=[s.caption for s in samples],
            text_to_image=_rows([row[str(s.image)] for s in samples]),
            items=items,
            item_to_image=_rows([row[str(it.image)] for it in items]),
            report=report,
            kp_captions=[c for c, _ in kp],
            kp_text_to_image=_rows([r for _, r in kp]),
            zs_image_rows=_rows([r for r, _ in zs]),
            zs_labels=_rows([y for _, y in zs]),
            zs_class_names=plan.zs_names if zs else [],
            reports=plan.reports,
        )


@dataclass
class EvalPlan:
    """What an evaluation will run on, loaded but not yet computed: each task's records,
    where they come from, and one line for each task left out saying why (the switch that
    is off, or the file that would enable it). `reports` keeps each task's skips apart
    (`pairs`, `compositional`, `karpathy`, `zeroshot`); `report` holds them all."""

    samples: list[Sample]
    items: list[CompositionalItem]
    sources: dict[str, str]  # task -> where its records come from
    not_run: list[str]  # one line per task left out
    report: LoadReport
    reports: dict[str, LoadReport]
    kp_images: list[Path] = field(default_factory=list)
    kp_captions: list[str] = field(default_factory=list)
    kp_owner: Tensor = field(default_factory=lambda: _rows([]))  # [N_kp_txt] index into kp_images
    zs_images: list[Path] = field(default_factory=list)
    zs_labels: Tensor = field(default_factory=lambda: _rows([]))
    zs_names: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, cfg: Config, benchmarks: bool = True) -> EvalPlan:
        """Load what `cfg` evaluates: held-out pairs (`data.eval_file`, the held-out split of
        a user's training file, or the shapes layout's test split), SugarCrepe items, and
        with `benchmarks` the Karpathy and zero-shot files; `eval.*` switches leave tasks
        out. `data.eval_max_samples` caps the pairs and the Karpathy test images."""
        dc, ec = cfg.data, cfg.eval
        reports = {k: LoadReport() for k in ("pairs", "compositional", "karpathy", "zeroshot")}
        sources: dict[str, str] = {}
        not_run: list[str] = []
        samples: list[Sample] = []
        if not ec.retrieval:
            not_run.append("held-out retrieval: off (eval.retrieval=false)")
        else:
            samples = eval_samples(dc, reports["pairs"])
            if dc.eval_file.strip():
                sources["pairs"] = f"data.eval_file={dc.eval_file}"
            elif holds_out(dc):
                sources["pairs"] = (f"held-out split of data.train_file={dc.train_file} (data.heldout_fraction="
                                    f"{dc.heldout_fraction:g}, at most {dc.heldout_max}, seed {dc.heldout_seed})")
            else:
                sources["pairs"] = f"{Path(dc.root) / 'test.jsonl'} (shapes test split)"
            if not samples:
                not_run.append("held-out retrieval: no pairs; set data.eval_file=FILE (a captions JSONL)"
                               + (" or train on at least 2 records to hold some out" if holds_out(dc) else ""))
        items: list[CompositionalItem] = []
        comp = compositional_path(dc)
        if not ec.compositional:
            not_run.append("compositional (SugarCrepe): off (eval.compositional=false)")
        elif comp is None:
            not_run.append("compositional (SugarCrepe): skipped; set data.compositional_file=FILE or DIR "
                           "(SugarCrepe JSON: filename, caption, negative_caption) to run it")
        else:
            items = compositional_items(dc, reports["compositional"])
            sources["compositional"] = str(comp)
        plan = cls(samples, items, sources, not_run, LoadReport(), reports)
        if benchmarks:
            kp_path, zs_path = benchmark_paths(dc)
            if not ec.karpathy:
                not_run.append("Karpathy retrieval: off (eval.karpathy=false)")
            elif kp_path is None:
                not_run.append("Karpathy retrieval: skipped; set data.karpathy_file=FILE (a Karpathy-split JSON "
                               "such as dataset_coco.json or dataset_flickr30k.json) to run it")
            else:
                plan.kp_images, plan.kp_captions, plan.kp_owner = load_karpathy(kp_path, dc.root, "test",
                                                                                reports["karpathy"])
                if dc.eval_max_samples:
                    plan.kp_images = plan.kp_images[: dc.eval_max_samples]
                    keep = plan.kp_owner < len(plan.kp_images)
                    plan.kp_captions = [c for c, k in zip(plan.kp_captions, keep.tolist(), strict=True) if k]
                    plan.kp_owner = plan.kp_owner[keep]
                sources["karpathy"] = str(kp_path)
            if not ec.zeroshot:
                not_run.append("zero-shot classification: off (eval.zeroshot=false)")
            elif zs_path is None:
                not_run.append("zero-shot classification: skipped; set data.zeroshot_dir=DIR (one folder of "
                               "images per class) to run it")
            else:
                folder = load_image_folder(zs_path, reports["zeroshot"])
                plan.zs_images, plan.zs_labels, plan.zs_names = folder.images, folder.labels, folder.class_names
                sources["zeroshot"] = str(zs_path)
        for r in reports.values():
            plan.report.absorb(r)
        return plan

    def images(self) -> list[Path]:
        """The distinct images of every task, in order."""
        return list(dict.fromkeys([s.image for s in self.samples] + [it.image for it in self.items]
                                  + self.kp_images + self.zs_images))

    def text_passes(self) -> int:
        """Texts the evaluation runs through the LLM (pairs twice: embedding and held-out
        loss; items twice: positive and negative)."""
        return 2 * len(self.samples) + 2 * len(self.items) + len(self.kp_captions) + 8 * len(self.zs_names)

    def describe(self) -> list[str]:
        """One line per task that runs (its count and source), then the tasks left out."""
        lines = []
        if self.samples:
            lines.append(f"held-out retrieval: {len(self.samples)} pairs from {self.sources['pairs']}")
        if self.items:
            lines.append(f"compositional (SugarCrepe): {len(self.items)} items from {self.sources['compositional']}")
        if self.kp_captions:
            lines.append(f"Karpathy retrieval: {len(self.kp_images)} images, {len(self.kp_captions)} captions "
                         f"from {self.sources['karpathy']}")
        if self.zs_images:
            lines.append(f"zero-shot classification: {len(self.zs_images)} images, {len(self.zs_names)} classes "
                         f"from {self.sources['zeroshot']}")
        return lines + self.not_run

    def skip_summary(self) -> dict[str, dict]:
        """Each task's `LoadReport.as_dict()`, apart: held-out pairs and SugarCrepe items
        are never added into one count."""
        return {task: r.as_dict() for task, r in self.reports.items()}


def task_rows(text_to_row: Tensor) -> tuple[Tensor, Tensor]:
    """The feature rows a retrieval task uses, and each text's index among them.

    `EvalData.features` holds the images of every task; a task's retrieval ranks only the
    images its texts refer to, so another task's images are not distractors (and images
    without a caption of this task, for which image->text recall is undefined, drop out).
    Returns `(rows [N_sub], text_to_image [N_txt] in 0..N_sub-1)`.
    """
    return torch.unique(text_to_row, sorted=True, return_inverse=True)


def subset_retrieval(image_emb: Tensor, text_emb: Tensor, text_to_row: Tensor) -> dict[str, float]:
    """R@1/5/10 both ways between `text_emb` [N_txt, D] and the rows of `image_emb`
    [N_img, D] that `text_to_row` [N_txt] names (see `task_rows`)."""
    rows, t2i = task_rows(text_to_row)
    # (images, texts) rather than their score matrix: ranked tile by tile (eval/ranking.py)
    return retrieval_metrics((image_emb[rows.to(image_emb.device)], text_emb), t2i)


@torch.no_grad()
def embedding_metrics(
    embedder: Embedder, data: EvalData, templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, float]:
    """Every metric computed from embeddings, for any `Embedder` (VLM or CLIP baseline).

    Keys: `emb_{i2t,t2i}_R@{1,5,10}` on the held-out pairs; `gap_*` (modality gap of the
    matched pairs, Liang et al. 2022); `comp_emb_<category>`, `comp_emb_mean`,
    `comp_emb_overall` (SugarCrepe protocol); `kp_{i2t,t2i}_R@{1,5,10}` and `kp_images`
    (Karpathy split); `zs_acc` (top-1, %), `zs_top5_acc` (more than 5 classes) and
    `zs_images` (zero-shot classification with `templates`, CLIP prompt ensembling).
    """
    metrics: dict[str, float] = {}
    img_emb = embedder.embed_images(data.features)  # [N_img, D]
    if data.captions:
        txt_emb = embedder.embed_texts(data.captions)  # [N_txt, D]
        metrics |= {f"emb_{k}": v for k, v in subset_retrieval(img_emb, txt_emb, data.text_to_image).items()}
        if len(data.captions) >= 2:  # the gap's within-modality cosines need a pair of pairs
            metrics |= {f"gap_{k}": v for k, v in modality_gap(img_emb[data.text_to_image], txt_emb).items()}
    if data.items:
        cats = [it.category for it in data.items]
        img_i = img_emb[data.item_to_image]  # [N_items, D]
        pos = (img_i * embedder.embed_texts([it.caption for it in data.items])).sum(-1)
        neg = (img_i * embedder.embed_texts([it.negative_caption for it in data.items])).sum(-1)
        metrics |= {f"comp_emb_{c}": v for c, v in compositional_accuracy(pos, neg, cats).items()}
        metrics |= item_counts(cats)
    if data.captions:
        metrics["eval_pairs"] = float(len(data.captions))
    if data.kp_captions:
        kp_emb = embedder.embed_texts(data.kp_captions)  # [N_kp_txt, D]
        metrics |= {f"kp_{k}": v for k, v in subset_retrieval(img_emb, kp_emb, data.kp_text_to_image).items()}
        metrics["kp_images"] = float(len(torch.unique(data.kp_text_to_image)))
        metrics["kp_captions"] = float(len(data.kp_captions))
    if data.zs_class_names and len(data.zs_image_rows):
        cls_emb = class_embeddings(embedder.embed_texts, data.zs_class_names, templates)  # [C, D]
        ks = (1, 5) if len(data.zs_class_names) > 5 else (1,)
        acc = zero_shot_accuracy(img_emb[data.zs_image_rows], cls_emb.to(img_emb.device), data.zs_labels, ks)
        metrics["zs_acc"] = acc["top1_acc"]
        if "top5_acc" in acc:
            metrics["zs_top5_acc"] = acc["top5_acc"]
        metrics["zs_images"] = float(len(data.zs_image_rows))
    return metrics


def item_counts(categories: Sequence[str]) -> dict[str, float]:
    """The counts behind the compositional accuracies: `compositional_items` (all) and
    `compositional_items_<category>`."""
    counts: dict[str, float] = {"compositional_items": float(len(categories))}
    for c in categories:
        counts[f"compositional_items_{c}"] = counts.get(f"compositional_items_{c}", 0.0) + 1.0
    return counts


class CachedTextEmbedder:
    """A VLM's embeddings with text states taken from a `TextStateCache`: valid while
    nothing on the text path trains, and then each distinct text is run once across
    evaluations and recipes."""

    def __init__(self, model: VLM, text_cache: cache.TextStateCache) -> None:
        self.model = model
        self.text_cache = text_cache

    def embed_images(self, images: Tensor | list[Image.Image]) -> Tensor:
        return self.model.embed_images(images)

    def embed_texts(self, texts: list[str]) -> Tensor:
        states = self.text_cache.states(self.model, texts)  # [N, D] raw states
        return self.model.finish_embedding(states.to(self.model.projector_device()))


def _caption_tokens(model: VLM, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Caption token embeddings [N, T, D] from the LLM input table, and their mask [N, T]."""
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, max_tokens)
    batch = collate([{"index": i, "caption": t} for i, t in enumerate(texts)])
    ids = batch["caption_ids"].to(model.projector_device())
    return model.input_embeddings(ids), batch["caption_mask"].to(ids.device)


@torch.no_grad()
def heldout_ntp_loss(model: VLM, data: EvalData, cfg: Config, batch_size: int = 32, fmt: str | None = None) -> float:
    """Token-weighted mean next-token loss of the held-out captions given their images, in
    caption format `fmt` (default: the model's training format)."""
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens,
                              prompt=model.caption_prompt(fmt))
    total, tokens = 0.0, 0
    dev = model.projector_device()
    for i in range(0, len(data.captions), batch_size):
        caps = data.captions[i : i + batch_size]
        b = collate([{"index": j, "caption": c} for j, c in enumerate(caps)])
        visual = model.visual_tokens(features=data.features[data.text_to_image[i : i + batch_size]].to(dev))
        soft = b["soft_mask"].to(dev) if "soft_mask" in b else None
        out, _ = next_token_part(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev), visual,
                                 soft_mask=soft)
        n = int(out["ntp_tokens"])
        total += float(out["ntp_loss"]) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def ensure_embedding_mean(model: VLM, cfg: Config, fallback: Sequence[str] = ()) -> bool:
    """Give a model that centres its embeddings but has no mean state yet (freshly built,
    never trained) one, estimated as training does: on the first `embedding.centre_samples`
    training captions, or on `fallback` texts when the training file cannot be read.
    Returns whether a mean was estimated here."""
    if not model.cfg.embedding.centre or bool(model.embed_mean_ready):
        return False
    from vlmalign.data.splits import train_samples

    try:
        texts = [s.caption for s in train_samples(cfg.data)][: cfg.embedding.centre_samples]
        where = "training captions"
    except (OSError, ValueError):
        texts = []
    if not texts:
        texts, where = list(fallback)[: cfg.embedding.centre_samples], "evaluation captions"
    if not texts:
        raise ValueError("embedding.centre is on, the model has no mean state yet and there are no captions to "
                         "estimate it on; set data.train_file, or embedding.centre=false")
    log.warning("the model has no embedding mean yet (never trained): estimating it on %d %s", len(texts), where)
    model.set_embedding_mean(torch.cat([model.text_states(texts[i : i + 64]) for i in range(0, len(texts), 64)]))
    return True


@torch.no_grad()
def evaluate(
    model: VLM, data: EvalData, cfg: Config, text_cache: cache.TextStateCache | None = None
) -> dict[str, float]:
    """All metrics for one VLM on `data`; keys are prefixed by the similarity used:
    `emb_` / `comp_emb_` / `kp_` / `zs_` / `gap_` (prompted last-token embeddings, through
    `embedding_metrics`, the code the CLIP baseline uses too), `patch_` / `comp_patch_`
    (CG-VLM patch-token similarity); plus `heldout_ntp_loss`, `eval_pairs`, `eval_seconds`."""
    t0 = time.perf_counter()
    model.eval()
    ensure_embedding_mean(model, cfg, data.captions)
    dev = model.projector_device()
    text_cache = text_cache if text_cache is not None else cache.TextStateCache()
    frozen_text = model.text_path_frozen()
    embedder: Embedder = CachedTextEmbedder(model, text_cache) if frozen_text else model

    # Prompted embeddings (Ak et al., VladVA): retrieval, gap, compositionality, benchmarks.
    metrics = embedding_metrics(embedder, data)
    log.info("eval: prompted embeddings done at %.1f s", time.perf_counter() - t0)

    # CG-VLM patch-token similarity, on the images of the pairs and the items only.
    k = cfg.objective.patch_pool
    if not data.captions and not data.items:
        raise ValueError(f"no held-out pairs or compositional items under {cfg.data.root}; check data.eval_file")
    rows, inverse = task_rows(torch.cat([data.text_to_image, data.item_to_image]))
    visual = model.visual_tokens(features=data.features[rows].to(dev))  # [N_sub, Q, D]
    pooled = losses.pool_visual_tokens(visual, model.projector.output_grid, k)  # [N_sub, k*k, D]
    if data.captions:
        pair_rows, t2i = task_rows(inverse[: len(data.captions)])
        tok, mask = _caption_tokens(model, data.captions, cfg.data.max_caption_tokens)
        patch_sim = losses.patch_token_similarity(pooled[pair_rows], tok, mask)  # [N_pairs_img, N_txt]
        metrics |= {f"patch_{k}": v for k, v in retrieval_metrics(patch_sim, t2i).items()}

    # Compositionality: is s(image, positive) > s(image, hard negative)?
    if data.items:
        cats = [it.category for it in data.items]
        pooled_i = pooled[inverse[len(data.captions) :]]
        ptok, pmask = _caption_tokens(model, [it.caption for it in data.items], cfg.data.max_caption_tokens)
        ntok, nmask = _caption_tokens(model, [it.negative_caption for it in data.items], cfg.data.max_caption_tokens)
        pos = losses.patch_token_similarity(pooled_i, ptok, pmask).diagonal()
        neg = losses.patch_token_similarity(pooled_i, ntok, nmask).diagonal()
        metrics |= {f"comp_patch_{c}": v for c, v in compositional_accuracy(pos, neg, cats).items()}

    log.info("eval: compositional done at %.1f s", time.perf_counter() - t0)
    if data.captions:
        metrics["heldout_ntp_loss"] = heldout_ntp_loss(model, data, cfg)
    metrics["eval_pairs"] = float(len(data.captions))
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


# Rows of the comparison table: metric key -> (label, format).
ROWS = {
    "emb_i2t_R@1": ("image->text R@1 (emb)", "{:.1f}"),
    "emb_i2t_R@5": ("image->text R@5 (emb)", "{:.1f}"),
    "emb_t2i_R@1": ("text->image R@1 (emb)", "{:.1f}"),
    "emb_t2i_R@5": ("text->image R@5 (emb)", "{:.1f}"),
    "patch_i2t_R@1": ("image->text R@1 (patch)", "{:.1f}"),
    "patch_i2t_R@5": ("image->text R@5 (patch)", "{:.1f}"),
    "patch_t2i_R@1": ("text->image R@1 (patch)", "{:.1f}"),
    "patch_t2i_R@5": ("text->image R@5 (patch)", "{:.1f}"),
    "comp_emb_mean": ("compositional acc (emb)", "{:.1f}"),
    # SugarCrepe's seven categories (shapes has five of them); absent ones are not shown.
    **{f"comp_emb_{c}": (f"  comp {c} (emb)", "{:.1f}") for c in (
        "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
    )},
    "comp_patch_mean": ("compositional acc (patch)", "{:.1f}"),
    "kp_i2t_R@1": ("Karpathy image->text R@1", "{:.1f}"),
    "kp_i2t_R@5": ("Karpathy image->text R@5", "{:.1f}"),
    "kp_t2i_R@1": ("Karpathy text->image R@1", "{:.1f}"),
    "kp_t2i_R@5": ("Karpathy text->image R@5", "{:.1f}"),
    "zs_acc": ("zero-shot top-1 acc", "{:.1f}"),
    "mcq_lik_acc": ("MCQ acc, likelihood", "{:.1f}"),
    "mcq_gen_acc": ("MCQ acc, generation", "{:.1f}"),
    "mcq_gen_unparsed": ("MCQ answers not parsed (%)", "{:.1f}"),
    "caption_cider": ("CIDEr", "{:.3f}"),
    "caption_bleu4": ("BLEU-4", "{:.3f}"),
    "eval_pairs": ("held-out pairs (count)", "{:.0f}"),
    "compositional_items": ("compositional items (count)", "{:.0f}"),
    "kp_images": ("Karpathy test images (count)", "{:.0f}"),
    "zs_images": ("zero-shot images (count)", "{:.0f}"),
    "mcq_items": ("MCQ items (count)", "{:.0f}"),
    "train_ntp_loss": ("final train NTP loss", "{:.3f}"),
    "heldout_ntp_loss": ("held-out NTP loss", "{:.3f}"),
    "train_s": ("train wall time (s)", "{:.0f}"),
}


def comparison_table(results: dict[str, dict[str, float]], title: str) -> Table:
    """Metrics as rows, recipes as columns (fits a terminal for any number of metrics)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key, (label, fmt) in ROWS.items():
        if not any(key in m for m in results.values()):
            continue
        table.add_row(label, *[fmt.format(m[key]) if key in m else "-" for m in results.values()])
    return table
