"""One LLM pass serves the image embedding and the next-token loss ("prompted" captions):
the state before the caption is the prompted image state, the loss is the full-sequence
loss, and accumulation stays exact with the shared pass."""

import torch
from accelerate import Accelerator

from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective, next_token_part
from vlmalign.train.datasets import TrainData, build_trainset
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.step import accumulate_gradients
from vlmalign.train.trainer import TrainStep

CAPTIONS = ["a red circle", "a large blue square left of a small green star", "two objects", "a star"]


def _prompted_batch(model: VLM) -> dict:
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens,
                              prompt=model.caption_prompt("prompted"))
    return collate([{"index": i, "caption": c} for i, c in enumerate(CAPTIONS)])


def test_prompted_sequence_is_the_image_prompt_then_the_caption(tiny_model):
    m = tiny_model
    b = _prompted_batch(m)
    prompt_ids, _ = m.image_template.ids([m.image_token_id] * m.num_visual_tokens)
    n = len(prompt_ids)
    assert b["prompt_state_at"] == n - 1
    assert torch.equal(b["input_ids"][:, :n], torch.tensor(prompt_ids).expand(len(CAPTIONS), -1))
    assert torch.all(b["labels"][:, :n] == IGNORE_INDEX)
    first = m.tokenizer(CAPTIONS[0], add_special_tokens=False).input_ids
    assert b["labels"][0, n : n + len(first)].tolist() == first
    assert m.caption_prompt("plain") is None and m.caption_prompt() is None  # the config default


def test_shared_pass_state_equals_image_states_and_loss_equals_a_full_pass(tiny_model):
    m = tiny_model
    b = _prompted_batch(m)
    torch.manual_seed(0)
    visual = torch.randn(len(CAPTIONS), m.num_visual_tokens, m.hidden_size)
    out, state = next_token_part(m, b["input_ids"], b["attention_mask"], b["labels"], visual,
                                 state_at=b["prompt_state_at"])
    separate = m.image_states(visual)
    assert torch.allclose(state, separate, atol=1e-5)
    # The check can fail: the position before it holds another state.
    _, wrong = next_token_part(m, b["input_ids"], b["attention_mask"], b["labels"], visual,
                               state_at=b["prompt_state_at"] - 1)
    assert not torch.allclose(wrong, separate, atol=1e-3)
    # The loss equals HF's full-vocabulary loss on the whole sequence (prefix not cached).
    embeds = m.splice(b["input_ids"], visual)
    hf = m.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert torch.allclose(out["ntp_loss"], hf, atol=1e-5)
    assert int(out["ntp_tokens"]) == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_objective_uses_one_pass_for_both_losses(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("align-clip")
    m = VLM.build(cfg)
    apply_recipe(m, RECIPES.get("align-clip"))
    m.set_embedding_mean(torch.zeros(1, m.hidden_size))
    objective = Objective(cfg.objective)
    b = _prompted_batch(m)
    b["features"] = torch.randn(len(CAPTIONS), m.vision.num_patches, m.vision.hidden_size)
    shared_loss, shared_parts = objective(m, b)
    calls = []
    monkeypatch.setattr(m, "image_states", lambda v: calls.append(1) or VLM.image_states(m, v))
    objective(m, b)
    assert calls == []  # no separate embedding pass
    b.pop("prompt_state_at")
    sep_loss, sep_parts = objective(m, b)
    assert calls == [1]
    assert torch.allclose(shared_loss, sep_loss, atol=1e-5)
    assert abs(float(shared_parts["clip_loss"].detach()) - float(sep_parts["clip_loss"].detach())) < 1e-5


def _grads(cfg, micro: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = VLM.build(cfg)
    apply_recipe(model, RECIPES.get(cfg.recipe))
    objective = Objective(cfg.objective)
    data = TrainData.prepare(model, cfg, "captions")
    ts = build_trainset(model, objective, data, cfg)
    ts.collator.prompt = model.caption_prompt("prompted")
    items = [ts.dataset[i] for i in range(8)]
    batches = [ts.collator(items[i : i + micro]) for i in range(0, 8, micro)]
    assert all("prompt_state_at" in b for b in batches)
    step = TrainStep(model, objective)
    accumulate_gradients(Accelerator(cpu=True), step, objective, batches)
    return {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}


def test_accumulation_stays_exact_with_the_shared_pass(tiny_cfg):
    cfg = tiny_cfg("align-clip", "train.group_by_length=false")
    full, acc = _grads(cfg, 8), _grads(cfg, 4)
    assert set(full) == set(acc) and full
    for name, g in full.items():
        assert torch.allclose(acc[name], g, atol=1e-5, rtol=1e-4), (name, (acc[name] - g).abs().max())


def test_shared_pass_with_soft_prompts_equals_separate_passes(tiny_cfg, monkeypatch):
    """With learned image prompt vectors the prompted caption carries them (`soft_mask`), so
    the shared pass gives the separate passes' losses and gradients, the soft vectors'
    included; without them in the caption the state would differ."""
    cfg = tiny_cfg("align-clip", "embedding.soft_prompts=true")
    torch.manual_seed(0)
    m = VLM.build(cfg)
    apply_recipe(m, RECIPES.get("align-clip"))
    m.set_embedding_mean(torch.zeros(1, m.hidden_size))
    objective = Objective(cfg.objective)
    b = _prompted_batch(m)
    assert b["soft_mask"].any()
    b["features"] = torch.randn(len(CAPTIONS), m.vision.num_patches, m.vision.hidden_size)
    with torch.no_grad():  # move the learned vectors off the handcrafted prompt's embeddings
        m.image_soft.vectors.add_(0.5 * torch.randn_like(m.image_soft.vectors))

    def loss_and_grads(batch):
        m.zero_grad()
        loss, parts = objective(m, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return parts, grads

    assert objective.shared_state_at(m, b) is not None
    calls = []
    monkeypatch.setattr(m, "image_states", lambda v: calls.append(1) or VLM.image_states(m, v))
    shared, g_shared = loss_and_grads(b)
    assert calls == []
    separate, g_sep = loss_and_grads({k: v for k, v in b.items() if k != "prompt_state_at"})
    assert calls == [1]
    assert abs(float(shared["clip_loss"].detach()) - float(separate["clip_loss"].detach())) < 1e-5
    assert set(g_shared) == set(g_sep) and "image_soft.vectors" in g_shared
    for name, g in g_shared.items():
        assert torch.allclose(g, g_sep[name], atol=1e-5, rtol=1e-4), name
    # Without the soft vectors in the caption sequence the shared state is another one.
    wrong, _ = loss_and_grads(b | {"soft_mask": torch.zeros_like(b["soft_mask"])})
    assert abs(float(wrong["clip_loss"].detach()) - float(separate["clip_loss"].detach())) > 1e-4
