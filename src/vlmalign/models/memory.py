"""Activation memory of the LLM's gated MLPs: keep two of their three activations.

A gated MLP (Llama, SmolLM2, Gemma, Qwen: `down(act(gate(x)) * up(x))`) keeps three
[tokens, intermediate] tensors for backward: the gate output (for act's backward), act of
it and the up output (for the product's backward). `GatedProduct` keeps only the gate and
up outputs and recomputes act(gate), an elementwise op, in backward. With a frozen LLM the
projections keep nothing (their weights need no gradient), so this cuts the MLP's share of
a step's saved activations by a third (SmolLM2-135M, B=16 x 60 tokens: 506 -> 337 MB)
for a recomputation that costs well under 1% of the step. Outputs and gradients are the
same ops in the same order as the plain module, so results are bitwise identical.

`lean_gated_mlps(llm)` swaps the forward of every such MLP instance (no class is
patched); `set_lean(llm, on)` switches them back and forth (the bench's ablation).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# An activation's forward and its backward, as the aten ops autograd itself would call
# (so results stay bitwise identical and backward runs no nested autograd).
Act = tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]
_SILU: Act = (F.silu, torch.ops.aten.silu_backward)
_GELU: Act = (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x))
_GELU_TANH: Act = (functools.partial(F.gelu, approximate="tanh"),
                   lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"))


def activation_ops(act: nn.Module) -> Act | None:
    """(forward, backward) of a known activation module (SiLU, exact or tanh GELU as
    torch and transformers build them); None for any other."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return _SILU
    if isinstance(act, nn.GELU):
        return _GELU_TANH if act.approximate == "tanh" else _GELU
    inner = getattr(act, "act", None)  # transformers' GELUActivation / GELUTanh
    if type(act).__name__ in ("GELUActivation", "GELUTanh"):
        if inner is F.gelu:
            return _GELU
        if isinstance(inner, functools.partial) and inner.func is F.gelu and inner.keywords == {"approximate": "tanh"}:
            return _GELU_TANH
    return None


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, saving gate and up only; act(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, ops: Act) -> Tensor:
        ctx.save_for_backward(gate, up)
        ctx.ops = ops
        return ops[0](gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        forward, backward = ctx.ops
        grad_gate = backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * forward(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def _lean_forward(self, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if self.vlmalign_lean and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(GatedProduct.apply(gate, up, self.vlmalign_act))
    return self.down_proj(self.act_fn(gate) * up)


def _gated_mlp_ops(module: nn.Module) -> Act | None:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    return activation_ops(module.act_fn)


def lean_gated_mlps(llm: nn.Module) -> int:
    """Give every gated MLP of `llm` with a known activation the lean forward (on);
    returns how many (0 for an LLM without them, which is left as it is)."""
    count = 0
    for module in llm.modules():
        if (ops := _gated_mlp_ops(module)) is not None:
            module.forward = types.MethodType(_lean_forward, module)
            module.vlmalign_act, module.vlmalign_lean = ops, True
            count += 1
    return count


def set_lean(llm: nn.Module, on: bool) -> None:
    """Switch the lean forward of `llm`'s gated MLPs on or off (after `lean_gated_mlps`)."""
    for module in llm.modules():
        if hasattr(module, "vlmalign_lean"):
            module.vlmalign_lean = on
