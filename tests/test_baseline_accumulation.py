"""The CLIP peer takes the trainer's step: accumulated over K micro-batches, its gradients
equal one step on the K * B batch (GradCache), which a plain (loss / K).backward() does
not give; its temperature is clamped after the step, not inside the loss."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from vlmalign.baseline.clip import ClipBaselineConfig, ClipDualEncoder, ClipObjective
from vlmalign.train.step import TrainStep, accumulate_gradients, optimizer_step


def _peer(tiny_cfg):
    torch.manual_seed(0)
    model = ClipDualEncoder.build(tiny_cfg("align-clip"), ClipBaselineConfig(text_tower="tiny", embed_dim=16))
    return model, ClipObjective(model)


def _batches(model, n: int, k: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    words = ["red", "blue", "green", "circle", "square", "star", "small", "large"]
    feats = torch.randn(n, model.vision.hidden_size, generator=g)
    caps = [f"a {words[i % 8]} {words[(3 * i + 1) % 8]}" for i in range(n)]
    b = n // k
    return [{"features": feats[i * b:(i + 1) * b], "captions": caps[i * b:(i + 1) * b],
             "index": torch.arange(i * b, (i + 1) * b)} for i in range(k)]


def _grads(model, objective, batches) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate_gradients(Accelerator(cpu=True), TrainStep(model, objective), objective, batches)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_peer_step_equals_one_big_batch(tiny_cfg):
    model, objective = _peer(tiny_cfg)
    model.eval()  # no dropout: one batch of 8 and two of 4 then see the same network
    whole = _grads(model, objective, _batches(model, 8, 1))
    split = _grads(model, objective, _batches(model, 8, 2))
    assert whole and set(whole) == set(split)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4)
    # The plain mean of two 4-negative losses differs: the exactness is not a coincidence.
    model.zero_grad(set_to_none=True)
    for b in _batches(model, 8, 2):
        (objective(model, b)[0] / 2).backward()
    naive = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(naive[n], whole[n], atol=1e-5) for n in whole)


def test_peer_temperature_is_clamped_after_the_step_in_both_directions(tiny_cfg):
    model, objective = _peer(tiny_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    for start, bound in ((math.log(500.0), objective.cfg.max_logit_scale), (math.log(0.01), objective.cfg.min_logit_scale)):
        with torch.no_grad():
            model.log_logit_scale.fill_(start)
        # beyond the bound the scale still has a gradient (no clamp inside the loss)
        loss, _ = objective(model, _batches(model, 4, 1)[0])
        (grad,) = torch.autograd.grad(loss, [model.log_logit_scale])
        assert grad.abs().item() > 0
        optimizer_step(Accelerator(cpu=True), TrainStep(model, objective), objective, _batches(model, 4, 1), params,
                       opt, max_grad_norm=1.0)
        assert model.logit_scale().item() == pytest.approx(bound, rel=1e-5)
