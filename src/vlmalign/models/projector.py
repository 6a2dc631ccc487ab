"""Projectors: patch features [B, P, Dv] -> visual tokens [B, Q, D] in the LLM's width.

Registered types (`PROJECTORS`, looked up by `ProjectorConfig.type`):

- "linear": one Linear layer, Q = P (LLaVA).
- "mlp2x_gelu": Linear-GELU-Linear, Q = P (LLaVA-1.5).
- "pooled": the h x w patch grid average-pooled (adaptive) to k x k, then mlp2x_gelu;
  Q = k * k. Fewer visual tokens make every LLM step cheaper (FINDINGS.md).

Parameters use PyTorch's default initialisation, so a projector depends only on the torch
RNG state at construction.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from vlmalign.config import ProjectorConfig
from vlmalign.models.registry import Registry


class Projector(nn.Module, abc.ABC):
    """Base class: [B, P, Dv] -> [B, Q, D], with Q = `num_tokens` on an `output_grid`."""

    num_tokens: int
    output_grid: tuple[int, int]

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"projector dims must be positive, got in={in_dim}, out={out_dim}")
        if len(grid) != 2 or grid[0] <= 0 or grid[1] <= 0:
            raise ValueError(f"projector grid must be (h, w) with h, w > 0, got {grid}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.input_grid = (int(grid[0]), int(grid[1]))

    def _check_input(self, features: Tensor) -> None:
        h, w = self.input_grid
        if features.ndim != 3 or features.shape[1] != h * w or features.shape[2] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects features [B, {h * w}, {self.in_dim}] "
                f"(a {h}x{w} grid), got {tuple(features.shape)}; build the projector with "
                "the vision tower's grid and hidden_size"
            )

    @abc.abstractmethod
    def forward(self, features: Tensor) -> Tensor:
        """Features [B, P, Dv] -> visual tokens [B, Q, D]."""


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, out) -> GELU -> Linear(out, out), as LLaVA-1.5's `mlp2x_gelu`."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class LinearProjector(Projector):
    """One Linear layer per patch (LLaVA): Q = P."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int]) -> None:
        super().__init__(in_dim, out_dim, grid)
        self.num_tokens = grid[0] * grid[1]
        self.output_grid = self.input_grid
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        """[B, P, Dv] -> [B, P, D]."""
        self._check_input(features)
        return self.proj(features)


class MLPProjector(Projector):
    """Linear-GELU-Linear per patch (LLaVA-1.5 `mlp2x_gelu`): Q = P."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int]) -> None:
        super().__init__(in_dim, out_dim, grid)
        self.num_tokens = grid[0] * grid[1]
        self.output_grid = self.input_grid
        self.mlp = _mlp2x_gelu(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        """[B, P, Dv] -> [B, P, D]."""
        self._check_input(features)
        return self.mlp(features)


class PooledProjector(Projector):
    """Adaptive average pooling of the h x w grid to k x k, then mlp2x_gelu: Q = k * k.

    Pooling bin i along an axis of length n averages positions floor(i*n/k) to
    ceil((i+1)*n/k) - 1 (`F.adaptive_avg_pool2d`); bins overlap when k does not divide n
    (7 -> 3: rows 0-2, 2-4, 4-6). Output tokens are in row-major order of the k x k grid.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], pool_size: int) -> None:
        super().__init__(in_dim, out_dim, grid)
        h, w = self.input_grid
        if pool_size <= 0 or pool_size > h or pool_size > w:
            raise ValueError(
                f"projector.pool_size={pool_size} must be between 1 and the patch grid's "
                f"smaller side ({h}x{w} grid: at most {min(h, w)})"
            )
        self.pool_size = pool_size
        self.num_tokens = pool_size * pool_size
        self.output_grid = (pool_size, pool_size)
        self.mlp = _mlp2x_gelu(in_dim, out_dim)

    def pool(self, features: Tensor) -> Tensor:
        """[B, h*w, Dv] -> [B, k*k, Dv]: adaptive average pool over the patch grid."""
        self._check_input(features)
        h, w = self.input_grid
        b, _, d = features.shape
        grid = features.transpose(1, 2).reshape(b, d, h, w)  # [B, Dv, h, w]
        pooled = F.adaptive_avg_pool2d(grid, self.pool_size)  # [B, Dv, k, k]
        return pooled.flatten(2).transpose(1, 2)  # [B, k*k, Dv]

    def forward(self, features: Tensor) -> Tensor:
        """[B, h*w, Dv] -> [B, k*k, D]."""
        return self.mlp(self.pool(features))


ProjectorBuilder = Callable[[ProjectorConfig, int, int, tuple[int, int]], Projector]
PROJECTORS: Registry[ProjectorBuilder] = Registry("projector")


@PROJECTORS.register("linear")
def _build_linear(cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Projector:
    return LinearProjector(in_dim, out_dim, grid)


@PROJECTORS.register("mlp2x_gelu")
def _build_mlp(cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Projector:
    return MLPProjector(in_dim, out_dim, grid)


@PROJECTORS.register("pooled")
def _build_pooled(cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Projector:
    return PooledProjector(in_dim, out_dim, grid, cfg.pool_size)


def build_projector(
    cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int]
) -> Projector:
    """Build projector `cfg.type` from `PROJECTORS` for Dv = in_dim, D = out_dim, grid (h, w)."""
    return PROJECTORS.get(cfg.type)(cfg, in_dim, out_dim, tuple(grid))
