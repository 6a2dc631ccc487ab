"""Captioning evaluation: CIDEr / BLEU on hand-made cases, the clear error without
pycocoevalcap, references grouped by image, and generation end to end (stub and tiny model)."""

import math
import shutil
import sys

import pytest
import torch

from vlmalign.data.formats import load_captions_jsonl
from vlmalign.eval import captioning

REFS = {
    "1": ["a small red circle left of a large blue square"],
    "2": ["a large green star above a small yellow triangle"],
    "3": ["two purple squares on a grey background next to an orange star"],
}


def test_identical_captions_score_perfectly():
    pytest.importorskip("pycocoevalcap")
    s = captioning.caption_scores({k: v[0] for k, v in REFS.items()}, REFS, tokenizer="simple")
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6) and s["bleu1"] == pytest.approx(1.0, abs=1e-6)
    # every n-gram of every caption is unique to its image: cosine 1 for n = 1..4, times 10
    assert s["cider"] == pytest.approx(10.0, abs=1e-6)


def test_cider_per_image_averages_to_the_corpus_score_and_follows_each_image():
    pytest.importorskip("pycocoevalcap")
    preds = {"1": "a small red circle left of a large blue square",  # exact
             "2": "a large green star above a small red circle",  # half right
             "3": "the dog runs fast"}  # unrelated
    per = captioning.cider_per_image(preds, REFS, tokenizer="simple")
    corpus = captioning.caption_scores(preds, REFS, tokenizer="simple")["cider"]
    assert sum(per.values()) / len(per) == pytest.approx(corpus, abs=1e-9)
    assert per["1"] > per["2"] > per["3"] == 0.0  # each value belongs to its own id


def test_unrelated_captions_score_zero():
    pytest.importorskip("pycocoevalcap")
    preds = {"1": "the dog runs fast", "2": "ocean waves crash loudly", "3": "hello world today"}
    s = captioning.caption_scores(preds, REFS, tokenizer="simple")
    assert all(v < 1e-6 for v in s.values()), s


def test_bleu1_brevity_penalty_by_hand():
    pytest.importorskip("pycocoevalcap")
    refs = {"1": ["a small red circle left of a large blue square"]}  # 10 words
    s = captioning.caption_scores({"1": "a small red circle"}, refs, tokenizer="simple")
    # all 4 unigrams match; brevity penalty exp(1 - 10/4)
    assert s["bleu1"] == pytest.approx(math.exp(1 - 10 / 4), rel=1e-6)
    assert s["bleu4"] == pytest.approx(math.exp(1 - 10 / 4), rel=1e-6)  # 3-, 2-, 1-gram precisions all 1


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs java")
def test_ptb_tokenizer_drops_punctuation_and_case():
    pytest.importorskip("pycocoevalcap")
    preds = {k: v[0].upper() + "." for k, v in REFS.items()}
    s = captioning.caption_scores(preds, REFS, tokenizer="ptb")
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_simple_tokenizer():
    assert captioning.simple_tokenize("A red, circle's LEFT-of a Star.") == "a red circle's left of a star"


def test_ids_must_match():
    pytest.importorskip("pycocoevalcap")
    with pytest.raises(ValueError, match="only referenced: \\['3'\\]"):
        captioning.caption_scores({"1": "a", "2": "b"}, REFS, tokenizer="simple")


def _hide_pycocoevalcap(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import fails


def test_clear_error_without_pycocoevalcap(monkeypatch, tiny_model, shapes_root):
    _hide_pycocoevalcap(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'vlmalign\[caption\]'"):
        captioning.caption_scores({"1": "a"}, {"1": ["a"]})
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: pytest.fail("generated before checking the extra"))
    samples = load_captions_jsonl(shapes_root / "test.jsonl")
    with pytest.raises(ImportError, match="captioning metrics need pycocoevalcap"):
        captioning.evaluate_captioning(tiny_model, samples)


def test_ak_without_pycocoevalcap_says_how_to_install_before_training(monkeypatch, tmp_path, capsys):
    from vlmalign.cli import main

    _hide_pycocoevalcap(monkeypatch)
    assert main(["experiment", "--quick", "--out", str(tmp_path / "ak"), "ak", "llm.name=tiny",
                 "vision.tower=tiny"]) == 1
    assert "pip install 'vlmalign[caption]'" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "ak").exists()  # nothing trained, nothing written


