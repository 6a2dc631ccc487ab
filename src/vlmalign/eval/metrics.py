"""Evaluation metrics as pure functions of tensors (no model code).

Every function takes scores or embeddings already computed by the caller and returns a flat
``dict[str, float]``; accuracies and recalls are percentages (0-100).

Tie rule, shared by every ranking metric here: a wrong item that scores *exactly the same*
as the correct one counts as ranked above it. This is the conservative choice: a model that
gives every item the same score (a collapsed embedding) gets 0 %, not 100 %, and a metric
never depends on the order in which a sort breaks ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vlmalign.eval.ranking import DEFAULT_BLOCK_ELEMENTS, retrieval_ranks

__all__ = [
    "retrieval_metrics",
    "compositional_accuracy",
    "modality_gap",
    "zero_shot_accuracy",
]


def _as_float_tensor(
    x: Tensor | np.ndarray | Sequence[float],
    name: str,
    ndim: int,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Detach, move to CPU, cast to ``dtype`` and check the rank and the absence of NaN."""
    t = torch.as_tensor(x).detach().cpu()
    if not t.is_floating_point() or torch.finfo(t.dtype).bits < torch.finfo(dtype).bits:
        t = t.to(dtype)  # only ever widen: fp16/bf16 scores are exact in fp32
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(
            f"{name} contains {n_nan} NaN value(s); NaN cannot be ranked. "
            "Check the model outputs (overflow in fp16? an empty caption?) before evaluating."
        )
    return t


def _as_index_tensor(
    x: Tensor | np.ndarray | Sequence[int], name: str, length: int, upper: int
) -> Tensor:
    """Check a 1-D integer index vector of ``length`` entries with values in ``[0, upper)``."""
    t = torch.as_tensor(x).detach().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {t.dtype}")
    t = t.to(torch.long)
    if t.ndim != 1 or t.numel() != length:
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {tuple(t.shape)}")
    if length and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(
            f"{name} values must lie in [0, {upper}); got min {int(t.min())}, max {int(t.max())}"
        )
    return t


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return [int(k) for k in ks]


def retrieval_metrics(
    sim: Tensor | tuple[Tensor, Tensor],
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """Image->text and text->image Recall@K (%) from a similarity matrix or embeddings.

    Standard protocol for COCO / Flickr30k Karpathy splits (several captions per image,
    as in Karpathy & Fei-Fei 2015, VSE++, CLIP):

    - image->text: an image is a hit at K if ANY of its captions is in its top K texts.
      Its rank = number of *other images'* captions scoring >= its best caption.
    - text->image: a caption is a hit at K if its image is in its top K images.
      Its rank = number of other images scoring >= its image.

    A hit at K means rank < K. Ties with a wrong item count against the correct one (see
    the module docstring); ties among an image's own captions do not matter.

    Memory stays bounded (`eval.ranking.retrieval_ranks`): scores are visited in tiles of
    at most `max_block_elements` with a running top-max(ks). Pass the embeddings
    `(image_emb, text_emb)` rather than their product and the [N_img, N_txt] matrix is
    never built (COCO-5k: 5,000 x 25,000 scores, 500 MB in float32).

    Args:
        sim: ``[N_img, N_txt]`` similarity (higher = more similar), any float dtype/device;
            or ``(image_emb [N_img, D], text_emb [N_txt, D])`` standing for
            ``image_emb @ text_emb.T``, scored in float32 on their device.
        text_to_image: ``[N_txt]`` index of the image that caption j describes.
        ks: the cut-offs K.
        max_block_elements: scores per tile.

    Returns:
        ``{"i2t_R@1": ..., "i2t_R@5": ..., ..., "t2i_R@1": ..., ...}`` in percent.
    """
    if isinstance(sim, tuple | list):
        if len(sim) != 2:
            raise ValueError(f"sim as embeddings is a pair (image_emb, text_emb), got {len(sim)} items")
        img = torch.as_tensor(sim[0]).detach()
        txt = torch.as_tensor(sim[1]).detach()
        for name, x in (("image_emb", img), ("text_emb", txt)):
            if x.ndim != 2:
                raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
            if torch.isnan(x).any():
                raise ValueError(f"{name} contains NaN; NaN cannot be ranked. Check the model outputs.")
        sim = (img, txt)
        n_img, n_txt = img.shape[0], txt.shape[0]
    else:
        # float32 is enough to compare scores and halves the memory of a 5k x 25k COCO matrix
        sim = _as_float_tensor(sim, "sim", ndim=2, dtype=torch.float32)  # [N_img, N_txt]
        n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"sim is empty (shape ({n_img}, {n_txt})); nothing to evaluate")
    ks = _check_ks(ks)
    t2i = _as_index_tensor(text_to_image, "text_to_image", length=n_txt, upper=n_img)

    captions_per_image = torch.bincount(t2i, minlength=n_img)  # [N_img]
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:10].tolist()
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} image(s) have no caption in text_to_image "
            f"(first: {missing}); image->text recall is undefined for them. "
            "Drop those rows from sim or add their captions."
        )

    i2t_rank, t2i_rank = retrieval_ranks(sim, t2i, max_rank=max(ks), max_block_elements=max_block_elements)

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t_rank < k).double().mean())
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float((t2i_rank < k).double().mean())
    return out


