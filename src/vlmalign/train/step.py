"""One optimizer step's gradients over an effective batch of K micro-batches, exact for
contrastive losses and token-weighted for the next-token loss.

Plain accumulation (K forward/backward passes, each loss divided by K) silently changes a
contrastive loss: each micro-batch only sees its own B negatives instead of K * B (open_clip
PR #267/#419), and averaging per-micro-batch token means weights a short caption's tokens
more than a long one's. Here, as in GradCache (Gao et al. 2021):

1. every micro-batch's contrastive representations (prompted embeddings, patch-token
   vectors) are computed without grad, its RNG state kept (dropout draws the same masks
   when it is replayed);
2. the contrastive loss runs once over all of them (gathered across ranks), and its
   gradient with respect to each representation is kept;
3. each micro-batch is replayed with grad, its surrogate loss sum(rep * cached grad) +
   ntp_weight * ntp * N_k / N (N: label tokens of the whole effective batch, all ranks)
   back-propagated; DDP synchronises only on the last replay.

The result equals one step on the K * B batch (tests/test_accumulation.py). K == 1 is a
plain forward/backward.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vlmalign import dist
from vlmalign.models.prompts import IGNORE_INDEX
from vlmalign.objective import Objective
from vlmalign.train.guard import NonFiniteGuard


class TrainStep(nn.Module):
    """Model + objective as one module, so Accelerate wraps every trainable parameter."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict, replay: dict | None = None):
        return self.objective(self.model, batch, replay)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _replayed_rng(state: tuple[Tensor, Tensor | None], device: torch.device):
    """Run the block with the RNG state `state` (the one a micro-batch's representations
    were computed under), leaving the outer RNG as it was: dropout then draws the same
    masks in the replay as in the no-grad pass (GradCache's RandContext)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def label_tokens(batch: dict) -> int:
    """Label positions the next-token loss averages over (after the shift)."""
    labels = batch.get("labels")
    return 0 if labels is None else int((labels[:, 1:] != IGNORE_INDEX).sum())


def _world(objective: Objective) -> int:
    return dist.world_size() if objective.gather else 1


def optimizer_step(
    accelerator: Accelerator, step_module: nn.Module, objective: Objective, batches: list[dict],
    params: list[Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float,
    guard: NonFiniteGuard | None = None, step: int = 0,
) -> tuple[dict[str, float], Tensor]:
    """One optimizer step on the effective batch `batches`: gradients
    (`accumulate_gradients`), clipping to `max_grad_norm`, the guard's check (a step with a
    non-finite loss or gradient changes nothing), `optimizer.step()`, the temperature's
    clamp, zeroed gradients. The trainer and `vlmalign bench` both take this step.
    Returns (the logged loss parts, the gradient norm before clipping)."""
    parts = accumulate_gradients(accelerator, step_module, objective, batches)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    ids = [i for b in batches for i in b["index"].tolist()] if "index" in batches[0] else None
    loss = torch.tensor(parts.get("loss", 0.0))
    if guard is None or not guard.should_skip(loss, params, step, ids, grad_norm=grad_norm):
        optimizer.step()
        objective.clamp_logit_scale_()
    optimizer.zero_grad(set_to_none=True)
    return parts, grad_norm


def accumulate_gradients(
    accelerator: Accelerator, step_module: nn.Module, objective: Objective, batches: list[dict]
) -> dict[str, float]:
    """Backward for the effective batch made of `batches` (gradients left in `.grad`);
    returns the logged loss parts of the effective batch.

    `objective` is an `Objective`, or any module with its accumulation interface
    (`contrastive_active`, `gather`, `cfg.ntp_weight`, `representations(model, batch)`,
    `contrastive(reps)`, and `forward(model, batch, replay)`), as the CLIP peer's
    (baseline/clip.py)."""
    if len(batches) == 1:
        loss, parts = step_module(batches[0])
        accelerator.backward(loss)  # a non-finite loss is the guard's to skip (train/guard.py)
        return {k: float(v.detach()) for k, v in parts.items() if k != "ntp_tokens"}

    model = accelerator.unwrap_model(step_module).model
    cfg = objective.cfg
    n_k = [label_tokens(b) for b in batches]
    world = _world(objective)
    n_total = dist.sum_over_ranks(sum(n_k), model.projector_device()) if world > 1 else sum(n_k)
    # Rank r's micro-batch k contributes W * S_rk / N: the mean over ranks (DDP) of the
    # ranks' sums is then the global per-token mean (dist.rank_token_weight).
    factors = [world * n / max(n_total, 1) for n in n_k]

    grads: list[dict[str, Tensor]] = [{} for _ in batches]
    device = model.projector_device()
    rng: list[tuple[Tensor, Tensor | None] | None] = [None] * len(batches)
    logged: dict[str, float] = {}
    if objective.contrastive_active:
        with torch.no_grad():
            reps = []
            for k, b in enumerate(batches):
                rng[k] = _rng_state(device)
                reps.append(objective.representations(model, b))
        leaves = {k: torch.cat([r[k] for r in reps]).detach().requires_grad_(True) for k in reps[0]}
        loss, cparts = objective.contrastive(leaves)
        accelerator.backward(loss)  # grads of the leaves, and of the temperature (objective)
        for key, leaf in leaves.items():
            sizes = [r[key].shape[0] for r in reps]
            for k, g in enumerate(leaf.grad.split(sizes)):
                grads[k][key] = g
        logged |= {k: float(v.detach()) for k, v in cparts.items()}
        logged["loss"] = float(loss.detach())

    ntp_sum = 0.0
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        replayed = _replayed_rng(rng[k], device) if rng[k] is not None else nullcontext()
        with nullcontext() if last else accelerator.no_sync(step_module), replayed:
            loss, parts = step_module(batch, replay={"grads": grads[k], "ntp_factor": factors[k]})
            accelerator.backward(loss)
        if "ntp_loss" in parts:
            ntp_sum += float(parts["ntp_loss"].detach()) * n_k[k]
    if cfg.ntp_weight > 0:
        local = sum(n_k)
        logged["ntp_loss"] = ntp_sum / max(local, 1)
        logged["loss"] = logged.get("loss", 0.0) + cfg.ntp_weight * logged["ntp_loss"]
    return logged

