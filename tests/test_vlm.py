"""The assembled model on tiny random backbones: splicing, the next-token loss against the
plain HF forward, prompted embeddings, centring, save/load, generation."""

import torch
import torch.nn.functional as F

from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
from vlmalign.models.vlm import VLM
from vlmalign.objective import next_token_part


def _batch(model, captions):
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, 16)
    return collate([{"index": i, "caption": c} for i, c in enumerate(captions)])


def test_splice_puts_visual_tokens_at_image_positions(tiny_model):
    m = tiny_model
    b = _batch(m, ["a red circle", "a large blue square left of a small green star"])
    visual = torch.randn(2, m.num_visual_tokens, m.hidden_size)
    embeds = m.splice(b["input_ids"], visual)
    q = m.num_visual_tokens
    assert torch.equal(embeds[:, :q], visual)  # image first, in order
    text = m.llm.get_input_embeddings()(b["input_ids"][:, q:])
    assert torch.equal(embeds[:, q:], text)


def test_ntp_matches_full_vocabulary_hf_loss(tiny_model):
    m = tiny_model
    b = _batch(m, ["a red circle", "a large blue square left of a small green star"])
    visual = torch.randn(2, m.num_visual_tokens, m.hidden_size)
    ours = next_token_part(m, b["input_ids"], b["attention_mask"], b["labels"], visual)[0]
    ref = m.llm(inputs_embeds=m.splice(b["input_ids"], visual), attention_mask=b["attention_mask"], labels=b["labels"])
    assert torch.allclose(ours["ntp_loss"], ref.loss, atol=1e-5)
    assert int(ours["ntp_tokens"]) == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_embeddings_are_normalised_and_depend_on_content(tiny_model):
    m = tiny_model
    m.set_embedding_mean(torch.zeros(3, m.hidden_size))
    feats = torch.randn(3, m.vision.num_patches, m.vision.hidden_size)
    img = m.embed_images(feats)
    txt = m.embed_texts(["a red circle", "a blue square", "a red circle"])
    assert img.shape == (3, m.hidden_size) and txt.shape == (3, m.hidden_size)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt[0], txt[2], atol=1e-6) and not torch.allclose(txt[0], txt[1])
    assert not torch.allclose(img[0], img[1])


def test_text_state_is_the_last_real_token_under_padding(tiny_model):
    m = tiny_model
    alone = m.text_states(["a red circle"])
    padded = m.text_states(["a red circle", "a large blue square left of a small green star above"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_centring_subtracts_the_stored_mean(tiny_model):
    m = tiny_model
    states = torch.randn(5, m.hidden_size) + 3.0
    m.set_embedding_mean(states)
    out = m.finish_embedding(states)
    assert torch.allclose(out, F.normalize(states - states.mean(0), dim=-1), atol=1e-6)


def test_save_and_reload_gives_identical_embeddings(tiny_model, tmp_path):
    m = tiny_model
    with torch.no_grad():
        for p in m.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.set_embedding_mean(torch.randn(4, m.hidden_size))
    feats = torch.randn(2, m.vision.num_patches, m.vision.hidden_size)
    before = m.embed_images(feats)
    m.save_pretrained(tmp_path / "ckpt")
    again = VLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(again.embed_images(feats), before)
    assert torch.equal(again.embed_mean, m.embed_mean)


def test_generate_returns_one_string_per_image(tiny_model):
    m = tiny_model
    feats = torch.randn(2, m.vision.num_patches, m.vision.hidden_size)
    out = m.generate(features=feats, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_prompt_prefix_cache_is_exact(tiny_model):
    """States computed with the cached prompt prefix equal a full pass over the prompt."""
    m = tiny_model
    assert len(m._image_prefix.ids) > 0 and len(m._text_prefix.ids) > 0
    texts = ["a red circle", "a large blue square left of a small green star"]
    fast = m.text_states(texts)
    visual = torch.randn(2, m.num_visual_tokens, m.hidden_size)
    fast_img = m.image_states(visual)
    m.llm.get_input_embeddings().weight.requires_grad_(True)  # not frozen: no prefix cache
    slow = m.text_states(texts)
    slow_img = m.image_states(visual)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(fast_img, slow_img, atol=1e-5)
