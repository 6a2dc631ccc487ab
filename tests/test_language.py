"""LLM loading from a local directory, and clear errors for what cannot be loaded."""

import pytest
import torch

from vlmalign.config import LLMConfig
from vlmalign.models.language import IMAGE_TOKEN, load_llm


def test_local_directory_loads_the_same_model(tmp_path):
    model, tok = load_llm(LLMConfig(name="tiny"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_llm(LLMConfig(name=str(tmp_path)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)
    assert tok2.chat_template == tok.chat_template
    assert tok2.convert_tokens_to_ids(IMAGE_TOKEN) == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert not any(p.requires_grad for p in again.parameters())  # frozen by default


def test_unreachable_model_names_the_packaged_ids(tmp_path):
    with pytest.raises(OSError, match="smollm2-135m"):
        load_llm(LLMConfig(name=str(tmp_path / "no-such-model")))


def test_gguf_file_needs_a_directory():
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        load_llm(LLMConfig(name="some/hub-id", gguf_file="x.gguf"))
