"""The training objective: runs the model passes a config's losses need, weights the loss
parts (losses.py) and sums them.

`Objective(cfg.objective, cfg.embedding)` owns the learnable contrastive temperature
(CLIP logit scale, SigLIP scale and bias); `objective(model, batch)` returns the total loss
and a dict of parts for logging.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlmalign import losses
from vlmalign.config import ObjectiveConfig
from vlmalign.models.vlm import VLM

CONTRASTIVE = ("none", "clip", "siglip")


class Objective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig, gather: bool = False) -> None:
        super().__init__()
        if cfg.contrastive not in CONTRASTIVE:
            raise ValueError(
                f"objective.contrastive={cfg.contrastive!r}; choose one of {', '.join(CONTRASTIVE)}"
            )
        self.cfg = cfg
        self.gather = gather
        if cfg.contrastive == "clip":
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))
        elif cfg.contrastive == "siglip":
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.siglip_init_logit_scale)))
            self.logit_bias = nn.Parameter(torch.tensor(cfg.siglip_init_bias))

    @property
    def uses_embeddings(self) -> bool:
        return self.cfg.contrastive != "none" and self.cfg.contrastive_weight > 0

    @property
    def uses_patch(self) -> bool:
        return self.cfg.patch_weight > 0

    def logit_scale(self) -> Tensor:
        """exp(log scale), clamped at max_logit_scale (CLIP clamps at 100)."""
        return self.log_logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, model: VLM, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        visual = model.visual_tokens(batch.get("pixel_values"), batch.get("features"))  # [B, Q, D]
        parts: dict[str, Tensor] = {}
        total = visual.new_zeros(())
        if c.ntp_weight > 0:
            parts |= model.ntp(batch["input_ids"], batch["attention_mask"], batch["labels"], visual)
            total = total + c.ntp_weight * parts["ntp_loss"]
        if self.uses_patch:
            pooled = losses.pool_visual_tokens(visual, model.projector.output_grid, c.patch_pool)
            tokens = model.input_embeddings(batch["caption_ids"])  # [B, Tc, D]
            parts |= losses.patch_token_contrastive_loss(
                pooled, tokens, batch["caption_mask"], c.patch_tau, gather=self.gather
            )
            total = total + c.patch_weight * parts["patch_loss"]
        if self.uses_embeddings:
            image_emb = model.finish_embedding(model.image_states(visual))
            states = batch.get("text_states")
            if states is None:
                states = model.text_states(batch["captions"])
            text_emb = model.finish_embedding(states.to(image_emb.device))
            scale = self.logit_scale()
            if c.contrastive == "clip":
                parts |= losses.clip_loss(image_emb, text_emb, scale, gather=self.gather)
                total = total + c.contrastive_weight * parts["clip_loss"]
            else:
                parts |= losses.siglip_loss(image_emb, text_emb, scale, self.logit_bias, gather=self.gather)
                total = total + c.contrastive_weight * parts["siglip_loss"]
            parts["logit_scale"] = scale.detach()
        parts["loss"] = total.detach()
        return total, parts
