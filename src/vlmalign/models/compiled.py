"""`torch.compile` of the LLM's decoder layers (`train.compile`, the bench's `compile` mode).

Each decoder layer is compiled in place (`nn.Module.compile`), so parameter names and
checkpoints do not change, with dynamic shapes because batch lengths vary. The layers
run the same code, but transformers' attention reads its own layer's entry of the
key/value cache, so Dynamo specialises each layer once: the recompile limit is raised to
the layer count (plus a margin) instead of falling back to eager after eight layers.

Whether it pays is a matter of measurement (`vlmalign bench --ablate RECIPE` times the
`compile` mode against the optimised one): inductor fuses the norms, rotary embeddings
and activations. On the 2-core CPU here the first step compiles for 3-6 minutes and later
steps are ~10% faster, so it is off by default and worth it for long runs only
(benchmarks/README.md).
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The LLM's stack of decoder layers (the first `ModuleList` named `layers`: Llama,
    Gemma, Qwen and their peft wrappers)."""
    for name, module in llm.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module):
            return module
    raise ValueError(f"{type(llm).__name__} has no decoder layer list named 'layers' to compile")


def set_compiled(llm: nn.Module, on: bool) -> int:
    """Compile every decoder layer of `llm` (on) or go back to eager (off); returns the
    number of layers. Switching back on reuses the compiled callables (and so what Dynamo
    already compiled), so modes can alternate step by step."""
    layers = decoder_layers(llm)
    for layer in layers:
        if not on:
            layer._compiled_call_impl = None  # what nn.Module.compile set; eager again
        elif (fn := layer.__dict__.get("_vlmalign_compiled")) is not None:
            layer._compiled_call_impl = fn  # the same compiled callable: no recompilation
        else:
            layer.compile(dynamic=True)
            layer._vlmalign_compiled = layer._compiled_call_impl
    if on:
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * len(layers) + 8)
    return len(layers)


def is_compiled(llm: nn.Module) -> bool:
    """Whether `llm`'s decoder layers are compiled (`set_compiled`)."""
    return getattr(decoder_layers(llm)[0], "_compiled_call_impl", None) is not None
