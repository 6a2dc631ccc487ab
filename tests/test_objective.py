"""The objective's own rules: the learnable temperature is clamped after the optimizer
step (both bounds), never inside the loss; `vision.frozen=false` really trains the tower."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from vlmalign.objective import Objective
from vlmalign.train.step import TrainStep, optimizer_step
from vlmalign.train.trainer import train


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_temperature_is_clamped_after_the_step_in_both_directions(tiny_cfg, tiny_model, contrastive):
    cfg = tiny_cfg("align-clip", f"objective.contrastive={contrastive}")
    objective = Objective(cfg.objective)
    model = tiny_model
    g = torch.Generator().manual_seed(0)
    batch = {"features": torch.randn(4, 16, 32, generator=g), "captions": ["a red circle", "a blue square",
                                                                          "a small star", "a large green circle"],
             "index": torch.arange(4)}
    model.set_embedding_mean(torch.zeros(1, model.hidden_size))
    cfg.objective.ntp_weight = 0.0
    opt = torch.optim.SGD(objective.parameters(), lr=0.0)
    for start, bound in ((math.log(1e4), cfg.objective.max_logit_scale), (math.log(1e-3), cfg.objective.min_logit_scale)):
        with torch.no_grad():
            objective.log_logit_scale.fill_(start)
        loss, _ = objective(model, batch)
        (grad,) = torch.autograd.grad(loss, [objective.log_logit_scale])
        assert grad.abs().item() > 0  # beyond the bound the scale still learns (no clamp in the loss)
        optimizer_step(Accelerator(cpu=True), TrainStep(model, objective), objective, [batch],
                       list(objective.parameters()), opt, max_grad_norm=1.0)
        assert objective.logit_scale().item() == pytest.approx(bound, rel=1e-5)


def test_bad_temperature_bounds_are_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="min_logit_scale"):
        Objective(tiny_cfg("align-clip", "objective.min_logit_scale=200").objective)


@pytest.mark.parametrize("frozen", [True, False])
def test_vision_frozen_false_trains_the_tower(tiny_cfg, frozen):
    cfg = tiny_cfg("align", f"vision.frozen={str(frozen).lower()}", "train.max_steps=2", "train.eval_at_end=false",
                   "train.lr=1e-2", "train.warmup_steps=0")
    torch.manual_seed(0)
    from vlmalign.models.vlm import VLM

    model = VLM.build(cfg)
    before = {n: p.detach().clone() for n, p in model.vision.named_parameters()}
    run = train(cfg, model=model)
    changed = [n for n, p in run.model.vision.named_parameters() if not torch.equal(before[n], p.detach())]
    if frozen:
        assert not changed
    else:
        assert len(changed) > len(before) // 2  # the tower's weights took gradient steps
        assert "vision" in (run.checkpoint / "config.yaml").read_text()
        # ... and the trained tower is saved with the checkpoint and comes back
        reloaded = VLM.from_pretrained(run.checkpoint)
        name = changed[0]
        torch.testing.assert_close(dict(reloaded.vision.named_parameters())[name],
                                   dict(run.model.vision.named_parameters())[name])
