"""The discriminative recipe (VladVA): short/long caption routing, soft prompts, LoRA, and
checkpoints that reload to identical embeddings; on tiny models and shapes files."""

import dataclasses

import torch

from vlmalign.config import DataConfig
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.short_long import ShortLongCollator, split_captions
from vlmalign.models.prompts import PromptTemplate, render_prompt
from vlmalign.models.vlm import VLM
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.trainer import train


def _feats(model: VLM, n: int = 3) -> torch.Tensor:
    return torch.randn(n, model.vision.num_patches, model.vision.hidden_size, generator=torch.Generator().manual_seed(0))


def test_prompt_pieces_tokenise_like_the_rendered_prompt(tiny_model):
    tok = tiny_model.tokenizer
    template = "<sent>\nSummarize above sentence in one word:"
    t = PromptTemplate.build(tok, template, "<sent>", chat_template=True)
    sentence = "a small red circle left of a large blue square"
    ids, soft = t.ids(tok(sentence, add_special_tokens=False).input_ids)
    assert ids == tok(render_prompt(tok, template, True, sentence), add_special_tokens=False).input_ids
    assert sum(soft) == len(t.before) + len(t.after) > 0


def test_captions_route_by_token_length_not_by_field(tiny_model):
    tok = tiny_model.tokenizer
    cfg = DataConfig(short_max_tokens=8, long_min_tokens=8, long_max_tokens=40)
    short, long_, huge = "a red circle", "a " * 20 + "circle", "word " * 100
    samples = [
        Sample("both", image=None, short_caption=short, long_caption=long_),
        Sample("swapped", image=None, short_caption=long_, long_caption=short),  # fields lie
        Sample("short-only", image=None, short_caption=short),
        Sample("too-long", image=None, long_caption=huge),
    ]
    report = LoadReport()
    keep, caps = split_captions(samples, tok, cfg, report)
    assert keep == [0, 1, 2]
    assert (caps[0].short, caps[0].long) == (short, long_)
    assert (caps[1].short, caps[1].long) == (short, long_)
    assert (caps[2].short, caps[2].long) == (short, "")
    assert report.skipped == {"no_short_or_long_caption": 1}


def test_collator_splits_rows_between_the_losses(tiny_model):
    m = tiny_model
    collate = ShortLongCollator(m.tokenizer, m.image_token_id, m.num_visual_tokens, 64)
    f = torch.zeros(m.vision.num_patches, m.vision.hidden_size)
    batch = collate([
        {"index": 0, "short": "a", "long": "a long one", "features": f},
        {"index": 1, "short": "", "long": "only long", "features": f},
        {"index": 2, "short": "only short", "long": "", "features": f},
    ])
    assert batch["ntp_rows"].tolist() == [0, 1] and batch["input_ids"].shape[0] == 2
    assert batch["emb_rows"].tolist() == [0, 2] and batch["captions"] == ["a", "only short"]
    assert batch["features"].shape[0] == 3


def test_soft_prompts_start_at_the_handcrafted_prompt_and_change_the_embedding(tiny_cfg):
    plain = VLM.build(tiny_cfg("align", "embedding.centre=false"))
    soft = VLM.build(tiny_cfg("align", "embedding.centre=false", "embedding.soft_prompts=true"))
    soft.projector.load_state_dict(plain.projector.state_dict())
    feats, texts = _feats(plain), ["a red circle", "two blue squares above a green star"]
    assert torch.allclose(soft.embed_images(feats), plain.embed_images(feats), atol=1e-5)
    assert torch.allclose(soft.embed_texts(texts), plain.embed_texts(texts), atol=1e-5)
    with torch.no_grad():
        soft.image_soft.vectors.add_(0.5 * torch.randn_like(soft.image_soft.vectors))
        soft.text_soft.vectors.add_(0.5 * torch.randn_like(soft.text_soft.vectors))
    assert not torch.allclose(soft.embed_images(feats), plain.embed_images(feats), atol=1e-3)
    assert not torch.allclose(soft.embed_texts(texts), plain.embed_texts(texts), atol=1e-3)


