"""Evaluate a model on held-out pairs: retrieval (prompted embeddings and CG-VLM patch-token
similarity), compositionality per hard-negative category, held-out next-token loss, and
the modality gap. Writes metrics JSON next to the checkpoint and prints a table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from vlmalign import cache, losses
from vlmalign.config import Config
from vlmalign.data.collate import CaptionCollator
from vlmalign.data.sample import CompositionalItem, LoadReport, Sample
from vlmalign.data.splits import compositional_items, eval_samples
from vlmalign.eval.metrics import compositional_accuracy, modality_gap, retrieval_metrics
from vlmalign.eval.report import write_metrics
from vlmalign.models.vlm import VLM

METRICS_NAME = "metrics.json"

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Held-out pairs and SugarCrepe-style items, with tower features of every distinct
    image computed once (the tower is frozen in every recipe evaluated here)."""

    images: list[Path]  # distinct images
    features: Tensor  # [N_img, P, Dv]
    captions: list[str]
    text_to_image: Tensor  # [N_txt] image index of each caption
    items: list[CompositionalItem]
    item_to_image: Tensor  # [N_items]
    report: LoadReport = field(default_factory=LoadReport)

    @classmethod
    def prepare(cls, model: VLM, cfg: Config) -> EvalData:
        report = LoadReport()
        samples = eval_samples(cfg.data, report)
        items = compositional_items(cfg.data, report)
        images = list(dict.fromkeys([s.image for s in samples] + [it.image for it in items]))
        probe = [Sample(id=str(i), image=p) for i, p in enumerate(images)]
        feats, kept = cache.tower_features(model, probe, report=report)
        row = {str(s.image): i for i, s in enumerate(kept)}
        samples = [s for s in samples if str(s.image) in row]
        items = [it for it in items if str(it.image) in row]
        return cls(
            images=[s.image for s in kept],
            features=feats,
            captions=[s.caption for s in samples],
            text_to_image=torch.tensor([row[str(s.image)] for s in samples], dtype=torch.long),
            items=items,
            item_to_image=torch.tensor([row[str(it.image)] for it in items], dtype=torch.long),
            report=report,
        )


def _caption_tokens(model: VLM, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Caption token embeddings [N, T, D] from the LLM input table, and their mask [N, T]."""
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, max_tokens)
    batch = collate([{"index": i, "caption": t} for i, t in enumerate(texts)])
    ids = batch["caption_ids"].to(model.projector_device())
    return model.input_embeddings(ids), batch["caption_mask"].to(ids.device)


@torch.no_grad()
def heldout_ntp_loss(model: VLM, data: EvalData, cfg: Config, batch_size: int = 32) -> float:
    """Token-weighted mean next-token loss of the held-out captions given their images."""
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens)
    total, tokens = 0.0, 0
    dev = model.projector_device()
    for i in range(0, len(data.captions), batch_size):
        caps = data.captions[i : i + batch_size]
        b = collate([{"index": j, "caption": c} for j, c in enumerate(caps)])
        visual = model.visual_tokens(features=data.features[data.text_to_image[i : i + batch_size]].to(dev))
        out = model.ntp(b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev), visual)
        n = int(out["ntp_tokens"])
        total += float(out["ntp_loss"]) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def evaluate(
    model: VLM, data: EvalData, cfg: Config, text_cache: cache.TextStateCache | None = None
) -> dict[str, float]:
    """All metrics for one model on `data`; keys are prefixed by the similarity used:
    `emb_` (prompted last-token embeddings), `patch_` (CG-VLM patch-token similarity)."""
    t0 = time.perf_counter()
    model.eval()
    dev = model.projector_device()
    metrics: dict[str, float] = {}
    text_cache = text_cache if text_cache is not None else cache.TextStateCache()
    frozen_text = not any(p.requires_grad for p in model.llm.parameters())

    def text_emb(texts: list[str]) -> Tensor:
        if frozen_text:
            return model.finish_embedding(text_cache.states(model, texts).to(dev))
        return model.embed_texts(texts)

    # Prompted embeddings (Ak et al., VladVA): retrieval, modality gap.
    img_emb = model.embed_images(data.features.to(dev))  # [N_img, D]
    txt_emb = text_emb(data.captions)  # [N_txt, D]
    metrics |= {f"emb_{k}": v for k, v in retrieval_metrics(img_emb @ txt_emb.T, data.text_to_image).items()}
    metrics |= {f"gap_{k}": v for k, v in modality_gap(img_emb[data.text_to_image], txt_emb).items()}
    log.info("eval: prompted embeddings done at %.1f s", time.perf_counter() - t0)

    # CG-VLM patch-token similarity.
    k = cfg.objective.patch_pool
    visual = model.visual_tokens(features=data.features.to(dev))
    pooled = losses.pool_visual_tokens(visual, model.projector.output_grid, k)  # [N_img, k*k, D]
    tok, mask = _caption_tokens(model, data.captions, cfg.data.max_caption_tokens)
    patch_sim = losses.patch_token_similarity(pooled, tok, mask)
    metrics |= {f"patch_{k}": v for k, v in retrieval_metrics(patch_sim, data.text_to_image).items()}

    # Compositionality: is s(image, positive) > s(image, hard negative)?
    if data.items:
        cats = [it.category for it in data.items]
        pos_t = [it.caption for it in data.items]
        neg_t = [it.negative_caption for it in data.items]
        img_i = img_emb[data.item_to_image]
        pos = (img_i * text_emb(pos_t)).sum(-1)
        neg = (img_i * text_emb(neg_t)).sum(-1)
        metrics |= {f"comp_emb_{c}": v for c, v in compositional_accuracy(pos, neg, cats).items()}
        pooled_i = pooled[data.item_to_image]
        ptok, pmask = _caption_tokens(model, pos_t, cfg.data.max_caption_tokens)
        ntok, nmask = _caption_tokens(model, neg_t, cfg.data.max_caption_tokens)
        pos = losses.patch_token_similarity(pooled_i, ptok, pmask).diagonal()
        neg = losses.patch_token_similarity(pooled_i, ntok, nmask).diagonal()
        metrics |= {f"comp_patch_{c}": v for c, v in compositional_accuracy(pos, neg, cats).items()}

    log.info("eval: compositional done at %.1f s", time.perf_counter() - t0)
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
    "comp_patch_mean": ("compositional acc (patch)", "{:.1f}"),
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



def evaluate_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """`vlmalign eval`: load a checkpoint, evaluate on its config's held-out split, write
    `metrics.json` next to it and print a table."""
    checkpoint = Path(checkpoint)
    model = VLM.from_pretrained(checkpoint, overrides)
    data = EvalData.prepare(model, model.cfg)
    metrics = evaluate(model, data, model.cfg)
    write_metrics(checkpoint / METRICS_NAME, metrics, meta={"checkpoint": str(checkpoint), "skipped": data.report.as_dict()})
    Console().print(comparison_table({checkpoint.parent.name: metrics}, f"evaluation of {checkpoint}"))
    return metrics
