"""The training objective: runs the model passes a config's losses need, weights the loss
parts (losses.py) and sums them.

`Objective(cfg.objective, gather=...)` owns the learnable contrastive temperature
(CLIP logit scale, SigLIP scale and bias); `objective(model, batch)` returns the total loss
and a dict of parts for logging.

[Contract] With ``gather=True`` (the trainer sets it when more than one process runs) each
rank returns its share of the global-batch loss, such that the mean of the ranks' losses
and of their gradients (what DDP computes) equals the loss and gradients of one process on
the global batch: contrastive negatives are all-gathered (losses.gather_with_grad) and the
next-token loss is token-weighted over the global batch (`rank_token_weight`).

Shared pass: with "prompted" caption sequences (data/collate.py, `prompt_state_at` in the
batch) the caption continues the image embedding prompt, so the one LLM pass of the
next-token loss also yields the prompted image state (`VLM.ntp(state_at=...)`): a
contrastive recipe then costs about what the next-token loss alone costs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlmalign import losses
from vlmalign.config import ObjectiveConfig
from vlmalign.models.vlm import VLM

CONTRASTIVE = ("none", "clip", "siglip")


def rank_token_weight(n_local: Tensor) -> Tensor:
    """Weight w_r that turns rank r's per-token mean next-token loss into its share of the
    global-batch per-token mean.

    One process on the global batch computes L = (sum_r S_r) / N, with S_r the summed token
    cross-entropy of rank r, N_r its label tokens and N = sum_r N_r. DDP averages gradients
    (and we average logged losses) over the W ranks, so rank r must return
    L_r = W * S_r / N = mean_r * w_r with w_r = W * N_r / N; then (1/W) sum_r L_r = L,
    gradients included. A naive per-rank mean instead weights every rank equally, whatever
    its token count. N comes from an all_reduce of the counts (a tiny collective, no grad).

    n_local: long scalar N_r. Returns a float scalar on n_local's device; exactly 1.0 when
    no process group of world size > 1 is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return torch.ones((), device=n_local.device)
    n_global = n_local.detach().clone()
    dist.all_reduce(n_global, op=dist.ReduceOp.SUM)
    # clamp: if no rank has a label token every mean is an exact 0 (losses.next_token_loss).
    return dist.get_world_size() * n_local.float() / n_global.clamp(min=1).float()


def _vector_scalars(state_dict: dict, prefix: str, *args) -> None:
    """Load hook: a 0-dim temperature or bias from an older checkpoint becomes [1]."""
    for name in ("log_logit_scale", "logit_bias"):
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)


