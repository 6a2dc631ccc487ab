"""LLaVA conversations: loader skips, label masks through the chat template, collation, check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmalign.data.collate import IGNORE_INDEX
from vlmalign.data.conversations import (
    Conversation,
    ConversationCollator,
    ConversationDataset,
    ConversationLoadReport,
    TemplateMismatchError,
    check_conversations,
    encode_conversation,
    encode_conversations,
    format_check,
    load_conversations,
)
from vlmalign.data.sample import LoadReport
from vlmalign.models.language import tiny_tokenizer

Q = 5  # visual tokens
IMAGE = Path("/nonexistent/img.png")  # encoding never opens the image

ONE_TURN = Conversation("one", IMAGE, [("user", "<image>\nWhat colour is the circle?"),
                                       ("assistant", "The circle is red.")])
TWO_TURNS = Conversation("two", IMAGE, [
    ("user", "<image>\nHow many objects are there?"),
    ("assistant", "There are two objects."),
    ("user", "Is there a red circle? a red circle"),
    ("assistant", "a red circle"),  # also in the user turn just before: must be labelled here only
])


@pytest.fixture(scope="module")
def tiny() -> tuple:
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok, tok.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def smollm() -> tuple:
    from transformers import AutoTokenizer

    from vlmalign.config import LLMConfig
    from vlmalign.models.language import cache_dir, load_llm

    path = cache_dir() / "smollm2-135m-instruct"
    if not (path / ".complete").exists():
        load_llm(LLMConfig(name="smollm2-135m"))  # converts the packaged GGUF once
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok, tok.convert_tokens_to_ids("<image>")


def _label_runs(tok, labels: list[int]) -> list[str]:
    """Decoded text of each contiguous run of labelled positions."""
    runs, cur = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            cur.append(label)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            cur = []
    return runs


def _assert_masks(tok, image_id: int, conv: Conversation, system: str | None = None) -> None:
    enc = encode_conversation(conv, tok, image_id, Q, 512, system_prompt=system)
    assert len(enc.input_ids) == len(enc.labels) and not enc.truncated
    answers = [text for role, text in conv.turns if role == "assistant"]
    assert _label_runs(tok, enc.labels) == [a + "<|im_end|>" for a in answers]
    image_at = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    assert len(image_at) == Q and image_at == list(range(image_at[0], image_at[0] + Q))
    assert all(enc.labels[i] == IGNORE_INDEX for i in image_at)
    # every labelled position lies after its turn's assistant header, and labels = ids there
    rendered = tok.decode(enc.input_ids[: min(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(enc.labels, enc.input_ids, strict=True))
    assert enc.missing_end_tokens == 0
    # the last assistant's labels start right after the last header, not in the user turn
    last_header = max(i for i in range(len(enc.input_ids)) if tok.decode(enc.input_ids[: i + 1]).endswith(
        "<|im_start|>assistant\n"))
    first_label_last_run = next(i for i in range(last_header + 1, len(enc.labels)) if enc.labels[i] != IGNORE_INDEX)
    assert first_label_last_run == last_header + 1


def test_single_and_multi_turn_masks_tiny(tiny) -> None:
    tok, image_id = tiny
    _assert_masks(tok, image_id, ONE_TURN)
    _assert_masks(tok, image_id, TWO_TURNS)
    # a system prompt is rendered but never labelled, even when it repeats the answer
    enc = encode_conversation(ONE_TURN, tok, image_id, Q, 512, system_prompt="The circle is red.")
    assert _label_runs(tok, enc.labels) == ["The circle is red.<|im_end|>"]
    assert tok.decode(enc.input_ids).count("The circle is red.") == 2
    # a default system prompt injected by the template (as SmolLM2's) holds the user text,
    # and the user turn holds the answer: the answer is still found in its own turn
    default_system = tiny_tokenizer()
    default_system.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nSay red.<|im_end|>\n' }}{% endif %}"
        + tok.chat_template
    )
    echo = Conversation("echo", None, [("user", "red"), ("assistant", "red")])
    enc = encode_conversation(echo, default_system, image_id, Q, 512)
    assert default_system.decode(enc.input_ids).startswith("<|im_start|>system\nSay red.")
    assert _label_runs(tok, enc.labels) == ["red<|im_end|>"]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    last_turn = max(i for i, t in enumerate(enc.input_ids) if t == start)
    assert min(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX) > last_turn


@pytest.mark.slow
def test_single_and_multi_turn_masks_smollm2(smollm) -> None:
    tok, image_id = smollm
    _assert_masks(tok, image_id, ONE_TURN)
    _assert_masks(tok, image_id, TWO_TURNS)
    enc = encode_conversation(TWO_TURNS, tok, image_id, Q, 512)
    text = tok.decode(enc.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system
    labelled = "".join(_label_runs(tok, enc.labels))
    assert "SmolLM" not in labelled and "How many" not in labelled and "user" not in labelled


def test_template_that_drops_content_raises(tiny) -> None:
    tok, image_id = tiny
    broken = tiny_tokenizer()
    broken.add_tokens(["<image>"], special_tokens=True)
    broken.chat_template = tok.chat_template.replace("message['content']", "message['content'][:6]")
    with pytest.raises(TemplateMismatchError, match="'two'.*assistant turn 1"):
        encode_conversation(TWO_TURNS, broken, image_id, Q, 512)
    no_image = tiny_tokenizer()  # <image> not a token: the marker is split into pieces
    with pytest.raises(TemplateMismatchError, match="expected 1 <image>"):
        encode_conversation(ONE_TURN, no_image, image_id, Q, 512)


def test_truncation_keeps_labels_or_skips_with_count(tiny) -> None:
    tok, image_id = tiny
    full = encode_conversation(TWO_TURNS, tok, image_id, Q, 512)
    first_label = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    cut = encode_conversation(TWO_TURNS, tok, image_id, Q, first_label + 2)
    assert cut.truncated and len(cut.input_ids) == first_label + 2
    assert cut.input_ids == full.input_ids[: first_label + 2] and cut.num_labels == 2
    empty = encode_conversation(TWO_TURNS, tok, image_id, Q, first_label)
    assert empty.truncated and empty.num_labels == 0
    short = Conversation("short", IMAGE, [("user", "<image>\nColour?"), ("assistant", "Red, the circle is red.")])
    short_full = encode_conversation(short, tok, image_id, Q, 512)
    limit = next(i for i, x in enumerate(short_full.labels) if x != IGNORE_INDEX) + 3
    assert limit <= first_label  # at `limit` tokens: 3 labels left for `short`, none for `two`
    report = LoadReport()
    kept = encode_conversations([short, TWO_TURNS], tok, image_id, Q, limit, report=report)
    assert [e.id for e in kept] == ["short"] and report.skipped == {"no_labels_after_truncation": 1}
    assert kept[0].num_labels == 3 and report.loaded == 1
    check = check_conversations([short, TWO_TURNS], tok, image_id, Q, limit)
    assert check.zero_label == ["two"] and check.truncated == ["short", "two"]
    assert "ZERO trained tokens" in format_check(check) and "two" in format_check(check)


def test_check_marks_trained_text_and_counts_share(tiny) -> None:
    tok, image_id = tiny
    check = check_conversations([ONE_TURN, TWO_TURNS], tok, image_id, Q, 512, show=1)
    encs = [encode_conversation(c, tok, image_id, Q, 512) for c in (ONE_TURN, TWO_TURNS)]
    assert check.trained_tokens == sum(e.num_labels for e in encs)
    assert check.total_tokens == sum(len(e.input_ids) for e in encs) and check.image_tokens == 2 * Q
    assert check.trained_share == pytest.approx(check.trained_tokens / check.total_tokens)
    assert check.zero_label == [] and check.mismatches == [] and len(check.shown) == 1
    marked = check.shown[0][1]
    assert "[[The circle is red.<|im_end|>]]" in marked and marked.count("[[") == 1
    assert f"<image x{Q}>" in marked and "What colour is the circle?" in marked
    assert "samples with zero trained tokens: none" in format_check(check)


def test_check_records_template_mismatch(tiny) -> None:
    _, image_id = tiny
    broken = tiny_tokenizer()
    broken.add_tokens(["<image>"], special_tokens=True)
    broken.chat_template = broken.chat_template.replace("message['content']", "message['content'] | upper")
    check = check_conversations([ONE_TURN], broken, image_id, Q, 512)
    assert [i for i, _ in check.mismatches] == ["one"] and "TEMPLATE MISMATCH one" in format_check(check)


def test_collator_pads_right_and_masks_padding(tiny) -> None:
    tok, image_id = tiny
    features = torch.randn(2, 7, 3)
    ds = ConversationDataset([ONE_TURN, TWO_TURNS], tok, image_id, Q, 512, features=features)
    batch = ConversationCollator(tok)([ds[0], ds[1]])
    lengths = [len(ds.encoded[0].input_ids), len(ds.encoded[1].input_ids)]
    t = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, t)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert torch.all(batch["input_ids"][short, min(lengths):] == tok.pad_token_id)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    assert batch["labels"][1].tolist() == ds.encoded[1].labels
    assert torch.equal(batch["features"], features) and batch["index"].tolist() == [0, 1]


def test_dataset_skips_text_only_and_label_less(tiny) -> None:
    tok, image_id = tiny
    text_only = Conversation("text", None, [("user", "Hi there"), ("assistant", "Hello.")])
    ds = ConversationDataset([text_only, ONE_TURN], tok, image_id, Q, 512, features=torch.zeros(2, 3, 4))
    assert len(ds) == 1 and ds[0]["index"] == 1 and ds.report.skipped == {"no_image": 1}
    ds = ConversationDataset([ONE_TURN], tok, image_id, Q, Q + 3, features=torch.zeros(1, 3, 4))
    assert len(ds) == 0 and ds.report.skipped == {"no_labels_after_truncation": 1}


# ---------------------------------------------------------------- loader


def _turns(*pairs: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(pairs)]


def test_loader_parses_and_counts_each_skip_reason(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"png")
    good = {"id": "ok", "image": "img.png", "conversations": _turns("<image>\nQ1 ", "A1\n", "Q2", "A2")}
    records = [
        good,
        {"id": 7, "image": "img.png", "conversations": _turns("Where? <image>", "There.")},  # marker at end: fine
        {"id": "fix", "image": "img.png", "conversations": _turns("No marker?", "Added.")},
        {"id": "txt", "conversations": _turns("Hello", "Hi.")},  # text only: kept, image None
        "just a string",
        {"id": "nokey", "image": "img.png"},
        {"id": "badtype", "image": "img.png", "conversations": "Q A"},
        {"id": "badvalue", "image": "img.png", "conversations": [{"from": "human", "value": 3}]},
        {"id": "role", "image": "img.png", "conversations": [{"from": "system", "value": "x"}, *_turns("<image>q", "a")]},
        {"id": "empty", "image": "img.png", "conversations": _turns("<image>q", "  ")},
        {"id": "noans", "image": "img.png", "conversations": _turns("<image>q")},
        {"id": "order", "image": "img.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "double", "image": "img.png", "conversations": [
            {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"id": "tail", "image": "img.png", "conversations": _turns("<image>q", "a", "q2")},
        {"id": "twice", "image": "img.png", "conversations": _turns("<image>q <image>", "a")},
        {"id": "late", "image": "img.png", "conversations": _turns("q", "a", "<image> q2", "b")},
        {"id": "orphan", "conversations": _turns("<image>\nq", "a")},
        {"id": "gone", "image": "missing.png", "conversations": _turns("<image>q", "a")},
        {"id": "multi", "image": ["img.png", "img.png"], "conversations": _turns("<image>q", "a")},
    ]
    path = tmp_path / "convs.json"
    path.write_text(json.dumps(records))
    report = ConversationLoadReport()
    convs = load_conversations(path, report=report)
    assert [c.id for c in convs] == ["ok", "7", "fix", "txt"] and report.loaded == 4
    assert report.skipped == {
        "not_an_object": 1, "missing_key": 1, "wrong_type": 3, "unknown_role": 1, "empty_value": 1,
        "no_assistant_turn": 1, "not_alternating": 2, "ends_with_user": 1, "multiple_image_markers": 1,
        "misplaced_image_marker": 1, "marker_without_image": 1, "missing_image": 1,
    }
    assert report.repaired == {"inserted_image_marker": 1} and "inserted_image_marker" in report.summary()
    ok = convs[0]
    assert ok.image == (tmp_path / "img.png").resolve()
    assert ok.turns == [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    assert convs[2].turns[0] == ("user", "<image>\nNo marker?")
    assert convs[3].image is None
    assert "convs.json:[5]" in report.as_dict()["examples"]["missing_key"][0]
    strict = LoadReport()
    load_conversations(path, report=strict, allow_text_only=False)
    assert strict.loaded == 3 and strict.skipped["no_image"] == 1


def test_loader_rejects_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"id": "a",\n  "image": "x.png" "conversations": []}\n]')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON.*line 3"):
        load_conversations(bad)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"id": "a"}')
    with pytest.raises(ValueError, match="is a list"):
        load_conversations(not_list)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "none.json")
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps({"id": "t", "conversations": _turns("q", "a")}) + "\n{oops\n\n")
    report = LoadReport()
    assert [c.id for c in load_conversations(lines, report=report)] == ["t"]
    assert report.skipped == {"malformed_json": 1}
