"""A checkpoint written by an earlier vlmalign (tests/fixtures/checkpoint-v0: a tiny
align-clip run of 2 steps with soft prompts, made before the model stopped computing
losses) still loads, verifies and gives the logits and embeddings it gave then."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from vlmalign.models.vlm import VLM
from vlmalign.train import checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-v0"


def test_old_checkpoint_reloads_with_equal_logits_and_embeddings():
    expected = load_file(str(FIXTURE.parent / "checkpoint-v0-expected.safetensors"))
    checkpoint.verify_checkpoint(FIXTURE)  # manifest sizes and sha256 still hold
    set_seed(0)  # the tiny tower is built from the global seed, as when the fixture was made
    model = VLM.from_pretrained(FIXTURE)
    model.eval()
    with torch.no_grad():
        visual = model.visual_tokens(features=expected["features"])
        logits = model.llm(inputs_embeds=model.splice(expected["input_ids"], visual)).logits
        image = model.embed_images(expected["features"])
        text = model.embed_texts(["a small red circle", "a large blue square"])
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(image, expected["image_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(text, expected["text_emb"], rtol=0, atol=1e-5)
    assert model.image_soft is not None  # the soft prompts came back from the checkpoint