def compositional_accuracy(
    pos_scores: Tensor,
    neg_scores: Tensor,
    categories: Sequence[str],
) -> dict[str, float]:
    """Accuracy (%) of s(image, positive caption) > s(image, hard negative), per category.

    SugarCrepe (Hsieh et al. 2023) protocol: item n is correct iff ``pos[n] > neg[n]``
    (strict: a tie is wrong). Categories keep their first-seen order.

    Args:
        pos_scores: ``[N]`` score of each image with its true caption.
        neg_scores: ``[N]`` score of the same image with the hard-negative caption.
        categories: ``N`` category names (e.g. ``"replace-att"``, ``"swap-obj"``).

    Returns:
        ``{category: acc, ..., "mean": mean over categories (as SugarCrepe reports),
        "overall": accuracy over all items}``.
    """
    pos = _as_float_tensor(pos_scores, "pos_scores", ndim=1)  # [N]
    neg = _as_float_tensor(neg_scores, "neg_scores", ndim=1)  # [N]
    categories = list(categories)
    if not (pos.numel() == neg.numel() == len(categories)):
        raise ValueError(
            "pos_scores, neg_scores and categories must have the same length, got "
            f"{pos.numel()}, {neg.numel()}, {len(categories)}"
        )
    if pos.numel() == 0:
        raise ValueError("no items to evaluate: pos_scores is empty")
    reserved = {"mean", "overall"} & set(categories)
    if reserved:
        raise ValueError(
            f"category name(s) {sorted(reserved)} clash with the summary keys 'mean'/'overall'; "
            "rename those categories"
        )

    correct = pos > neg  # [N]
    names = list(dict.fromkeys(categories))  # first-seen order, unique
    index = {name: i for i, name in enumerate(names)}
    cat_ids = torch.tensor([index[c] for c in categories], dtype=torch.long)  # [N]
    hits = torch.bincount(cat_ids, weights=correct.double(), minlength=len(names))  # [C]
    counts = torch.bincount(cat_ids, minlength=len(names)).double()  # [C]
    per_cat = 100.0 * hits / counts  # [C]

    out = {name: float(per_cat[i]) for i, name in enumerate(names)}
    out["mean"] = float(per_cat.mean())
    out["overall"] = 100.0 * float(correct.double().mean())
    return out


def _normalise_rows(x: Tensor, name: str) -> Tensor:
    """L2-normalise rows, refusing zero rows (their direction is undefined)."""
    norms = x.norm(dim=1, keepdim=True)  # [N, 1]
    zero = norms.squeeze(1) == 0
    if bool(zero.any()):
        first = torch.nonzero(zero).flatten()[:10].tolist()
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) (first: {first}); a zero embedding "
            "has no direction. Check the pooling / padding that produced them."
        )
    return x / norms


