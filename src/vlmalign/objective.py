"""The training objective: asks the model for the states a config's losses need, calls the
loss functions (losses.py), weights the parts and sums them. It is the only place a step
computes a loss: training, accumulation (train/step.py), evaluation and `vlmalign bench`
all call it.

`Objective(cfg.objective, gather=...)` owns the learnable contrastive temperature
(CLIP logit scale, SigLIP scale and bias); `objective(model, batch)` returns the total loss
and a dict of parts for logging. A batch flows one way:

    visual tokens (model) -> next-token states (model) -> next-token loss (losses)
                          -> representations (model: prompted states, patch vectors)
                          -> contrastive terms (losses, `TERMS`) -> weighted sum

Adding a loss (docs/recipes.md): a function in losses.py returning {"name_loss": ...}, a
weight in `ObjectiveConfig`, and one `Term` in `TERMS` below.

[Contract] With ``gather=True`` (the trainer sets it when more than one process runs) each
rank returns its share of the global-batch loss, such that the mean of the ranks' losses
and of their gradients (what DDP computes) equals the loss and gradients of one process on
the global batch: contrastive negatives are all-gathered (dist.gather_with_grad) and the
next-token loss is token-weighted over the global batch (`rank_token_weight`).

Switches (results equal either way; `vlmalign bench` flips them): `objective.head_at_labels`
(LM head on label positions only, else on every position), `objective.shared_pass` (with
"prompted" caption sequences, `prompt_state_at` in the batch, the caption continues the
image embedding prompt, so the one LLM pass of the next-token loss also yields the
prompted image state: a contrastive recipe then costs about what the next-token loss
alone costs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vlmalign import losses
from vlmalign.config import ObjectiveConfig
from vlmalign.dist import rank_token_weight

if TYPE_CHECKING:
    from vlmalign.models.vlm import VLM

CONTRASTIVE = ("none", "clip", "siglip")


@dataclass(frozen=True)
class Term:
    """One contrastive loss of the objective: the `ObjectiveConfig` field holding its
    weight, the representations it scores (`Objective.representations` keys: "patch"
    gives patch_v / patch_e, "embedding" gives image_emb / text_emb), when it applies
    beyond a non-zero weight, and the call into losses.py."""

    weight: str
    needs: str  # "patch" or "embedding"
    loss: Callable[[Objective, dict[str, Tensor]], dict[str, Tensor]]
    when: Callable[[ObjectiveConfig], bool] = lambda cfg: True


def _scale(o: Objective) -> Tensor:
    return o.logit_scale()


# The contrastive terms, summed as weight * part (one entry per loss).
TERMS: dict[str, Term] = {
    "patch_loss": Term("patch_weight", "patch", lambda o, r: losses.patch_vector_loss(
        r["patch_v"], r["patch_e"], o.cfg.patch_tau, gather=o.gather)),
    "patch_sigmoid_loss": Term("patch_sigmoid_weight", "patch", lambda o, r: losses.patch_sigmoid_loss(
        r["patch_v"], r["patch_e"], o.cfg.patch_tau, o.cfg.siglip_init_bias, gather=o.gather)),
    "clip_loss": Term("contrastive_weight", "embedding", lambda o, r: losses.clip_loss(
        r["image_emb"], r["text_emb"], _scale(o), gather=o.gather), when=lambda c: c.contrastive == "clip"),
    "siglip_loss": Term("contrastive_weight", "embedding", lambda o, r: losses.siglip_loss(
        r["image_emb"], r["text_emb"], _scale(o), o.logit_bias.squeeze(0), gather=o.gather),
        when=lambda c: c.contrastive == "siglip"),
}


def _vector_scalars(state_dict: dict, prefix: str, *args) -> None:
    """Load hook: a 0-dim temperature or bias from an older checkpoint becomes [1]."""
    for name in ("log_logit_scale", "logit_bias"):
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)


def next_token_part(
    model: VLM, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, visual: Tensor,
    head_at_labels: bool = True, state_at: int | None = None, soft_mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-token mean next-token loss of spliced sequences [B, T] with visual tokens
    [B, Q, D]: ({"ntp_loss", "ntp_tokens"}, the final state at position `state_at` [B, D]
    or None). The model gives the states and the LM head; losses.next_token_loss applies
    the head at label positions only (`head_at_labels`), losses.full_vocab_next_token_loss
    on every position. `soft_mask` [B, T]: soft-prompt positions of prompted captions."""
    hidden, cut = model.sequence_states(input_ids, attention_mask, labels, visual, soft_mask)  # [B, T - cut, D]
    weight, bias, softcap = model.output_head()
    loss_fn = losses.next_token_loss if head_at_labels else losses.full_vocab_next_token_loss
    parts = loss_fn(hidden, labels[:, cut:], weight, bias, logit_softcap=softcap)
    return parts, (hidden[:, state_at - cut] if state_at is not None else None)


