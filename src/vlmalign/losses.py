"""The training objectives of vlmalign, as plain functions of tensors.

Each loss states its formula and its paper, does its own shift or normalisation contract,
and returns a dict of named parts (``{"clip_loss": ...}``); `objective.py` weights and sums
them. Cross-rank negatives come from one helper, `dist.gather_with_grad` (torch only).

[Contract] Distributed losses assume every rank holds the same local batch size B (as
``all_gather`` requires) and follow open_clip's ``--gather-with-grad --local-loss``: each
rank scores its local rows against the gathered global batch, labels offset by
``rank * B``. Averaging the per-rank losses (as DDP averages gradients) then equals the
1-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmalign.dist import gather_with_grad, world_and_rank

# Floor on vector norms before dividing; large enough to stay non-zero in fp16.
_EPS = 1e-6


def _targets(batch: int, gather: bool, device: torch.device) -> Tensor:
    """Column of each local row's positive: arange(B) + rank * B when gathering. [B]"""
    rank = world_and_rank()[1] if gather else 0
    return torch.arange(batch, device=device) + rank * batch


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names} must both be [B, D] with the same shape (row i of one paired with row i "
            f"of the other); got {tuple(a.shape)} and {tuple(b.shape)}."
        )


# Rows of [rows, V] logits handled at once by `linear_cross_entropy` (about 64 MB of fp32
# logits for a 49k vocabulary); the peak adds a few such blocks, whatever the row count.
_CE_CHUNK_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i W^T + b), y_i) whose gradients are computed in the forward,
    chunk by chunk, so no [N, V] tensor outlives the call (the idea of Liger-Kernel's
    fused linear cross-entropy). Saved for backward: dL/dh [N, D] and, when they train,
    dL/dW [V, D] and dL/db [V]; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                chunk: int) -> Tensor:
        grads = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.zeros_like(h) if grads[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if grads[1] else None
        grad_b = torch.zeros_like(bias, dtype=acc) if grads[2] else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]  # [C, D], [C]
            logits = F.linear(hc, weight, bias).to(acc)  # [C, V], softmax in fp32 as HF does
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if not any(grads):
                continue
            g = (logits - lse[:, None]).exp_()  # softmax [C, V]
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0  # dL/dz
            if softcap is not None:
                g *= 1.0 - capped.square()  # dz/dlogits of z = cap * tanh(logits / cap)
            if grad_h is not None:
                grad_h[start : start + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)  # [C, D]
            if grad_w is not None:
                grad_w += g.t() @ hc.to(acc)  # [V, D]
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.grads, ctx.dtypes = grads, (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.grads
        return (
            grad_out.to(grad_h.dtype) * grad_h if need_h else None,
            (grad_out * grad_w).to(ctx.dtypes[0]) if need_w else None,
            (grad_out * grad_b).to(ctx.dtypes[1]) if need_b else None,
            None, None, None,
        )


def linear_cross_entropy(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, logit_softcap: float | None = None,
    chunk_elements: int = _CE_CHUNK_ELEMENTS,
) -> Tensor:
    """Summed cross-entropy of the logits `h @ weight^T + bias` (optionally soft-capped)
    against `targets`, without keeping [N, V] logits for backward: equal to
    `F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")`, with
    the same gradients, at the memory of one chunk of rows. h [N, D], weight [V, D],
    bias [V] or None, targets [N] (valid class ids). Returns a scalar in float32 (float64
    for float64 inputs)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        chunk = max(1, chunk_elements // weight.shape[0])
        return _LinearCrossEntropy.apply(h, weight, bias, targets, logit_softcap, chunk)
    logits = F.linear(h, weight, bias)  # no graph to keep: the plain way
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def next_token_loss(
    hidden: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """Causal next-token cross-entropy, with the LM head applied only where a label exists.

    loss = mean over {(b, t) : labels[b, t + 1] != ignore_index} of
    -log softmax(z_bt)[labels[b, t + 1]], with z = hidden[b, t] @ W^T + bias and, when
    ``logit_softcap`` is set, z = cap * tanh(z / cap) (Gemma's final-logit softcapping).
    This is the generative loss of LLaVA stage 1/2 (Liu et al. 2023) with HF's convention:
    ``labels`` [B, T] are aligned with the inputs and this function shifts them, so
    ``hidden[:, t]`` predicts ``labels[:, t + 1]``. Equal to HF's full-vocabulary loss, but
    the [N, V] logits are computed for the N label positions only (the head dominates the
    cost of small LLMs with large vocabularies), chunk by chunk, and not kept for backward
    (`linear_cross_entropy`).

    hidden [B, T, D] final hidden states; head_weight [V, D]; head_bias [V] or None.
    Returns {"ntp_loss": scalar, "ntp_tokens": long scalar N}. With N == 0 the loss is an
    exact 0.0 that stays connected to ``hidden`` and ``head_weight`` (zero gradients).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"next_token_loss expects hidden [B, T, D] and labels [B, T] aligned with the "
            f"inputs (unshifted); got hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}."
        )
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"head_weight must be [V, D] with D = {hidden.shape[2]} (the LM head's weight, "
            f"e.g. model.get_output_embeddings().weight); got {tuple(head_weight.shape)}."
        )
    shift_labels = labels[:, 1:]  # [B, T-1]
    keep = shift_labels != ignore_index  # [B, T-1]
    h = hidden[:, :-1][keep]  # [N, D]
    targets = shift_labels[keep]  # [N]
    n_tokens = keep.sum()
    # Sum / max(N, 1): exact mean when N > 0, and an exact, graph-connected 0 when N == 0
    # (a mean over zero rows would be NaN). Avoids a device sync on N.
    loss = linear_cross_entropy(h, head_weight, head_bias, targets, logit_softcap) / n_tokens.clamp(min=1)
    return {"ntp_loss": loss, "ntp_tokens": n_tokens}


