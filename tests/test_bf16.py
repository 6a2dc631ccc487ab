"""Every recipe trains under `train.mixed_precision=bf16` on the CPU (autocast to bfloat16,
as on a GPU), with losses finite and close to the fp32 run: a dtype mismatch anywhere in
the model, the objective or the step shows here without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from vlmalign.models.vlm import VLM
from vlmalign.train.recipes import RECIPES
from vlmalign.train.trainer import train

RECIPE_IDS = ["align", "align-cg", "align-clip", "instruct", "discriminative"]


@pytest.fixture()
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change once set;
    each run here sets its own, and the tests after this one get a clean state again."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(tiny_cfg, recipe: str, precision: str, out):
    """Two logged optimizer steps; returns the history and the dtypes the LLM's linear
    layers produced."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = tiny_cfg(recipe, "train.max_steps=2", "train.log_every=1", "train.batch_size=4",
                   f"train.mixed_precision={precision}", f"train.out_dir={out / precision}")
    torch.manual_seed(cfg.train.seed)  # both precisions start from the same initial weights
    model = VLM.build(cfg)
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.llm.modules() if isinstance(m, torch.nn.Linear)]
    try:
        result = train(cfg, model=model)
    finally:
        for h in hooks:
            h.remove()
    return result, seen


def test_the_recipes_here_are_all_of_them():
    assert sorted(RECIPE_IDS) == sorted(RECIPES.names())


@pytest.mark.parametrize("recipe", RECIPE_IDS)
def test_recipe_trains_two_steps_in_bf16(tiny_cfg, tmp_path, recipe, fresh_accelerate_state):
    fp32, fp32_dtypes = run(tiny_cfg, recipe, "no", tmp_path)
    bf16, bf16_dtypes = run(tiny_cfg, recipe, "bf16", tmp_path)
    assert fp32_dtypes == {torch.float32}
    assert torch.bfloat16 in bf16_dtypes  # autocast really ran the LLM's matmuls in bf16
    assert len(bf16.history) == len(fp32.history) == 2
    for step32, step16 in zip(fp32.history, bf16.history, strict=True):
        parts = [k for k in step32 if k.endswith("loss")]
        assert "loss" in parts and "ntp_loss" in parts
        for key in parts:
            assert math.isfinite(step16[key]), (recipe, key, step16[key])
            # bf16 keeps 8 mantissa bits (relative step 0.4 %); a loss averaged over tokens
            # and pairs lands far closer, a wrong cast or an overflow far further
            assert step16[key] == pytest.approx(step32[key], rel=0.02), (recipe, key)
    for name, p in bf16.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and bool(torch.isfinite(p).all()), name  # fp32 master weights
