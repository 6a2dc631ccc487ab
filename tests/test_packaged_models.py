"""The packaged real models (slow: seconds to a minute each)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from vlmalign.config import LLMConfig
    from vlmalign.models.language import load_llm

    return load_llm(LLMConfig(name="smollm2-135m"))


def test_smollm2_answers_a_chat_prompt(smollm2):
    model, tok = smollm2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_image_token_lies_outside_the_llm_vocabulary(smollm2):
    model, tok = smollm2
    assert tok.convert_tokens_to_ids("<image>") >= model.get_input_embeddings().num_embeddings


def test_demo_path_with_real_models(tmp_path):
    """A few steps of the three recipes with SmolLM2-135M + EfficientNet-Lite0."""
    from vlmalign.demo import run_demo

    results = run_demo(out=tmp_path / "demo", quick=True, extra=["data.shapes_n=60", "train.max_steps=2", "train.batch_size=4", "data.eval_max_samples=6"])
    for name, m in results.items():
        assert 0 <= m["emb_i2t_R@1"] <= 100, name
        assert 0 < m["heldout_ntp_loss"] < 20, name