class Objective(nn.Module):
    """Weighted sum of the recipe's losses: ntp_weight * next-token + patch_weight *
    patch-token contrastive + contrastive_weight * (CLIP or SigLIP on prompted embeddings).

    ``gather=True``: exact across ranks (see the module's [Contract]); the logged
    ``ntp_loss`` is then the rank's share W * S_r / N, whose mean over ranks is the
    global per-token mean.
    """

    def __init__(self, cfg: ObjectiveConfig, gather: bool = False) -> None:
        super().__init__()
        if cfg.contrastive not in CONTRASTIVE:
            raise ValueError(
                f"objective.contrastive={cfg.contrastive!r}; choose one of {', '.join(CONTRASTIVE)}"
            )
        self.cfg = cfg
        self.gather = gather
        # One-element vectors, not 0-dim scalars: FSDP2's fully_shard refuses scalar
        # parameters. Checkpoints from before hold [] tensors (reshaped on load).
        if cfg.contrastive == "clip":
            self.log_logit_scale = nn.Parameter(torch.tensor([math.log(cfg.init_logit_scale)]))
        elif cfg.contrastive == "siglip":
            self.log_logit_scale = nn.Parameter(torch.tensor([math.log(cfg.siglip_init_logit_scale)]))
            self.logit_bias = nn.Parameter(torch.tensor([cfg.siglip_init_bias]))
        self._register_load_state_dict_pre_hook(_vector_scalars)

    @property
    def uses_embeddings(self) -> bool:
        return self.cfg.contrastive != "none" and self.cfg.contrastive_weight > 0

    @property
    def uses_patch(self) -> bool:
        return self.cfg.patch_weight > 0

    def logit_scale(self) -> Tensor:
        """exp(log scale), clamped at max_logit_scale (CLIP clamps at 100)."""
        return self.log_logit_scale.exp().clamp(max=self.cfg.max_logit_scale).squeeze(0)

    @property
    def contrastive_active(self) -> bool:
        """Whether a loss couples the samples of a batch (negatives): accumulation must
        then cache representations (GradCache) to stay exact."""
        return self.uses_embeddings or self.uses_patch

    def forward(self, model: VLM, batch: dict, replay: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, parts) for a collated batch (data/collate.py, data/short_long.py):
        parts holds each weighted loss's unweighted value (``ntp_loss``, ``patch_loss``,
        ...), ``ntp_tokens``, ``logit_scale`` and the detached ``loss``.

        ``replay`` (GradCache accumulation, train/step.py): {"grads": d loss / d
        representation for this micro-batch, "ntp_factor": N_k / N of the effective batch};
        the returned total is then the surrogate whose gradient is this micro-batch's share
        of the effective batch's gradient."""
        c = self.cfg
        visual = model.visual_tokens(batch.get("pixel_values"), batch.get("features"))  # [B, Q, D]
        parts: dict[str, Tensor] = {}
        total = visual.new_zeros(())
        if c.ntp_weight > 0:
            parts |= self.ntp_part(model, batch, visual, state_at=self.shared_state_at(model, batch))
            ntp = parts["ntp_loss"]
            if replay is not None:
                ntp = ntp * replay["ntp_factor"]
            elif self.gather:
                # [Contract] model.ntp returns S_r / N_r; make it W * S_r / N (rank_token_weight).
                ntp = parts["ntp_loss"] = ntp * rank_token_weight(parts["ntp_tokens"])
            total = total + c.ntp_weight * ntp
        if self.contrastive_active:
            reps = self.representations(model, batch, visual, image_state=parts.pop("prompt_state", None))
            if replay is not None:
                for key, rep in reps.items():
                    total = total + (rep * replay["grads"][key].to(rep.dtype)).sum()
                # The temperature's gradient came from the cached-representation loss; a zero
                # term marks it used so DDP still averages it across ranks.
                total = total + sum(p.sum() * 0.0 for p in self.parameters())
            else:
                loss, cparts = self.contrastive(reps)
                total = total + loss
                parts |= cparts
        parts["loss"] = total.detach()
        return total, parts

    def shared_state_at(self, model: VLM, batch: dict) -> int | None:
        """Position of the prompted image state inside the next-token sequences when one
        pass can serve both losses (prompted captions, every row in both, no image soft
        prompt); None otherwise (the embedding then takes its own pass)."""
        at = batch.get("prompt_state_at")
        if at is None or not self.uses_embeddings or model.image_soft is not None:
            return None
        if batch.get("ntp_rows") is not None or batch.get("emb_rows") is not None:
            return None
        return int(at)

    def ntp_part(self, model: VLM, batch: dict, visual: Tensor, state_at: int | None = None) -> dict[str, Tensor]:
        """Per-token mean next-token loss of the batch's sequences (`ntp_rows` of the
        images when the batch has row subsets) and its token count; with `state_at`, also
        the prompted image state of the same pass (`prompt_state`, [B, D])."""
        if "input_ids" not in batch:  # no long caption in this batch: an exact zero that keeps the graph
            return {"ntp_loss": visual.sum() * 0.0, "ntp_tokens": torch.zeros((), dtype=torch.long, device=visual.device)}
        rows = batch.get("ntp_rows")
        ntp_visual = visual if rows is None else visual[rows.to(visual.device)]
        return model.ntp(batch["input_ids"], batch["attention_mask"], batch["labels"], ntp_visual, state_at=state_at)

    def representations(
        self, model: VLM, batch: dict, visual: Tensor, image_state: Tensor | None = None
    ) -> dict[str, Tensor]:
        """What the contrastive losses see, per sample: `patch_v` / `patch_e` ([B, D],
        CG-VLM's factorised patch-token vectors) and `image_emb` / `text_emb` ([B_s, D],
        prompted embeddings of the `emb_rows`). `image_state` [B, D]: the raw prompted image
        states when the next-token pass already computed them (shared pass)."""
        c = self.cfg
        reps: dict[str, Tensor] = {}
        if self.uses_patch:
            pooled = losses.pool_visual_tokens(visual, model.projector.output_grid, c.patch_pool)
            tokens = model.input_embeddings(batch["caption_ids"])  # [B, Tc, D]
            reps["patch_v"], reps["patch_e"] = losses.patch_token_vectors(pooled, tokens, batch["caption_mask"])
        if self.uses_embeddings:
            if image_state is None:
                rows = batch.get("emb_rows")
                emb_visual = visual if rows is None else visual[rows.to(visual.device)]
                image_state = model.image_states(emb_visual)  # [B_s, D]
            reps["image_emb"] = model.finish_embedding(image_state)
            states = batch.get("text_states")
            if states is None:
                states = model.text_states(batch["captions"])
            reps["text_emb"] = model.finish_embedding(states.to(reps["image_emb"].device))
        return reps

    def contrastive(self, reps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted contrastive losses over representations (a batch, or a whole effective
        batch of cached ones), gathered across ranks when `gather`."""
        c = self.cfg
        parts: dict[str, Tensor] = {}
        total = next(iter(reps.values())).new_zeros(())
        if self.uses_patch:
            parts |= losses.patch_vector_loss(reps["patch_v"], reps["patch_e"], c.patch_tau, gather=self.gather)
            total = total + c.patch_weight * parts["patch_loss"]
        if self.uses_embeddings:
            scale = self.logit_scale()
            image_emb, text_emb = reps["image_emb"], reps["text_emb"]
            if c.contrastive == "clip":
                parts |= losses.clip_loss(image_emb, text_emb, scale, gather=self.gather)
                total = total + c.contrastive_weight * parts["clip_loss"]
            else:
                parts |= losses.siglip_loss(image_emb, text_emb, scale, self.logit_bias.squeeze(0),
                                            gather=self.gather)
                total = total + c.contrastive_weight * parts["siglip_loss"]
            parts["logit_scale"] = scale.detach()
        return total, parts
