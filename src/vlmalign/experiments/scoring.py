"""Per-item scores of an embedder, for the experiments' intervals.

`eval.evaluate.embedding_metrics` reports the same quantities as aggregates; the runner
needs each item's value (hit or miss, right or wrong) to bootstrap over items. Every
function here takes L2-normalised embeddings from any `Embedder` (the VLM's prompted
embeddings, its cached-text variant, the CLIP peer) and returns 0/1 values per item, in
percent units (0 or 100) so that their mean is the usual percentage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlmalign.data.classification import DEFAULT_TEMPLATES, class_embeddings
from vlmalign.data.winoground import WordOrderPair
from vlmalign.eval.evaluate import Embedder, EvalData, task_rows


def _pct(x: Tensor) -> list[float]:
    return (x.float() * 100.0).tolist()


def retrieval_hits(image_emb: Tensor, text_emb: Tensor, text_to_row: Tensor, k: int = 1) -> dict[str, list[float]]:
    """Per query: is the right item in the top k? `t2i` one value per text [N_txt];
    `i2t` one per image that has a text (any of its texts in the top k). Ties count
    against the query (the right item must score strictly above the k-th wrong one)."""
    rows, t2i = task_rows(text_to_row)
    sim = image_emb[rows.to(image_emb.device)] @ text_emb.T  # [N_img, N_txt]
    n_img, n_txt = sim.shape
    correct_t = sim.T.gather(1, t2i[:, None].to(sim.device))  # [N_txt, 1]
    t_hits = (sim.T >= correct_t).sum(1) - 1 < k  # other images scoring >= the right one
    match = torch.zeros(n_img, n_txt, dtype=torch.bool, device=sim.device)
    match[t2i.to(sim.device), torch.arange(n_txt, device=sim.device)] = True
    best_right = sim.masked_fill(~match, float("-inf")).max(1, keepdim=True).values  # [N_img, 1]
    wrong_better = (sim.masked_fill(match, float("-inf")) >= best_right).sum(1)
    i_hits = wrong_better < k
    return {"t2i": _pct(t_hits), "i2t": _pct(i_hits)}


def compositional_hits(embedder: Embedder, image_emb: Tensor, data: EvalData) -> tuple[list[float], list[str]]:
    """Per SugarCrepe item: s(image, positive) > s(image, negative); and its category."""
    img = image_emb[data.item_to_image.to(image_emb.device)]  # [N_items, D]
    pos = (img * embedder.embed_texts([it.caption for it in data.items]).to(img.device)).sum(-1)
    neg = (img * embedder.embed_texts([it.negative_caption for it in data.items]).to(img.device)).sum(-1)
    return _pct(pos > neg), [it.category for it in data.items]


def zero_shot_hits(embedder: Embedder, image_emb: Tensor, data: EvalData) -> list[float]:
    """Per zero-shot image: is the top-1 class (CLIP prompt ensembling) the right one?"""
    cls = class_embeddings(embedder.embed_texts, data.zs_class_names, DEFAULT_TEMPLATES).to(image_emb.device)  # [C, D]
    pred = (image_emb[data.zs_image_rows.to(image_emb.device)] @ cls.T).argmax(1)
    return _pct(pred.cpu() == data.zs_labels)


@dataclass
class WordOrderData:
    """Word-order pairs with the tower features of both images ([N, ...] each)."""

    pairs: list[WordOrderPair]
    features_0: Tensor
    features_1: Tensor


def word_order_scores(embedder: Embedder, data: WordOrderData) -> dict[str, list[float]]:
    """Winoground's text, image and group scores per pair (Thrush et al. 2022), with
    s(c, i) the cosine of caption c and image i:
    text  = s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1)
    image = s(c0, i0) > s(c0, i1) and s(c1, i1) > s(c1, i0)
    group = text and image.  Chance: 25%, 25%, 16.7%."""
    i0, i1 = embedder.embed_images(data.features_0), embedder.embed_images(data.features_1)  # [N, D]
    c0 = embedder.embed_texts([p.caption_0 for p in data.pairs]).to(i0.device)
    c1 = embedder.embed_texts([p.caption_1 for p in data.pairs]).to(i0.device)
    s00, s01 = (c0 * i0).sum(-1), (c0 * i1).sum(-1)  # s(c0, i0), s(c0, i1)
    s10, s11 = (c1 * i0).sum(-1), (c1 * i1).sum(-1)
    text = (s00 > s10) & (s11 > s01)
    image = (s00 > s01) & (s11 > s10)
    return {"text": _pct(text), "image": _pct(image), "group": _pct(text & image)}


WORD_ORDER_CHANCE = {"text": 25.0, "image": 25.0, "group": 100.0 / 6}


@torch.no_grad()
def embedding_items(embedder: Embedder, data: EvalData, word_order: WordOrderData | None = None,
                    categories: tuple[str, ...] = ()) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every per-item score of an embedder: (metrics, items) for the runner. Keys:
    `t2i_R@1`, `i2t_R@1`, `t2i_R@5`, `comp` (all SugarCrepe items), `comp_<category>`,
    `zs_acc`, `wino_text`, `wino_image`, `wino_group`."""
    items: dict[str, list[float]] = {}
    img = embedder.embed_images(data.features)  # [N_img, D]
    if data.captions:
        txt = embedder.embed_texts(data.captions).to(img.device)
        r1 = retrieval_hits(img, txt, data.text_to_image, 1)
        r5 = retrieval_hits(img, txt, data.text_to_image, 5)
        items |= {"t2i_R@1": r1["t2i"], "i2t_R@1": r1["i2t"], "t2i_R@5": r5["t2i"], "i2t_R@5": r5["i2t"]}
    if data.items:
        hits, cats = compositional_hits(embedder, img, data)
        items["comp"] = hits
        for c in categories or tuple(dict.fromkeys(cats)):
            items[f"comp_{c}"] = [h for h, k in zip(hits, cats, strict=True) if k == c]
    if data.zs_class_names and len(data.zs_image_rows):
        items["zs_acc"] = zero_shot_hits(embedder, img, data)
    if word_order is not None:
        items |= {f"wino_{k}": v for k, v in word_order_scores(embedder, word_order).items()}
    items = {k: v for k, v in items.items() if v}
    metrics = {k: sum(v) / len(v) for k, v in items.items()}
    return metrics, items