def full_vocab_next_token_loss(
    hidden: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """The same causal next-token cross-entropy as `next_token_loss`, computed as an HF
    causal LM with ``labels`` does: logits z = hidden @ W^T (+ bias, softcapped when
    ``logit_softcap`` is set) on EVERY position, [B, T, V], then the shifted mean
    cross-entropy over labels != ignore_index. Slower and heavier (the head runs on prompt,
    image and padding positions, and the logits are kept for backward); the step uses it
    when ``objective.head_at_labels`` is off, which is how `vlmalign bench` measures what
    the label-only head saves.

    hidden [B, T, D]; labels [B, T] unshifted. Returns {"ntp_loss", "ntp_tokens"}.
    """
    logits = F.linear(hidden, head_weight, head_bias).float()  # [B, T, V]
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    shift = labels[:, 1:]
    n_tokens = (shift != ignore_index).sum()
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                            ignore_index=ignore_index, reduction="sum")
    return {"ntp_loss": total / n_tokens.clamp(min=1), "ntp_tokens": n_tokens}


def clip_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, gather: bool = False
) -> dict[str, Tensor]:
    """CLIP / InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models From
    Natural Language Supervision").

    L = 1/2 [CE(s * X Y^T, I) + CE(s * Y X^T, I)] over the B x B logits of image rows X and
    text rows Y, positives on the diagonal. ``image_emb`` and ``text_emb`` are [B, D] and
    must already be L2-normalised (this function does not normalise); ``logit_scale`` is
    the scale s itself (the caller exponentiates and clamps its learnable log-scale).

    With ``gather=True`` in a distributed world > 1: local rows against all gathered
    columns ([B, world * B] logits), positives at column ``rank * B + i`` (open_clip's
    ``gather_with_grad`` + ``local_loss``). Returns {"clip_loss": scalar}.
    """
    _check_pair(image_emb, text_emb, "clip_loss: image_emb and text_emb")
    all_img = gather_with_grad(image_emb) if gather else image_emb  # [W*B, D]
    all_txt = gather_with_grad(text_emb) if gather else text_emb  # [W*B, D]
    targets = _targets(image_emb.shape[0], gather, image_emb.device)
    logits_per_image = logit_scale * image_emb @ all_txt.T  # [B, W*B]
    logits_per_text = logit_scale * text_emb @ all_img.T  # [B, W*B]
    loss = (
        F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)
    ) / 2
    return {"clip_loss": loss}


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    gather: bool = False,
) -> dict[str, Tensor]:
    """SigLIP pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training").

    L = -1/B * sum_ij log sigmoid(z_ij * (s * <x_i, y_j> + b)), z_ij = +1 for the matching
    pair (i == j) and -1 otherwise. ``image_emb`` x and ``text_emb`` y are [B, D], already
    L2-normalised; s = ``logit_scale`` (the scale itself), b = ``logit_bias``. Equals
    open_clip's ``SigLipLoss``.

    With ``gather=True`` in a distributed world > 1: local images against all gathered texts
    (j over world * B), positives at ``rank * B + i``, still divided by the local B (the sum
    that open_clip's neighbour exchange accumulates). Returns {"siglip_loss": scalar}.
    """
    _check_pair(image_emb, text_emb, "siglip_loss: image_emb and text_emb")
    batch = image_emb.shape[0]
    all_txt = gather_with_grad(text_emb) if gather else text_emb  # [W*B, D]
    targets = _targets(batch, gather, image_emb.device)
    logits = logit_scale * image_emb @ all_txt.T + logit_bias  # [B, W*B]
    signs = -torch.ones_like(logits)  # [B, W*B]
    signs[torch.arange(batch, device=logits.device), targets] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / batch
    return {"siglip_loss": loss}


