"""torch.compile of the decoder layers (models/compiled.py): switching on and off, names
unchanged, the trainer's `train.compile`. That the compiled step computes the same
losses and gradients is tested with the bench's `compile` mode (test_bench.py)."""

import pytest
import torch
import torch._dynamo
from torch import nn

from vlmalign.models import compiled
from vlmalign.train import trainer


def test_set_compiled_switches_the_layers_and_keeps_parameter_names(tiny_model):
    llm = tiny_model.llm
    names = list(llm.state_dict())
    layers = compiled.decoder_layers(llm)
    assert len(layers) == llm.config.num_hidden_layers
    assert not compiled.is_compiled(llm)
    try:
        assert compiled.set_compiled(llm, True) == len(layers)
        assert compiled.is_compiled(llm)
        assert all(layer._compiled_call_impl is not None for layer in layers)
        assert torch._dynamo.config.recompile_limit >= 2 * len(layers)
        assert list(llm.state_dict()) == names  # checkpoints do not change
        first = [layer._compiled_call_impl for layer in layers]
        compiled.set_compiled(llm, False)
        assert not compiled.is_compiled(llm)
        compiled.set_compiled(llm, True)  # back on: the same compiled callables, nothing recompiles
        assert [layer._compiled_call_impl for layer in layers] == first
    finally:
        compiled.set_compiled(llm, False)
    assert not compiled.is_compiled(llm)
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="layers"):
        compiled.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_train_compile_compiles_the_llm(tiny_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.compiled, "set_compiled", lambda llm, on: calls.append(on) or 2)
    trainer.train(tiny_cfg("align", "train.max_steps=1", "train.compile=true", "train.eval_at_end=false"))
    assert calls == [True]
    calls.clear()
    trainer.train(tiny_cfg("align", "train.max_steps=1", "train.eval_at_end=false"))
    assert calls == []
