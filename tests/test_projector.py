"""Projectors (linear, mlp2x_gelu, pooled) and the shared Registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmalign.config import ProjectorConfig
from vlmalign.models.projector import PROJECTORS, PooledProjector, build_projector
from vlmalign.models.registry import Registry, UnknownIdError

# --- Registry (shared by towers, projectors, LLMs, recipes) -------------------------------


def test_registry_unknown_id_names_kind_and_sorted_known_ids() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("zeta")(1)
    reg.register("alpha")(2)
    assert reg.get("alpha") == 2 and reg.names() == ["alpha", "zeta"] and "zeta" in reg
    with pytest.raises(UnknownIdError) as err:
        reg.get("alp")  # a prefix of a known id must not match
    assert isinstance(err.value, KeyError)
    assert str(err.value) == "unknown widget 'alp'; known widget ids: 'alpha', 'zeta'"


def test_registry_rejects_duplicates() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    assert reg.get("a") == 1


def test_unknown_projector_lists_known_types() -> None:
    with pytest.raises(UnknownIdError, match="known projector ids: 'linear', 'mlp2x_gelu', 'pooled'"):
        build_projector(ProjectorConfig(type="mlp"), 8, 16, (2, 2))
    assert PROJECTORS.names() == ["linear", "mlp2x_gelu", "pooled"]


# --- Projectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "grid", "pool", "tokens", "out_grid"),
    [
        ("linear", (7, 7), 3, 49, (7, 7)),
        ("mlp2x_gelu", (7, 7), 3, 49, (7, 7)),
        ("pooled", (7, 7), 3, 9, (3, 3)),
        ("pooled", (4, 6), 2, 4, (2, 2)),
    ],
)
def test_projector_shapes(kind, grid, pool, tokens, out_grid) -> None:
    proj = build_projector(ProjectorConfig(type=kind, pool_size=pool), 12, 20, grid)
    assert proj.num_tokens == tokens and proj.output_grid == out_grid
    out = proj(torch.randn(3, grid[0] * grid[1], 12))
    assert out.shape == (3, tokens, 20)


def test_mlp2x_gelu_is_linear_gelu_linear() -> None:
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(type="mlp2x_gelu"), 6, 10, (2, 2))
    first, second = (m for m in proj.modules() if isinstance(m, torch.nn.Linear))
    assert (first.in_features, first.out_features, second.out_features) == (6, 10, 10)
    x = torch.randn(2, 4, 6)
    manual = F.linear(F.gelu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)
    torch.testing.assert_close(proj(x), manual)


def _manual_adaptive_mean(features: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """Bin i covers floor(i*n/k) .. ceil((i+1)*n/k)-1 on each axis; row-major output."""
    grid = features.reshape(features.shape[0], h, w, -1)
    out = []
    for i in range(k):
        r0, r1 = (i * h) // k, math.ceil((i + 1) * h / k)
        for j in range(k):
            c0, c1 = (j * w) // k, math.ceil((j + 1) * w / k)
            out.append(grid[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(("grid", "k"), [((4, 4), 2), ((7, 7), 3), ((4, 6), 3)])
def test_pooled_projector_averages_grid_bins(grid, k) -> None:
    h, w = grid
    proj = build_projector(ProjectorConfig(type="pooled", pool_size=k), 5, 8, grid)
    assert isinstance(proj, PooledProjector)
    x = torch.randn(2, h * w, 5)
    pooled = proj.pool(x)
    torch.testing.assert_close(pooled, _manual_adaptive_mean(x, h, w, k))
    torch.testing.assert_close(proj(x), proj.mlp(pooled))


def test_pooled_projector_exact_blocks() -> None:
    # 4x4 grid of values 0..15 (row-major), pooled 2x2: top-left block is 0, 1, 4, 5.
    proj = build_projector(ProjectorConfig(type="pooled", pool_size=2), 1, 4, (4, 4))
    x = torch.arange(16.0).view(1, 16, 1)
    assert proj.pool(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pooled_pool_size_larger_than_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="pool_size=3.*at most 2"):
        build_projector(ProjectorConfig(type="pooled", pool_size=3), 8, 8, (2, 5))
    with pytest.raises(ValueError, match="pool_size=8"):
        build_projector(ProjectorConfig(type="pooled", pool_size=8), 8, 8, (7, 7))


def test_projector_rejects_features_of_another_grid() -> None:
    proj = build_projector(ProjectorConfig(type="linear"), 8, 8, (7, 7))
    with pytest.raises(ValueError, match=r"expects features \[B, 49, 8\].*got \(1, 16, 8\)"):
        proj(torch.randn(1, 16, 8))


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "pooled"])
def test_projector_init_depends_only_on_torch_seed(kind) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_projector(ProjectorConfig(type=kind), 16, 24, (7, 7)).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_pooled_projector_gradients_reach_every_parameter() -> None:
    proj = build_projector(ProjectorConfig(type="pooled", pool_size=3), 8, 8, (7, 7))
    x = torch.randn(2, 49, 8, requires_grad=True)
    proj(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert x.grad.abs().sum() > 0
