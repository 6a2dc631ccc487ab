"""Multiple-choice evaluation: answer parsing, likelihood scoring against a naive full-vocab
HF forward, a model taught one answer picks it both ways, generation parsing with a stub,
per-category metrics, features computed once per image."""

from pathlib import Path

import pytest
import torch

from vlmalign.data.conversations import encode_conversation, load_conversations
from vlmalign.data.scienceqa import MCQItem, load_mcq_json, write_mcq_conversations
from vlmalign.eval import mcq
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.prompts import expand_image_tokens
from vlmalign.objective import next_token_part

COLOURS = ["red", "green", "blue", "dark red"]

PARSE_CASES = [
    # (text, choices, expected)
    ("A", COLOURS, 0),
    ("(B)", COLOURS, 1),
    ("C.", COLOURS, 2),
    ("d", COLOURS, 3),
    (" (c) ", COLOURS, 2),
    ("The answer is A", COLOURS, 0),
    ("The answer is B.", COLOURS, 1),
    ("Answer: (b)", COLOURS, 1),
    ("answer: c", COLOURS, 2),
    ("The correct option is D because it is red.", COLOURS, 3),
    ("(B) green", COLOURS, 1),
    ("B. green", COLOURS, 1),
    ("C) blue", COLOURS, 2),
    ("green", COLOURS, 1),
    ("Green.", COLOURS, 1),
    ("It is blue.", COLOURS, 2),
    ("The star is dark red.", COLOURS, 3),  # the longer option that contains "red" wins
    ("dark", COLOURS, 3),  # contained in exactly one option
    ("There are two objects.", ["1", "2", "3"], 1),  # number words read as digits
    ("3", ["1", "2", "3"], 2),
    ("No.", ["yes", "no"], 1),
    # cannot tell
    ("", COLOURS, None),
    ("   ", COLOURS, None),
    ("E", COLOURS, None),  # only four options
    ("The answer is F", COLOURS, None),
    ("red or blue", COLOURS, None),  # two options named
    ("The answer is A or B", COLOURS, None),
    ("(A) or (C)", COLOURS, None),
    ("purple", COLOURS, None),
    ("I am not sure.", COLOURS, None),
    ("the answer is a circle", ["square", "star"], None),  # "a" is an article here
]


@pytest.mark.parametrize(("text", "choices", "expected"), PARSE_CASES)
def test_parse_answer(text, choices, expected):
    assert mcq.parse_answer(text, choices) == expected


def test_parse_answer_a_circle_is_the_option_text():
    assert mcq.parse_answer("A circle.", ["square", "star", "circle"]) == 2
    assert mcq.parse_answer("the answer is a circle", ["square", "star", "circle"]) == 2


def _items(root):
    items = load_mcq_json(root / "mcq_test.json")
    items = [items[0], items[1], items[3]]  # two questions about one image, one about another
    text_only = mcq.MCQItem(id="t", question="Is the sky blue?", choices=["yes", "no", "maybe"], answer=0,
                            hint="Think about a clear day.")
    return items[:2] + [text_only] + items[2:]


def _naive_scores(model, item, features, continuation):
    """Full-sequence HF forward, full-vocab log-softmax, mean over the continuation."""
    tok = model.tokenizer
    prompt = mcq.render_mcq_prompt(tok, item)
    visual = None
    if item.image is not None:
        visual = model.visual_tokens(features=features[str(item.image)][None])
    out = []
    for k in range(len(item.choices)):
        full = tok(prompt + mcq.continuation_text(item, k, continuation), add_special_tokens=False).input_ids
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        assert full[:n_prompt] == tok(prompt, add_special_tokens=False).input_ids
        if visual is not None:
            full = expand_image_tokens(full, model.image_token_id, model.num_visual_tokens)
            n_prompt += model.num_visual_tokens - 1
        ids = torch.tensor([full])
        embeds = model.splice(ids, visual) if visual is not None else model.input_embeddings(ids)
        logp = model.llm(inputs_embeds=embeds).logits[0].log_softmax(-1)  # [T, V]
        pos = torch.arange(n_prompt, len(full))
        out.append(logp[pos - 1, ids[0, pos]].mean())
    return torch.stack(out)


