"""Process-group helpers used by every layer: world size and rank, the gradient-keeping
all-gather of the contrastive losses, and sums across ranks. Imports only torch.

Each function works unchanged without a process group (one process): world size 1, rank
0, gathers and sums are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when there is none."""
    if initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def world_size() -> int:
    return world_and_rank()[0]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` [B, ...] from every rank, keeping autograd, concatenated on dim 0.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients
    of each rank's slice back onto its owner (open_clip's ``gather_with_grad``). Returns
    [world * B, ...], rank r's rows at ``r * B : (r + 1) * B``. Identity when
    torch.distributed is not initialised or the world size is 1.
    """
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)  # [world * B, ...]


def sum_over_ranks(value: int, device: torch.device) -> int:
    """An integer summed over all ranks (no gradient); `value` itself with one process."""
    if world_size() == 1:
        return value
    t = torch.tensor(value, device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t)


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
    world = world_size()
    if world == 1:
        return torch.ones((), device=n_local.device)
    n_global = n_local.detach().clone()
    dist.all_reduce(n_global, op=dist.ReduceOp.SUM)
    # clamp: if no rank has a label token every mean is an exact 0 (losses.next_token_loss).
    return world * n_local.float() / n_global.clamp(min=1).float()