def test_references_grouped_by_image(shapes_root):
    samples = load_captions_jsonl(shapes_root / "test.jsonl")[:2]
    twin = type(samples[0])(id="x", image=samples[0].image, caption="another caption", long_caption="long one")
    refs = captioning.references_by_image([*samples, twin, samples[1]], fields=("caption", "long_caption"))
    assert list(refs) == [str(samples[0].image), str(samples[1].image)]
    assert refs[str(samples[0].image)] == [samples[0].caption, samples[0].long_caption, "another caption", "long one"]


def test_evaluate_captioning_with_stub_generate(tiny_model, shapes_root, monkeypatch):
    pytest.importorskip("pycocoevalcap")
    m = tiny_model
    samples = load_captions_jsonl(shapes_root / "test.jsonl")[:4]
    by_row = {}
    feats = {str(s.image): torch.full((m.vision.num_patches, m.vision.hidden_size), float(i))
             for i, s in enumerate(samples)}
    for i, s in enumerate(samples):
        by_row[float(i)] = s.caption

    def fake_generate(features=None, prompt="", max_new_tokens=32, pixel_values=None):
        assert prompt == "" and max_new_tokens == 32
        return [by_row[float(f[0, 0])] + "\nsecond line" for f in features]

    monkeypatch.setattr(m, "generate", fake_generate)
    preds: dict[str, str] = {}
    out = captioning.evaluate_captioning(m, samples, features=feats, batch_size=3, tokenizer="simple",
                                         predictions=preds)
    assert out["caption_images"] == 4
    assert out["caption_bleu4"] == pytest.approx(1.0, abs=1e-6)  # first line only: the reference itself
    assert preds == {str(s.image): s.caption for s in samples}


def test_caption_images_tiny_model_batches_consistently(tiny_model, shapes_root):
    m = tiny_model
    samples = load_captions_jsonl(shapes_root / "test.jsonl")[:3]
    feats = captioning.features_by_image(m, [s.image for s in samples])
    stacked = torch.stack([feats[str(s.image)] for s in samples])
    a = captioning.caption_images(m, stacked, max_new_tokens=4, batch_size=3)
    b = captioning.caption_images(m, stacked, max_new_tokens=4, batch_size=1)
    assert len(a) == 3 and all(isinstance(t, str) for t in a) and a == b


def test_generate_shares_the_prompt_head_and_matches_a_greedy_loop_without_cache(tiny_model, monkeypatch):
    """A chat prompt's text before the image is computed once for the batch (its keys and
    values shared by every row); the tokens equal a greedy loop that reruns the whole
    sequence every step, and without a head nothing is cached."""
    from vlmalign.models import vlm as vlm_module

    m = tiny_model.eval()
    torch.manual_seed(0)
    feats = torch.randn(3, m.vision.num_patches, m.vision.hidden_size)
    prompt = captioning.caption_prompt(m.tokenizer)
    ids = m.tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.index(m.image_token_id) > 0  # the chat head comes first
    heads = []
    expand = vlm_module.PromptPrefix.expand
    monkeypatch.setattr(vlm_module.PromptPrefix, "expand", lambda self, *a: heads.append(len(self.ids)) or expand(self, *a))
    logits = []
    hf_generate = m.llm.generate

    def generate_keeping_logits(**kw):
        out = hf_generate(**kw, output_logits=True, return_dict_in_generate=True)
        logits.extend(out.logits)
        return out.sequences

    monkeypatch.setattr(m.llm, "generate", generate_keeping_logits)
    with torch.no_grad():
        got = m.generate(features=feats, prompt=prompt, max_new_tokens=6)
        assert heads == [ids.index(m.image_token_id)]
        seq = m.splice(torch.tensor(vlm_module.expand_image_tokens(ids, m.image_token_id, m.num_visual_tokens))
                       .expand(3, -1), m.visual_tokens(None, feats))
        new, want_logits = [], []
        for _ in range(6):
            want_logits.append(m.llm(inputs_embeds=seq).logits[:, -1])
            tok = want_logits[-1].argmax(-1)
            new.append(tok)
            seq = torch.cat([seq, m.input_embeddings(tok[:, None])], dim=1)
    assert len(logits) >= 1
    for a, b in zip(logits, want_logits, strict=False):  # every step's scores, not only the argmax
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tokens = torch.stack(new, 1)
    want = []
    for row in tokens.tolist():  # generate stops a row at its end-of-text token
        row = row[: row.index(m.tokenizer.eos_token_id) + 1] if m.tokenizer.eos_token_id in row else row
        want.append(m.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert got == want
    heads.clear()
    with torch.no_grad():
        m.generate(features=feats, prompt="", max_new_tokens=2)  # stage-1 captioning: the image comes first
    assert heads == []