@pytest.mark.parametrize("continuation", ["letter", "text", "letter_text"])
def test_likelihood_matches_naive_full_forward(tiny_model, shapes_root, continuation):
    m = tiny_model
    items = _items(shapes_root)
    feats = mcq.mcq_image_features(m, items)
    with torch.no_grad():
        ref = [_naive_scores(m, it, feats, continuation) for it in items]
    ours = mcq.choice_scores(m, items, feats, continuation=continuation, batch_size=3)  # mixed lengths, text-only
    for r, o in zip(ref, ours, strict=True):
        assert torch.allclose(r, o, atol=1e-5), (r, o)
    # options differ in score (the test is not vacuous) and batching does not matter
    assert all(float(o.max() - o.min()) > 1e-4 for o in ours)
    single = mcq.choice_scores(m, items, feats, continuation=continuation, batch_size=1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(single, ours, strict=True))


def test_model_taught_one_answer_picks_it(tiny_model, shapes_root, tmp_path):
    """A few steps on the training conversation of one item (its MCQ file written by
    write_mcq_conversations) make both evaluations pick its answer: the training and
    evaluation prompt formats agree."""
    m = tiny_model
    items = load_mcq_json(shapes_root / "mcq_test.json")
    feats = mcq.mcq_image_features(m, items)
    before = mcq.score_choices_likelihood(m, items, feats)
    item = next(it for it, p in zip(items, before, strict=True) if p != it.answer)
    path = write_mcq_conversations([item], tmp_path / "one.json")
    conv = load_conversations(path, allow_outside_root=True)[0]
    enc = encode_conversation(conv, m.tokenizer, m.image_token_id, m.num_visual_tokens, 512)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    m.llm.requires_grad_(True)
    params = [*m.llm.parameters(), *m.projector.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    m.train()
    torch.manual_seed(0)
    for _ in range(30):
        visual = m.visual_tokens(features=feats[str(item.image)][None])
        loss = next_token_part(m, ids, torch.ones_like(ids), labels, visual)[0]["ntp_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 1.0  # from ~6.1
    assert mcq.score_choices_likelihood(m, [item], feats) == [item.answer]
    preds, texts = mcq.answer_by_generation(m, [item], feats, max_new_tokens=4)
    assert texts == [item.answer_letter] and preds == [item.answer]  # stopped at <|im_end|>
    assert m.generate(features=feats[str(item.image)][None], prompt=mcq.render_mcq_prompt(m.tokenizer, item),
                      max_new_tokens=4) == texts
    assert m.training  # evaluation restores the mode it found


def test_batched_greedy_matches_model_generate(tiny_model, shapes_root):
    m = tiny_model
    tok = m.tokenizer
    quiet = [i for i in range(m.llm.config.vocab_size) if not tok.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # silence special and whitespace tokens (tied head): the random model writes text
        m.llm.get_input_embeddings().weight[quiet] = 0.0
    items = [it for it in _items(shapes_root) if it.image is not None]  # model.generate needs an image
    feats = mcq.mcq_image_features(m, items)
    ours = mcq.generate_answers(m, items, feats, max_new_tokens=6, batch_size=3)
    ref = [m.generate(features=feats[str(it.image)][None], prompt=mcq.render_mcq_prompt(m.tokenizer, it),
                      max_new_tokens=6)[0] for it in items]
    assert ours == ref and any(ours)
    text_only = [it for it in _items(shapes_root) if it.image is None]
    assert mcq.generate_answers(m, text_only + items[:1], feats, max_new_tokens=6)[1] == ours[0]


def test_generation_parsing_end_to_end_with_stub(tiny_model, monkeypatch):
    m = tiny_model
    feat = torch.randn(m.vision.num_patches, m.vision.hidden_size)
    items = [MCQItem(id=str(k), question=f"Q{k}?", choices=["red", "green", "blue"], answer=k % 3,
                     image=Path(f"/img/{k % 2}.png"), category=("colour" if k < 4 else "count")) for k in range(6)]
    replies = {"0": "The answer is A", "1": "(B) green", "2": "blue", "3": "I cannot see it",
               "4": "C", "5": "red or blue"}

    def fake_generate(model, pp, max_new_tokens):
        assert max_new_tokens == 8
        return [next(replies[k] for k in replies if f"Q{k}?" in prompt) for prompt in pp.prompts]

    monkeypatch.setattr(mcq, "_batch_generate", fake_generate)
    feats = {"/img/0.png": feat, "/img/1.png": feat}
    metrics = mcq.evaluate_mcq(m, items, features=feats)
    # right: 0, 1, 2 (colour); wrong: 3 (unparsed), 4 (C for B), 5 (ambiguous, unparsed)
    assert metrics["mcq_gen_acc"] == pytest.approx(50.0)
    assert metrics["mcq_gen_acc_colour"] == pytest.approx(75.0)
    assert metrics["mcq_gen_acc_count"] == pytest.approx(0.0)
    assert metrics["mcq_gen_unparsed"] == pytest.approx(100 * 2 / 6)
    assert metrics["mcq_items"] == 6 and metrics["mcq_chance"] == pytest.approx(100 / 3)
    assert {"mcq_lik_acc", "mcq_lik_acc_colour", "mcq_lik_acc_count"} <= metrics.keys()


def test_accuracy_ties_and_categories():
    items = [MCQItem(id=str(k), question="q", choices=["a", "b"], answer=k % 2, category=c)
             for k, c in enumerate(["natural science", "natural science", "social science", "social science"])]
    acc = mcq.mcq_accuracy(items, [0, 0, 0, None], "mcq_lik")
    assert acc == {"mcq_lik_acc": 50.0, "mcq_lik_acc_natural_science": 50.0, "mcq_lik_acc_social_science": 50.0}
    assert mcq._argmax_no_tie(torch.tensor([0.5, 0.5, 0.1])) is None
    assert mcq._argmax_no_tie(torch.tensor([0.1, 0.5, 0.2])) == 1


def test_one_prompt_pass_gives_the_scores_and_answers_of_two(tiny_model, shapes_root, monkeypatch):
    m = tiny_model
    items = _items(shapes_root)
    feats = mcq.mcq_image_features(m, items)
    passes = []
    real = mcq._PromptPass
    monkeypatch.setattr(mcq, "_PromptPass", lambda *a: passes.append(1) or real(*a))
    for continuation in ("letter", "text"):
        passes.clear()
        scores, texts = mcq.scores_and_answers(m, items, feats, continuation, max_new_tokens=5, batch_size=3)
        shared = len(passes)
        ref_scores = mcq.choice_scores(m, items, feats, continuation, batch_size=3)
        ref_texts = mcq.generate_answers(m, items, feats, max_new_tokens=5, batch_size=3)
        assert len(passes) == 3 * shared  # one pass per batch instead of two
        assert texts == ref_texts
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(scores, ref_scores, strict=True))


def test_shared_head_stops_before_the_image_and_the_first_difference():
    img = 9
    assert mcq.shared_head([[1, 2, 3, img, 5], [1, 2, 3, img, 6, 7]], img) == 3  # up to the image
    assert mcq.shared_head([[1, 2, 3, 4], [1, 2, 8, 4]], img) == 2  # up to the first difference
    assert mcq.shared_head([[1, 2], [1, 2, 3]], img) == 1  # a row keeps one token of its own
    assert mcq.shared_head([[img, 1], [img, 2]], img) == 0
    assert mcq.shared_head([[1, 2, 3, 4]], img) == 3


def test_prompt_pass_runs_the_shared_chat_head_once(tiny_model, shapes_root, monkeypatch):
    """The tokens every prompt of a batch shares (the chat template's system turn and user
    header) run once as a batch of one; the rows run only what follows (the scores equal
    a naive full forward: test_likelihood_matches_naive_full_forward)."""
    m = tiny_model
    items = _items(shapes_root)
    feats = mcq.mcq_image_features(m, items)
    prompt = mcq.render_mcq_prompt(m.tokenizer, items[0])
    head = len(m.tokenizer(prompt[: prompt.index(IMAGE_TOKEN)], add_special_tokens=False).input_ids)
    assert head > 0  # the user header (and a system turn where the template has one)
    shapes = []
    decoder = m.llm.get_decoder()
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: shapes.append(tuple(kw["inputs_embeds"].shape[:2])) or real(**kw))
    pp = mcq._PromptPass(m, items[:3], feats, True, None)
    rows = max(len(r) + (m.num_visual_tokens - 1) * (it.image is not None) for r, it in zip(pp.raw, items, strict=False))
    assert shapes == [(1, head), (3, rows - head)]
    assert pp.cache.get_seq_length() == rows and pp.mask.shape == (3, rows)


def test_features_once_per_distinct_image(tiny_model, shapes_root, monkeypatch):
    m = tiny_model
    base = list({it.image: it for it in load_mcq_json(shapes_root / "mcq_test.json")}.values())[:3]
    items = base + [MCQItem(id=f"{it.id}-again", question="Again?", choices=it.choices, answer=it.answer,
                            image=it.image) for it in base]
    rows = []
    real = m.tower_features
    monkeypatch.setattr(m, "tower_features", lambda px: rows.append(px.shape[0]) or real(px))
    feats = mcq.mcq_image_features(m, items)
    assert sum(rows) == 3 and len(feats) == 3


def test_unknown_continuation_is_rejected(tiny_model, shapes_root):
    items = load_mcq_json(shapes_root / "mcq_test.json")[:1]
    with pytest.raises(ValueError, match="letter, text, letter_text"):
        mcq.choice_scores(tiny_model, items, continuation="word")


@pytest.mark.slow
def test_scoring_and_batched_greedy_match_references_on_smollm2(shapes_root):
    """The cached-prompt scoring and the batched greedy decoder on the packaged SmolLM2
    (GQA, its real chat template with a system prompt) against the naive forward and
    VLM.generate."""
    from vlmalign.config import load_config
    from vlmalign.models.vlm import VLM
    from vlmalign.paths import recipe_config

    m = VLM.build(load_config(recipe_config("align"), [f"data.root={shapes_root}"]))
    items = load_mcq_json(shapes_root / "mcq_test.json")[:2]
    feats = mcq.mcq_image_features(m, items)
    with torch.no_grad():
        ref = [_naive_scores(m, it, feats, "letter_text") for it in items]
    ours = mcq.choice_scores(m, items, feats, continuation="letter_text", batch_size=2)
    assert all(torch.allclose(r, o, atol=1e-4) for r, o in zip(ref, ours, strict=True))
    texts = mcq.generate_answers(m, items, feats, max_new_tokens=4, batch_size=2)
    assert texts == [m.generate(features=feats[str(it.image)][None], prompt=mcq.render_mcq_prompt(m.tokenizer, it),
                                max_new_tokens=4)[0] for it in items]


def test_evaluate_mcq_file_counts_loader_skips(tiny_model, shapes_root, tmp_path):
    import json

    records = json.loads((shapes_root / "mcq_test.json").read_text())[:3]
    for r in records:
        r["image"] = str(shapes_root / r["image"])
    bad = {**records[0], "id": "bad", "answer": 9}
    path = tmp_path / "mcq.json"
    path.write_text(json.dumps([*records, bad]))
    metrics = mcq.evaluate_mcq_file(tiny_model, path, allow_outside_root=True, generation=False)
    assert metrics["mcq_items"] == 3 and metrics["mcq_skipped"] == 1
    assert "mcq_gen_acc" not in metrics and 0 <= metrics["mcq_lik_acc"] <= 100