def pool_visual_tokens(visual: Tensor, grid: tuple[int, int], k: int) -> Tensor:
    """Adaptive-average-pool visual tokens from an h x w grid to k x k.

    ``visual`` [B, h*w, D] holds tokens row-major on the grid (token r*w + c at row r,
    column c); returns [B, k*k, D], row-major on the k x k grid. CG-VLM (Liu et al. 2023)
    pools the patch features before matching them to text tokens. Returns the input
    unchanged when h*w == k*k.
    """
    h, w = grid
    if visual.dim() != 3 or visual.shape[1] != h * w:
        raise ValueError(
            f"pool_visual_tokens: visual must be [B, h*w, D] with h*w = {h}*{w} = {h * w} "
            f"tokens; got {tuple(visual.shape)}. Pass the vision tower's patch grid (drop CLS)."
        )
    if h * w == k * k:
        return visual
    if not 1 <= k <= min(h, w):
        raise ValueError(
            f"pool_visual_tokens: k = {k} must be between 1 and min(h, w) = {min(h, w)} for a "
            f"{h} x {w} grid; choose a smaller pool size."
        )
    b, _, d = visual.shape
    x = visual.reshape(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, h, w]
    x = F.adaptive_avg_pool2d(x, k)  # [B, D, k, k]
    return x.flatten(2).transpose(1, 2)  # [B, k*k, D]


def _mean_unit_visual(visual: Tensor) -> Tensor:
    """mean_q v_q / |v_q|: [B, Q, D] -> [B, D]."""
    return F.normalize(visual, dim=-1, eps=_EPS).mean(dim=1)  # [B, D]


def _mean_unit_text(text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """mean over valid t of e_t / |e_t|: [B, T, D], mask [B, T] -> [B, D] (zeros if no token)."""
    mask = text_mask.to(text_tokens.dtype).unsqueeze(-1)  # [B, T, 1]
    unit = F.normalize(text_tokens, dim=-1, eps=_EPS) * mask  # [B, T, D]
    return unit.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B, D]


def _check_patch_inputs(visual: Tensor, text_tokens: Tensor, text_mask: Tensor) -> None:
    if visual.dim() != 3 or text_tokens.dim() != 3 or visual.shape[2] != text_tokens.shape[2]:
        raise ValueError(
            f"patch-token loss expects visual [B, Q, D] and text_tokens [B, T, D] with the same "
            f"D; got {tuple(visual.shape)} and {tuple(text_tokens.shape)}."
        )
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"text_mask must be [B, T] = {tuple(text_tokens.shape[:2])} (1 = real token, "
            f"0 = padding), e.g. the tokenizer's attention_mask; got {tuple(text_mask.shape)}."
        )


