"""A naive reference of the training objective, written the plain way from public pieces,
to check the optimised step (`Objective` under every switch) against: the next-token loss
from an HF causal-LM forward with labels (full vocabulary on every position), every
prompt run whole from its template ids (no cached prefix), the image and text embeddings
in passes of their own, the contrastive losses as explicit loops over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmalign import losses


def _prompt_states(model, kind: str, middles: list[list[int]], visual: Tensor | None = None) -> Tensor:
    """Last-token states [B, D] of the whole `kind` prompt around each middle."""
    template = model.image_template if kind == "image" else model.text_template
    soft = model.image_soft if kind == "image" else model.text_soft
    states = []
    for i, middle in enumerate(middles):
        ids, soft_mask = template.ids(middle)
        ids_t = torch.tensor([ids])
        embeds = model.splice(ids_t, visual[i : i + 1]) if visual is not None else model.input_embeddings(ids_t)
        if soft is not None:
            embeds = soft.scatter(embeds, torch.tensor([soft_mask]))
        hidden = model.llm.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state
        states.append(hidden[0, -1])
    return torch.stack(states)


def _info_nce(logits: Tensor) -> Tensor:
    """Symmetric cross-entropy with positives on the diagonal, as a loop over rows."""
    b = logits.shape[0]
    rows = sum(-(logits[i].log_softmax(0)[i]) for i in range(b)) / b
    cols = sum(-(logits[:, j].log_softmax(0)[j]) for j in range(b)) / b
    return (rows + cols) / 2


def naive_loss(model, objective, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, parts) of the objective's losses on `batch`, computed the naive way."""
    c = objective.cfg
    visual = model.visual_tokens(batch.get("pixel_values"), batch.get("features"))  # [B, Q, D]
    parts: dict[str, Tensor] = {}
    total = visual.new_zeros(())
    if c.ntp_weight > 0 and "input_ids" in batch:
        rows = batch.get("ntp_rows")
        v = visual if rows is None else visual[rows]
        embeds = model.splice(batch["input_ids"], v)
        if "soft_mask" in batch:  # prompted captions with soft prompts: the learned vectors, in order
            for r in range(embeds.shape[0]):
                at = batch["soft_mask"][r].nonzero().flatten()
                embeds = embeds.clone()
                embeds[r, at] = model.image_soft.vectors.to(embeds.dtype)
        out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        parts["ntp_loss"] = out.loss
        total = total + c.ntp_weight * out.loss
    if c.patch_weight > 0 or c.patch_sigmoid_weight > 0:
        pooled = losses.pool_visual_tokens(visual, model.projector.output_grid, c.patch_pool)  # [B, k*k, D]
        tokens = model.input_embeddings(batch["caption_ids"])  # [B, Tc, D]
        mask = batch["caption_mask"].bool()
        b = pooled.shape[0]
        sim = torch.stack([torch.stack([
            F.cosine_similarity(pooled[i][:, None], tokens[j][mask[j]][None], dim=-1, eps=1e-6).mean()
            for j in range(b)]) for i in range(b)])  # [B, B] mean over (q, t) of cos
        if c.patch_weight > 0:
            parts["patch_loss"] = _info_nce(sim / c.patch_tau)
            total = total + c.patch_weight * parts["patch_loss"]
        if c.patch_sigmoid_weight > 0:
            z = 2 * torch.eye(b) - 1
            parts["patch_sigmoid_loss"] = -F.logsigmoid(z * (sim / c.patch_tau + c.siglip_init_bias)).sum() / b
            total = total + c.patch_sigmoid_weight * parts["patch_sigmoid_loss"]
    if c.contrastive != "none" and c.contrastive_weight > 0:
        rows = batch.get("emb_rows")
        ev = visual if rows is None else visual[rows]
        middle = [model.image_token_id] * model.num_visual_tokens
        image = model.finish_embedding(_prompt_states(model, "image", [middle] * ev.shape[0], ev))
        text = model.finish_embedding(_prompt_states(model, "text", model.sentence_ids(batch["captions"])))
        scale = objective.log_logit_scale.exp().squeeze(0)
        logits = scale * image @ text.T
        if c.contrastive == "clip":
            parts["clip_loss"] = _info_nce(logits)
        else:
            z = 2 * torch.eye(len(image)) - 1
            parts["siglip_loss"] = -F.logsigmoid(z * (logits + objective.logit_bias)).sum() / len(image)
        total = total + c.contrastive_weight * parts["clip_loss" if c.contrastive == "clip" else "siglip_loss"]
    parts["loss"] = total.detach()
    return total, parts
