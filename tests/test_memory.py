"""Lean gated MLPs: the same outputs and gradients, bitwise, with fewer saved activations."""

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from vlmalign.config import LLMConfig
from vlmalign.models.language import load_llm
from vlmalign.models.memory import lean_gated_mlps, set_lean


def _plain_and_lean(model):
    lean = copy.deepcopy(model)
    assert lean_gated_mlps(lean) == model.config.num_hidden_layers
    return model, lean


def _step(model, embeds):
    """Loss and gradients of a frozen-or-not LLM fed embeddings that need a gradient
    (the projector's output, as in alignment)."""
    x = embeds.clone().requires_grad_()
    out = model(inputs_embeds=x).logits.float().logsumexp(-1).mean()
    out.backward()
    grads = {"inputs": x.grad} | {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _saved_numel(model, embeds, width):
    sizes = []

    def pack(t):
        if t.dim() and t.shape[-1] == width:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds.clone().requires_grad_()).logits.sum()
    return sum(sizes)


@pytest.mark.parametrize("frozen", [True, False])
def test_lean_llama_mlp_is_bitwise_identical_and_saves_less(frozen):
    base, _ = load_llm(LLMConfig(name="tiny", frozen=frozen, lean_mlp=False))
    plain, lean = _plain_and_lean(base)
    embeds = torch.randn(3, 7, plain.config.hidden_size, generator=torch.Generator().manual_seed(0))
    loss_p, grads_p = _step(plain, embeds)
    loss_l, grads_l = _step(lean, embeds)
    assert torch.equal(loss_p, loss_l)
    assert grads_p.keys() == grads_l.keys() and (len(grads_p) > 1) == (not frozen)
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_l[name]), name
    width = plain.config.intermediate_size
    saved_plain, saved_lean = _saved_numel(plain, embeds, width), _saved_numel(lean, embeds, width)
    if frozen:  # gate, act(gate), up -> gate, up: one [tokens, intermediate] tensor fewer per layer
        assert saved_plain - saved_lean == embeds.shape[0] * embeds.shape[1] * width * plain.config.num_hidden_layers
    else:  # the down projection also keeps its input for its weight's gradient
        assert saved_lean < saved_plain
    set_lean(lean, False)
    assert _saved_numel(lean, embeds, width) == saved_plain


def test_lean_gemma3_mlp_with_its_gelu_is_bitwise_identical():
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    plain, lean = _plain_and_lean(Gemma3ForCausalLM(cfg).eval().requires_grad_(False))
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    (loss_p, grads_p), (loss_l, grads_l) = _step(plain, embeds), _step(lean, embeds)
    assert torch.equal(loss_p, loss_l) and torch.equal(grads_p["inputs"], grads_l["inputs"])


def test_lean_forward_without_grad_is_the_plain_product():
    plain, lean = _plain_and_lean(load_llm(LLMConfig(name="tiny", lean_mlp=False))[0])
    embeds = torch.randn(2, 4, plain.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(plain(inputs_embeds=embeds).logits, lean(inputs_embeds=embeds).logits)