def patch_token_similarity(visual: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """CG-VLM patch-token similarity (Liu et al. 2023, "Contrastive Vision-Language Alignment
    Makes Efficient Instruction Learner", arXiv 2311.17945).

    s(i, j) = mean over q in Q, t in the valid tokens of text j of cos(v_iq, e_jt), computed
    through mean_{q,t} cos(v_q, e_t) = <mean_q v_q/|v_q|, mean_t e_t/|e_t|>, so the whole
    batch is one [B, D] x [D, B] matmul. ``visual`` [B, Q, D] (projector outputs, pooled),
    ``text_tokens`` [B, T, D] (the caption's input embeddings), ``text_mask`` [B, T]
    (1 = real token, 0 = padding). A text with no valid token scores 0 against every image.
    Returns [B_img, B_txt].
    """
    _check_patch_inputs(visual, text_tokens, text_mask)
    v = _mean_unit_visual(visual)  # [B, D]
    e = _mean_unit_text(text_tokens, text_mask)  # [B, D]
    return v @ e.T  # [B_img, B_txt]


def patch_token_contrastive_loss(
    visual: Tensor, text_tokens: Tensor, text_mask: Tensor, tau: float, gather: bool = False
) -> dict[str, Tensor]:
    """CG-VLM patch-token contrastive loss (Liu et al. 2023, arXiv 2311.17945).

    L = 1/2 [CE(S / tau, I) + CE(S^T / tau, I)] with S = ``patch_token_similarity`` over the
    batch, positives on the diagonal. Shapes as in ``patch_token_similarity``; ``tau`` is a
    fixed temperature (the paper does not publish one).

    With ``gather=True`` in a distributed world > 1: the per-sample vectors
    (mean_q v/|v| and mean_t e/|e|, [B, D]) are all-gathered with grad, each rank scores its
    local rows against the gathered columns, positives at ``rank * B + i``.
    Returns {"patch_loss": scalar}.
    """
    _check_patch_inputs(visual, text_tokens, text_mask)
    if visual.shape[0] != text_tokens.shape[0]:
        raise ValueError(
            f"patch_token_contrastive_loss pairs image i with text i: batch sizes differ "
            f"({visual.shape[0]} images, {text_tokens.shape[0]} texts)."
        )
    v, e = patch_token_vectors(visual, text_tokens, text_mask)
    return patch_vector_loss(v, e, tau, gather=gather)


def patch_token_vectors(visual: Tensor, text_tokens: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The per-sample vectors the patch-token similarity factorises into: mean_q v_q/|v_q|
    and mean over valid t of e_t/|e_t|, both [B, D] (s(i, j) is their dot product)."""
    _check_patch_inputs(visual, text_tokens, text_mask)
    return _mean_unit_visual(visual), _mean_unit_text(text_tokens, text_mask)


def patch_vector_loss(v: Tensor, e: Tensor, tau: float, gather: bool = False) -> dict[str, Tensor]:
    """The patch-token contrastive loss from `patch_token_vectors` ([B, D] each): symmetric
    InfoNCE over v @ e^T / tau, positives on the diagonal (gathered across ranks with
    ``gather=True``, as in ``patch_token_contrastive_loss``). Returns {"patch_loss": scalar}."""
    all_v = gather_with_grad(v) if gather else v  # [W*B, D]
    all_e = gather_with_grad(e) if gather else e  # [W*B, D]
    targets = _targets(v.shape[0], gather, v.device)
    loss = (
        F.cross_entropy(v @ all_e.T / tau, targets) + F.cross_entropy(e @ all_v.T / tau, targets)
    ) / 2
    return {"patch_loss": loss}


def patch_sigmoid_loss(v: Tensor, e: Tensor, tau: float, bias: float = -10.0, gather: bool = False) -> dict[str, Tensor]:
    """A SigLIP form of CG-VLM's patch-token contrastive loss: the pairwise sigmoid loss
    (Zhai et al. 2023) on the patch-token similarity s(i, j) = v_i . e_j (`patch_token_vectors`).

    L = -1/B * sum_ij log sigmoid(z_ij * (s(i, j) / tau + bias)), z_ij = +1 on the diagonal
    (image i with its own caption) and -1 elsewhere; ``tau`` and ``bias`` are fixed. Each
    pair is scored on its own, so the loss needs no softmax over the batch. v, e [B, D];
    with ``gather=True``, local rows against the gathered batch (as `siglip_loss`).
    Returns {"patch_sigmoid_loss": scalar}.
    """
    _check_pair(v, e, "patch_sigmoid_loss: v and e")
    batch = v.shape[0]
    all_e = gather_with_grad(e) if gather else e  # [W*B, D]
    targets = _targets(batch, gather, v.device)
    logits = v @ all_e.T / tau + bias  # [B, W*B]
    signs = -torch.ones_like(logits)
    signs[torch.arange(batch, device=logits.device), targets] = 1.0
    return {"patch_sigmoid_loss": -F.logsigmoid(signs * logits).sum() / batch}
