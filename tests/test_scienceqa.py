"""ScienceQA-style multiple choice: the shapes file loader with counted skips, the real
ScienceQA layout (IMG subset, image paths, subjects), and the one prompt format shared by
training files and evaluation."""

import json

import pytest

from vlmalign.data.conversations import encode_conversation, load_conversations
from vlmalign.data.sample import LoadReport
from vlmalign.data.scienceqa import (
    MCQItem,
    load_mcq_json,
    load_scienceqa,
    mcq_prompt,
    mcq_to_conversation,
    write_mcq_conversations,
)


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_shapes_mcq_file_loads_every_record(shapes_root):
    records = json.loads((shapes_root / "mcq_test.json").read_text())
    report = LoadReport()
    items = load_mcq_json(shapes_root / "mcq_test.json", report=report)
    assert len(items) == len(records) == report.loaded > 0
    assert report.total_skipped() == 0
    first, rec = items[0], records[0]
    assert first.id == rec["id"] and first.choices == rec["choices"] and first.answer == rec["answer"]
    assert first.category == rec["category"] and first.image == (shapes_root / rec["image"]).resolve()
    assert first.answer_letter == "ABCD"[rec["answer"]]


def test_bad_records_are_skipped_and_counted(tmp_path):
    _png(tmp_path / "img.png")
    good = {"id": "ok", "question": "What colour?", "choices": ["red", "blue"], "answer": 1, "image": "img.png"}
    records = [
        good,
        {**good, "id": "text-only", "image": None},
        {"id": "a", "choices": ["x", "y"], "answer": 0},  # missing question
        {**good, "id": "b", "choices": "red, blue"},  # wrong type
        {**good, "id": "c", "answer": 2},  # out of range
        {**good, "id": "d", "answer": -1},  # out of range
        {**good, "id": "e", "answer": True},  # bool is not an index
        {**good, "id": "f", "choices": ["red"], "answer": 0},  # too few
        {**good, "id": "g", "image": "nope.png"},  # missing image
        {**good, "id": "h", "choices": ["red", "red "]},  # duplicate options (exact, after stripping)
        {**good, "id": "i", "choices": ["red", ""]},  # empty option
        {**good, "id": "j", "question": "  "},  # empty question
        {**good, "id": "k", "hint": 3},  # wrong type of an optional field
        {**good},  # an exact duplicate record
        {**good, "question": "Which colour?"},  # same id, other content: kept, renamed
        {**good, "id": "l", "image": "../outside.png"},  # leaves the data root
        "not an object",
    ]
    path = tmp_path / "mcq.json"
    path.write_text(json.dumps(records))
    report = LoadReport()
    items = load_mcq_json(path, report=report)
    assert [it.id for it in items] == ["ok", "text-only", "ok#2"]
    assert items[1].image is None and items[0].choices == ["red", "blue"]
    assert items[2].question == "Which colour?" and report.repaired == {"duplicate_id": 1}
    assert report.skipped == {
        "missing_key": 1, "wrong_type": 3, "answer_out_of_range": 2, "too_few_choices": 1,
        "missing_image": 1, "duplicate_choices": 1, "empty_choice": 1, "empty_question": 1,
        "duplicate_record": 1, "outside_root": 1, "not_an_object": 1,
    }
    assert report.loaded == 3 and report.total_skipped() == len(records) - 3


def test_mcq_file_that_is_not_a_list_raises(tmp_path):
    path = tmp_path / "mcq.json"
    path.write_text('{"question": "x"}')
    with pytest.raises(ValueError, match="is a list"):
        load_mcq_json(path)
    with pytest.raises(FileNotFoundError):
        load_mcq_json(tmp_path / "absent.json")


def _problem(**kw):
    base = {
        "question": "Which is a mammal?", "choices": ["frog", "whale", "trout"], "answer": 1,
        "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade3",
        "subject": "natural science", "topic": "biology", "category": "Classification",
        "skill": "Identify mammals", "lecture": "Mammals have fur.", "solution": "A whale.", "split": "test",
    }
    return base | kw


def test_scienceqa_layout_img_subset_and_subjects(tmp_path):
    problems = {
        "1": _problem(hint="Look at the picture."),
        "2": _problem(image=None, subject="language science"),  # text-only
        "3": _problem(),  # image file absent
        "4": _problem(answer=7),
        "5": _problem(split="val", subject="social science"),  # a minival pid: image under val/
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "9"], "minival": ["5"]}))
    img_root = tmp_path / "images"
    _png(img_root / "test" / "1" / "image.png")
    _png(img_root / "val" / "5" / "image.png")

    report = LoadReport()
    items = load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", "test", report=report)
    assert [it.id for it in items] == ["1"]  # IMG subset; text-only 2 left out by design
    it = items[0]
    assert it.image == img_root / "test" / "1" / "image.png"
    assert it.category == it.subject == "natural science" and it.grade == "grade3"
    assert it.hint == "Look at the picture." and it.lecture == "Mammals have fur."
    assert it.meta["topic"] == "biology" and it.meta["category"] == "Classification"
    assert report.skipped == {"missing_image": 1, "answer_out_of_range": 1, "unknown_pid": 1}

    all_items = load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", "test", img_only=False)
    assert [i.id for i in all_items] == ["1", "2"] and all_items[1].image is None
    assert all_items[1].category == "language science"

    mini = load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", "minival")
    assert mini[0].image == img_root / "val" / "5" / "image.png"

    with pytest.raises(ValueError, match="known: test, minival"):
        load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", "dev")


def test_prompt_format_llava_scienceqa_style():
    item = MCQItem(id="x", question="What colour is the star? ", choices=["blue", "green"], answer=1)
    assert mcq_prompt(item) == (
        "What colour is the star?\nOptions: (A) blue (B) green\n"
        "Answer with the option's letter from the given choices directly."
    )
    item.hint = "The star is small."
    assert mcq_prompt(item).startswith("Context: The star is small.\nWhat colour is the star?\nOptions: (A) blue")


def test_conversation_teaches_the_letter_and_round_trips(tmp_path, tiny_model):
    img = _png(tmp_path / "images" / "a.png")
    items = [
        MCQItem(id="a", question="What colour?", choices=["red", "green", "blue"], answer=2, image=img),
        MCQItem(id="b", question="Is it text?", choices=["yes", "no"], answer=0),
    ]
    rec = mcq_to_conversation(items[0])
    assert rec["conversations"][0]["value"] == "<image>\n" + mcq_prompt(items[0])
    assert rec["conversations"][1] == {"from": "gpt", "value": "C"}
    path = write_mcq_conversations(items, tmp_path / "mcq_train_conv.json")
    raw = json.loads(path.read_text())
    assert raw[0]["image"] == "images/a.png" and "image" not in raw[1]  # relative, portable

    convs = load_conversations(path)
    assert [c.id for c in convs] == ["a", "b"] and convs[0].image == img.resolve() and convs[1].image is None
    m = tiny_model
    enc = encode_conversation(convs[0], m.tokenizer, m.image_token_id, m.num_visual_tokens, 512)
    trained = [t for t in enc.labels if t != -100]
    assert m.tokenizer.decode(trained) == "C<|im_end|>"