def test_soft_prompts_get_gradients_while_the_frozen_llm_does_not(tiny_cfg):
    model = VLM.build(tiny_cfg("align-clip", "embedding.centre=false", "embedding.soft_prompts=true"))
    apply_recipe(model, RECIPES.get("align-clip"))
    visual = model.visual_tokens(features=_feats(model, 2))
    img = model.finish_embedding(model.image_states(visual))
    txt = model.finish_embedding(model.text_states(["a red circle", "a blue square"]))
    (img @ txt.T).diagonal().sum().backward()
    assert model.image_soft.vectors.grad.abs().sum() > 0
    assert model.text_soft.vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_discriminative_trains_both_losses_and_reloads_to_identical_embeddings(tiny_cfg):
    cfg = tiny_cfg("discriminative", "train.max_steps=16", "train.lr=2e-2", "train.warmup_steps=1",
                   "data.train_file=val.jsonl", "train.log_every=2", "lora.target_modules=q_proj,v_proj",
                   "data.long_max_tokens=120", "train.batch_size=4")
    result = train(cfg)
    h = result.history
    assert h[-1]["clip_loss"] < h[0]["clip_loss"] and h[-1]["ntp_loss"] < h[0]["ntp_loss"]
    again = VLM.from_pretrained(result.checkpoint)
    model = result.model.eval()
    feats, texts = _feats(model), ["a red circle", "three green stars"]
    assert torch.allclose(again.embed_images(feats), model.embed_images(feats), atol=1e-6)
    assert torch.allclose(again.embed_texts(texts), model.embed_texts(texts), atol=1e-6)
    init = VLM.build(cfg)  # the handcrafted prompts, no adapters: training moved them
    assert not torch.allclose(init.image_soft.vectors, again.image_soft.vectors)


def test_projector_can_stay_frozen(tiny_cfg):
    model = VLM.build(tiny_cfg("discriminative", "projector.frozen=true"))
    trains = apply_recipe(model, RECIPES.get("discriminative"))
    assert "projector" not in trains
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert model.text_soft.vectors.requires_grad and any(p.requires_grad for p in model.llm.parameters())


def _long_caption_batch(model: VLM, prompted: bool) -> dict:
    from vlmalign.train.datasets import short_long_collator

    cfg = dataclasses.replace(model.cfg, data=dataclasses.replace(model.cfg.data, long_caption_prompted=prompted))
    collate = short_long_collator(model, cfg)
    f = _feats(model, 2)
    return collate([{"index": 0, "short": "a red circle", "long": "a long caption about a red circle", "features": f[0]},
                    {"index": 1, "short": "a blue star", "long": "a blue star above two squares", "features": f[1]}])


def test_long_captions_continue_the_image_embedding_prompt_with_its_soft_vectors(tiny_cfg):
    """`data.long_caption_prompted` (VladVA): the long caption follows the image embedding
    prompt, labels only on the caption, soft-prompt vectors where the template text is;
    the objective's next-token loss equals an HF forward of the same sequence, and the
    NTP loss alone trains the image soft prompt."""
    from tests.naive_step import naive_loss
    from vlmalign.objective import Objective

    model = VLM.build(tiny_cfg("discriminative", "embedding.centre=false", "lora.enabled=false",
                               "objective.contrastive=none"))
    apply_recipe(model, RECIPES.get("discriminative"))
    t = model.image_template
    batch = _long_caption_batch(model, prompted=True)
    prompt_len = len(t.head) + len(t.before) + model.num_visual_tokens + len(t.after) + len(t.tail)
    assert batch["input_ids"][0, :len(t.head) + len(t.before)].tolist() == [*t.head, *t.before]
    assert (batch["labels"][:, :prompt_len] == -100).all() and (batch["labels"][:, prompt_len] != -100).all()
    assert batch["soft_mask"].sum(dim=1).tolist() == [len(t.before) + len(t.after)] * 2
    plain = _long_caption_batch(model, prompted=False)
    assert "soft_mask" not in plain and plain["input_ids"].shape[1] < batch["input_ids"].shape[1]

    objective = Objective(model.cfg.objective)
    loss, parts = objective(model, batch)
    ref, ref_parts = naive_loss(model, objective, batch)
    assert torch.allclose(parts["ntp_loss"], ref_parts["ntp_loss"], atol=1e-5)
    loss.backward()
    assert model.image_soft.vectors.grad is not None and model.image_soft.vectors.grad.abs().sum() > 0
    model.image_soft.vectors.grad = None
    with torch.no_grad():  # the soft vectors, not the template's token embeddings, are in the sequence
        model.image_soft.vectors.add_(0.5)
    moved, _ = objective(model, batch)
    assert not torch.allclose(moved, loss, atol=1e-4)


def test_text_state_cache_keeps_states_per_text_prompt(tiny_cfg):
    """A cache shared by models with different text prompts never serves another prompt's
    state."""
    from vlmalign.cache import TextStateCache

    a = VLM.build(tiny_cfg("align-clip", "embedding.centre=false"))
    b = VLM.build(tiny_cfg("align-clip", "embedding.centre=false", "embedding.text_prompt=<sent>\nIn one word:"))
    b.load_state_dict(a.state_dict(), strict=False)
    cache, texts = TextStateCache(), ["a red circle", "two blue squares"]
    got_a, got_b = cache.states(a, texts), cache.states(b, texts)
    assert torch.allclose(got_a, a.text_states(texts), atol=1e-5)
    assert torch.allclose(got_b, b.text_states(texts), atol=1e-5)
    assert not torch.allclose(got_a, got_b, atol=1e-3) and len(cache) == 4