def _mean_offdiagonal_cosine(x: Tensor) -> float:
    """Mean cos(x_i, x_j) over i != j for unit rows ``x [N, D]``, in O(N D) memory.

    sum_{i,j} x_i . x_j = ||sum_i x_i||^2 and the diagonal sums to N (unit rows).
    """
    n = x.shape[0]
    total = float(x.sum(dim=0).pow(2).sum())
    return (total - n) / (n * (n - 1))


def modality_gap(image_emb: Tensor, text_emb: Tensor) -> dict[str, float]:
    """Modality gap and cone statistics of paired image/text embeddings.

    Liang et al. 2022, "Mind the Gap": after L2-normalising each row,

    - ``gap`` = || mean_i(x_i) - mean_i(y_i) ||  (distance between the two centroids),
    - ``matched_cosine`` = mean_i cos(x_i, y_i)  (paired rows),
    - ``mean_image_cosine`` / ``mean_text_cosine`` = mean cos over distinct pairs within one
      modality; close to 1 means the embeddings are nearly collinear (a narrow cone).

    Args:
        image_emb: ``[N, D]`` image embeddings (normalised or not).
        text_emb: ``[N, D]`` text embeddings, row i paired with image row i.
    """
    img = _as_float_tensor(image_emb, "image_emb", ndim=2)  # [N, D]
    txt = _as_float_tensor(text_emb, "text_emb", ndim=2)  # [N, D]
    if img.shape != txt.shape:
        raise ValueError(
            f"image_emb {tuple(img.shape)} and text_emb {tuple(txt.shape)} must have the same "
            "shape [N, D], with row i of each describing the same pair"
        )
    if img.shape[0] < 2:
        raise ValueError(f"need at least 2 pairs for within-modality cosines, got {img.shape[0]}")
    img = _normalise_rows(img, "image_emb")
    txt = _normalise_rows(txt, "text_emb")
    return {
        "gap": float((img.mean(dim=0) - txt.mean(dim=0)).norm()),
        "matched_cosine": float((img * txt).sum(dim=1).mean()),
        "mean_image_cosine": _mean_offdiagonal_cosine(img),
        "mean_text_cosine": _mean_offdiagonal_cosine(txt),
    }


def zero_shot_accuracy(
    image_emb: Tensor,
    class_emb: Tensor,
    labels: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot classification top-K accuracy (%) by cosine to class embeddings (CLIP).

    Class embeddings are usually the normalised mean of several prompt templates
    ("a photo of a {c}."), computed by the caller. Both sides are L2-normalised here again
    (idempotent), so the scores are cosines. An image is correct at K if fewer than K other
    classes score >= its true class (ties count against it). With C <= K classes top-K is
    trivially 100 %.

    Args:
        image_emb: ``[N, D]`` image embeddings.
        class_emb: ``[C, D]`` one embedding per class.
        labels: ``[N]`` true class index of each image.
        ks: the cut-offs K.

    Returns:
        ``{"top1_acc": ..., "top5_acc": ...}`` (one key per K).
    """
    img = _as_float_tensor(image_emb, "image_emb", ndim=2)  # [N, D]
    cls = _as_float_tensor(class_emb, "class_emb", ndim=2)  # [C, D]
    if img.shape[1] != cls.shape[1]:
        raise ValueError(
            f"image_emb dim {img.shape[1]} != class_emb dim {cls.shape[1]}; both must be [*, D]"
        )
    if img.shape[0] == 0:
        raise ValueError("no images to evaluate: image_emb is empty")
    ks = _check_ks(ks)
    y = _as_index_tensor(labels, "labels", length=img.shape[0], upper=cls.shape[0])
    scores = _normalise_rows(img, "image_emb") @ _normalise_rows(cls, "class_emb").T  # [N, C]
    correct = scores.gather(1, y[:, None])  # [N, 1]
    rank = (scores >= correct).sum(dim=1) - 1  # [N] other classes scoring >= the true one
    return {f"top{k}_acc": 100.0 * float((rank < k).double().mean()) for k in ks}
