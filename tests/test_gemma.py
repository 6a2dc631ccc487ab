"""Gemma-3-270M: the split GGUF is joined and checked, Gemma's turn template works with the
conversation label masks, final-logit softcapping reaches the loss. Fast tests on tiny
stand-ins; the packaged model itself in the slow tests."""

import hashlib
import math
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from vlmalign.data.conversations import Conversation, encode_conversation
from vlmalign.data.images import load_image
from vlmalign.models.language import (
    GEMMA_CHAT_TEMPLATE,
    IMAGE_TOKEN,
    join_parts,
    manifest_sha256,
    tiny_tokenizer,
)
from vlmalign.models.prompts import leading_special_ids
from vlmalign.models.vlm import VLM
from vlmalign.objective import next_token_part

TWO_TURNS = [("user", f"{IMAGE_TOKEN}\nWhat is in the image?"), ("assistant", "A red circle."),
             ("user", "Where is it?"), ("assistant", "On the left.")]


def test_join_parts_checks_size_and_hash(tmp_path):
    parts = []
    for i, data in enumerate([b"abc" * 100, b"defg" * 50, b"h"]):
        parts.append(tmp_path / f"f.part{i:02d}")
        parts[-1].write_bytes(data)
    whole = b"abc" * 100 + b"defg" * 50 + b"h"
    digest = hashlib.sha256(whole).hexdigest()
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{'0' * 64}  other.gguf\n{digest}  f.gguf\n")
    assert manifest_sha256(manifest, "f.gguf") == digest and manifest_sha256(manifest, "x") is None
    target = tmp_path / "cache" / "f.gguf"
    assert join_parts(parts, target, len(whole), digest).read_bytes() == whole
    with pytest.raises(ValueError, match="size 501 bytes, expected 502"):
        join_parts(parts, tmp_path / "bad.gguf", len(whole) + 1)
    with pytest.raises(ValueError, match="sha256"):
        join_parts(parts, tmp_path / "bad.gguf", len(whole), "f" * 64)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.tmp").exists()
    parts[0].write_bytes(b"x" * 300)  # a changed part: an existing good target is reused
    assert join_parts(parts, target, len(whole), digest).read_bytes() == whole


def _gemma_like_tokenizer():
    """The tiny test tokenizer with Gemma's turn tokens and template, set up as the
    gemma3-270m registry entry sets up the real one."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>", "<bos>"], special_tokens=True)
    tok.bos_token = "<bos>"
    tok.eos_token = "<end_of_turn>"
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def test_gemma_template_renders_turns_and_masks_only_assistant_text():
    tok = _gemma_like_tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_conversation(Conversation("c", Path("img.png"), TWO_TURNS), tok, image_id, 3, 256)
    trained = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100])
    assert trained == "A red circle.<end_of_turn>On the left.<end_of_turn>"
    assert enc.input_ids.count(image_id) == 3


def _tiny_gemma_dir(tmp_path, softcap):
    tok = _gemma_like_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=softcap, sliding_window=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    return tmp_path / "gemma"


@torch.no_grad()
def test_final_logit_softcapping_reaches_the_ntp_loss(tiny_cfg, tmp_path):
    model = VLM.build(tiny_cfg("align", f"llm.name={_tiny_gemma_dir(tmp_path, softcap=0.5)}"))
    assert model.llm.config.final_logit_softcapping == 0.5
    model.llm.get_output_embeddings().weight.mul_(50)  # logits large enough for the cap to bite
    q = model.num_visual_tokens
    ids = torch.tensor([[model.image_token_id] * q + [10, 11, 12, 13, model.tokenizer.eos_token_id]])
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    visual = torch.randn(1, q, model.hidden_size)
    ours = next_token_part(model, ids, torch.ones_like(ids), labels, visual)[0]["ntp_loss"]
    embeds = model.splice(ids, visual)
    hf = model.llm(inputs_embeds=embeds, labels=labels).loss  # HF Gemma3 applies the cap itself
    assert torch.allclose(ours, hf, atol=1e-5)
    model.llm.config.final_logit_softcapping = None  # without the cap: a different number
    assert abs(next_token_part(model, ids, torch.ones_like(ids), labels, visual)[0]["ntp_loss"] - ours) > 0.5


# ----------------------------------------------------------------- the packaged model


@pytest.fixture(scope="module")
def gemma():
    from vlmalign.config import LLMConfig
    from vlmalign.models.language import load_llm

    return load_llm(LLMConfig(name="gemma3-270m"))  # scripts/setup.sh installs the parts


@pytest.mark.slow
def test_packaged_gemma_tokenizer_template_and_masks(gemma):
    llm, tok = gemma
    assert llm.config.model_type == "gemma3_text" and llm.config.vocab_size == 262144
    assert tok.is_fast and tok.eos_token == "<end_of_turn>" and tok.convert_tokens_to_ids(IMAGE_TOKEN) == 262144
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok(text, add_special_tokens=False).input_ids[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_conversation(Conversation("c", Path("img.png"), TWO_TURNS), tok, image_id, 4, 256)
    trained = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100])
    assert trained == "A red circle.<end_of_turn>On the left.<end_of_turn>"
    # the base model continues plain text sensibly from the de-quantised weights
    ids = tok("The capital of France is", return_tensors="pt")
    out = llm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0]) or "capital" in tok.decode(out[0][ids.input_ids.shape[1]:])


@pytest.mark.slow
def test_packaged_gemma_vlm_ntp_loss_is_finite(tiny_cfg, shapes_root):
    torch.manual_seed(0)
    model = VLM.build(tiny_cfg("align", "llm.name=gemma3-270m", "projector.pool_size=2"))
    assert model.hidden_size == 640
    image = next((shapes_root / "images").glob("*.png"))
    visual = model.visual_tokens(pixel_values=model.preprocess([load_image(image)] * 2))  # [2, Q, 640]
    cap = model.tokenizer("a small red circle", add_special_tokens=False).input_ids + [model.tokenizer.eos_token_id]
    head = leading_special_ids(model.tokenizer)  # Gemma's <bos>, as the caption collator puts it
    ids = torch.tensor([head + [model.image_token_id] * model.num_visual_tokens + cap] * 2)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    labels[:, : len(head)] = -100
    out = next_token_part(model, ids, torch.ones_like(ids), labels, visual)[0]
    assert torch.isfinite(out["ntp_loss"]) and 0.0 < out["ntp_loss"] < 30.0  # untrained visual tokens: ~12
    # The same path on plain text (no visual token): an untrained LLM scores about
    # ln(262144) = 12.5 a token (uniform over the vocabulary); the packaged pretrained one
    # predicts plain English far better (2.4 measured).
    sentence = model.tokenizer("The capital of France is Paris.", add_special_tokens=False).input_ids
    text = torch.tensor([head + sentence])
    text_labels = text.clone()
    text_labels[:, : len(head)] = -100
    plain = next_token_part(model, text, torch.ones_like(text), text_labels, visual[:1, :0])[0]["ntp_loss"]
    assert 0.0 < float(plain) < 0.6 * math.log(262144), float(plain)
    assert int(out["ntp_tokens"]) == 2 * len(cap)
    out["ntp_loss"].backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
