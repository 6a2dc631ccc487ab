"""Accumulation keeps every loss exact: 4 micro-batches of 4 give the same loss parts and
the same gradients as one batch of 16 (GradCache for the contrastive parts, token-weighted
next-token loss), for each recipe's objective."""

import pytest
import torch
from accelerate import Accelerator

from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train.datasets import TrainData, build_trainset
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.step import accumulate_gradients
from vlmalign.train.trainer import TrainStep

CASES = {
    "align": [],
    "align-cg": [],
    "align-clip": [],
    "siglip": ["objective.contrastive=siglip"],
    "discriminative": ["lora.target_modules=q_proj,v_proj", "data.long_max_tokens=200"],
}


def _gradients(cfg, micro: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = VLM.build(cfg)
    recipe = RECIPES.get(cfg.recipe)
    apply_recipe(model, recipe)
    objective = Objective(cfg.objective)
    data = TrainData.prepare(model, cfg, recipe.data)
    trainset = build_trainset(model, objective, data, cfg)
    items = [trainset.dataset[i] for i in range(16)]
    batches = [trainset.collator(items[i : i + micro]) for i in range(0, 16, micro)]
    step = TrainStep(model, objective)
    parts = accumulate_gradients(Accelerator(cpu=True), step, objective, batches)
    grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    return parts, grads


@pytest.mark.parametrize("case", list(CASES))
def test_four_micro_batches_of_four_equal_one_batch_of_sixteen(tiny_cfg, case):
    recipe = "align-clip" if case == "siglip" else case
    cfg = tiny_cfg(recipe, "train.group_by_length=false", *CASES[case])
    full_parts, full = _gradients(cfg, 16)
    acc_parts, acc = _gradients(cfg, 4)
    assert set(full) == set(acc) and full
    for name, g in full.items():
        assert torch.allclose(acc[name], g, atol=1e-5, rtol=1e-4), (case, name, (acc[name] - g).abs().max())
    for key in ("loss", "ntp_loss", "patch_loss", "clip_loss", "siglip_loss"):
        if key in full_parts:
            assert acc_parts[key] == pytest.approx(full_parts[key], rel=1e-5, abs=1e-6), key


def test_naive_averaging_would_differ(tiny_cfg):
    """The check above can fail: averaging per-micro-batch CLIP losses (negatives only from
    the micro-batch) gives other gradients."""
    cfg = tiny_cfg("align-clip", "train.group_by_length=false")
    _, full = _gradients(cfg, 16)
    torch.manual_seed(0)
    model = VLM.build(cfg)
    apply_recipe(model, RECIPES.get("align-clip"))
    objective = Objective(cfg.objective)
    data = TrainData.prepare(model, cfg, "captions")
    ts = build_trainset(model, objective, data, cfg)
    items = [ts.dataset[i] for i in range(16)]
    for i in range(0, 16, 4):
        loss, _ = objective(model, ts.collator(items[i : i + 4]))
        (loss / 4).backward()
    name = next(n for n in full if n.startswith("model.projector"))
    naive = dict(model.named_parameters())[name.removeprefix("model.")].grad
    assert not torch.allclose(naive, full[name], atol=1e-4)