class Objective(nn.Module):
    """Weighted sum of the recipe's losses: ntp_weight * next-token + the weighted
    contrastive `TERMS` (patch-token, its sigmoid form, CLIP or SigLIP on prompted
    embeddings).

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
        if not 0 < cfg.min_logit_scale <= cfg.max_logit_scale:
            raise ValueError(f"objective.min_logit_scale={cfg.min_logit_scale} must be > 0 and <= "
                             f"objective.max_logit_scale={cfg.max_logit_scale}")
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

    def active_terms(self) -> dict[str, Term]:
        """The contrastive terms this config weights in (non-zero weight, applicable)."""
        return {name: t for name, t in TERMS.items() if getattr(self.cfg, t.weight) > 0 and t.when(self.cfg)}

    @property
    def uses_embeddings(self) -> bool:
        return any(t.needs == "embedding" for t in self.active_terms().values())

    @property
    def uses_patch(self) -> bool:
        return any(t.needs == "patch" for t in self.active_terms().values())

    def logit_scale(self) -> Tensor:
        """exp(log scale): the contrastive temperature's inverse (clamped after each
        optimizer step by `clamp_logit_scale_`, never here: a clamp inside the loss has
        zero gradient beyond its bound, so an overshoot could never come back)."""
        return self.log_logit_scale.exp().squeeze(0)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the learnable scale in [min_logit_scale, max_logit_scale] (CLIP and open_clip
        clamp the parameter after each optimizer step; CLIP's max is 100)."""
        if hasattr(self, "log_logit_scale"):
            self.log_logit_scale.clamp_(math.log(self.cfg.min_logit_scale), math.log(self.cfg.max_logit_scale))

    @property
    def contrastive_active(self) -> bool:
        """Whether a loss couples the samples of a batch (negatives): accumulation must
        then cache representations (GradCache) to stay exact."""
        return bool(self.active_terms())

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
        image_state = None
        if c.ntp_weight > 0:
            ntp_parts, image_state = self.ntp_part(model, batch, visual)
            parts |= ntp_parts
            ntp = parts["ntp_loss"]
            if replay is not None:
                ntp = ntp * replay["ntp_factor"]
            elif self.gather:
                # [Contract] the loss is S_r / N_r; make it W * S_r / N (rank_token_weight).
                ntp = parts["ntp_loss"] = ntp * rank_token_weight(parts["ntp_tokens"])
            total = total + c.ntp_weight * ntp
        if self.contrastive_active:
            reps = self.representations(model, batch, visual, image_state=image_state)
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

    def shared_state_at(self, model: VLM, batch: dict, switch_on: bool = False) -> int | None:
        """Position of the prompted image state inside the next-token sequences when one
        pass can serve both losses (`objective.shared_pass`, or `switch_on` to ask as if it
        were on; prompted captions, every row in both); None otherwise (the embedding then
        takes its own pass). With an image soft prompt the caption sequence carries its
        vectors at the prompt's positions (`soft_mask`), so the state is the same either way."""
        at = batch.get("prompt_state_at")
        if at is None or not (self.cfg.shared_pass or switch_on) or not self.uses_embeddings:
            return None
        if model.image_soft is not None and batch.get("soft_mask") is None:
            return None
        if batch.get("ntp_rows") is not None or batch.get("emb_rows") is not None:
            return None
        return int(at)

    def ntp_part(self, model: VLM, batch: dict, visual: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per-token mean next-token loss of the batch's sequences (`ntp_rows` of the
        images when the batch has row subsets) and its token count; and the prompted image
        state [B, D] of the same pass when it serves the embedding (`shared_state_at`)."""
        if "input_ids" not in batch:  # no long caption in this batch: an exact zero that keeps the graph
            zero = {"ntp_loss": visual.sum() * 0.0, "ntp_tokens": torch.zeros((), dtype=torch.long, device=visual.device)}
            return zero, None
        rows = batch.get("ntp_rows")
        ntp_visual = visual if rows is None else visual[rows.to(visual.device)]
        return next_token_part(model, batch["input_ids"], batch["attention_mask"], batch["labels"], ntp_visual,
                               head_at_labels=self.cfg.head_at_labels, state_at=self.shared_state_at(model, batch),
                               soft_mask=batch.get("soft_mask"))

    def representations(
        self, model: VLM, batch: dict, visual: Tensor | None = None, image_state: Tensor | None = None
    ) -> dict[str, Tensor]:
        """What the contrastive terms see, per sample: `patch_v` / `patch_e` ([B, D],
        CG-VLM's factorised patch-token vectors) and `image_emb` / `text_emb` ([B_s, D],
        prompted embeddings of the `emb_rows`). `image_state` [B, D]: the raw prompted image
        states when the next-token pass already computed them (shared pass); the text
        states come from the batch when cached (`train.cache_text_embeddings`). `visual`
        [B, Q, D]: the batch's visual tokens when already computed."""
        c = self.cfg
        if visual is None:
            visual = model.visual_tokens(batch.get("pixel_values"), batch.get("features"))
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
        """Weighted contrastive terms over representations (a batch, or a whole effective
        batch of cached ones), gathered across ranks when `gather`."""
        parts: dict[str, Tensor] = {}
        total = next(iter(reps.values())).new_zeros(())
        for name, term in self.active_terms().items():
            part = term.loss(self, reps)[name]
            parts[name] = part
            total = total + getattr(self.cfg, term.weight) * part
        if self.uses_embeddings:
            parts["logit_scale"] = self.logit_scale().detach()
        return total, parts
