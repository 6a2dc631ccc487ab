"""Shapes instruction data: QA answers true for the scene, MCQ indices, determinism, files."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from vlmalign.data.conversations import ConversationLoadReport, load_conversations
from vlmalign.data.instruct import (
    HELDOUT_MCQ_PER_IMAGE,
    INSTRUCT_FILES,
    MCQ_CATEGORIES,
    ask,
    conversation_record,
    mcq_records,
    write_instruct_files,
)
from vlmalign.data.shapes import (
    COLOURS,
    SHAPES,
    Scene,
    ShapeObject,
    generate_shapes,
)
from vlmalign.data.shapes_writer import ensure_shapes, write_shapes


def obj(colour: str, shape: str, size: str, x0: int, y0: int, side: int) -> ShapeObject:
    return ShapeObject(colour, shape, size, x0 + side // 2, y0 + side // 2, (x0, y0, x0 + side, y0 + side))


# red circle large, top left; green circle small, top right; blue square small, bottom right
SCENE = Scene((obj("red", "circle", "large", 5, 5, 90), obj("green", "circle", "small", 170, 10, 45),
               obj("blue", "square", "small", 165, 165, 50)), "white", (248, 248, 248))


def _answers(category: str, tries: int = 60) -> dict[str, tuple[str, tuple[str, ...]]]:
    """question -> (answer, distractors) over many draws."""
    out = {}
    for s in range(tries):
        qa = ask(SCENE, category, random.Random(s))
        assert qa is not None and qa.category == category
        out[qa.question] = (qa.answer, qa.distractors)
    return out


def test_hand_built_scene_answers() -> None:
    for q, (a, wrong) in _answers("count", 200).items():
        # by hand: 3 objects; 2 circles, 1 square; one red, one green, one blue
        m = re.search(r"many (\w+) objects|many (circle|square|triangle|star)s are", q)
        if m is None:
            expected = 3
        elif m.group(1):
            expected = int(m.group(1) in ("red", "green", "blue"))
        else:
            expected = {"circle": 2, "square": 1}.get(m.group(2), 0)
        assert a == str(expected), q
        assert a not in wrong and len(wrong) >= 3, q
    colours = {re.search(r"(the (?:small |large )?\w+)\?", q).group(1): a for q, (a, _) in _answers("colour").items()}
    assert colours == {"the large circle": "red", "the small circle": "green", "the square": "blue"}
    shapes = {re.search(r"(the \w+ object)\?", q).group(1): a for q, (a, _) in _answers("shape").items()}
    assert shapes == {"the red object": "circle", "the green object": "circle", "the blue object": "square"}
    where = {re.search(r"(the \w+ \w+)(?: in the image)?\?", q).group(1): (a, w)
             for q, (a, w) in _answers("position").items()}
    assert {k: a for k, (a, _) in where.items()} == {
        "the red circle": "top left", "the green circle": "top right", "the blue square": "bottom right"}
    # the red circle (x 5..95) reaches the centre column, so no centre-column cell of its rows
    assert set(where["the red circle"][1]) == {"top right", "middle right", "bottom left", "bottom centre",
                                               "bottom right"}
    rel = {re.search(r"(the \w+ \w+ relative to the \w+ \w+)\?", q).group(1): (a, set(w))
           for q, (a, w) in _answers("relation", 200).items()}
    # green centre (192, 32) is above the red one (50, 50): "above" is no distractor for it
    assert rel["the red circle relative to the green circle"] == ("to the left", {"to the right", "above"})
    # blue (190, 190) under green (192, 32), boxes overlapping in x, centre slightly left
    assert rel["the blue square relative to the green circle"] == ("below", {"to the right", "above"})
    assert rel["the red circle relative to the blue square"] == ("to the left", {"to the right", "below"})
    for q, (a, _) in _answers("existence").items():
        colour, shape = re.search(r"a (\w+) (\w+) in", q).groups()
        present = any((o.colour, o.shape) == (colour, shape) for o in SCENE.objects)
        assert a == ("yes" if present else "no"), q


def test_image_marker_is_the_tokenizer_placeholder() -> None:
    from vlmalign.data.instruct import IMAGE_MARKER
    from vlmalign.models.language import IMAGE_TOKEN

    assert IMAGE_MARKER == IMAGE_TOKEN


def test_one_object_scene_has_no_relation_and_ambiguous_refs_are_avoided() -> None:
    single = Scene((obj("red", "star", "small", 80, 80, 50),), "white", (248, 248, 248))
    assert ask(single, "relation", random.Random(0)) is None
    # two large red objects: "the red object" / "the large red object" name neither
    twins = Scene((obj("red", "star", "large", 5, 5, 90), obj("red", "circle", "large", 120, 120, 90)),
                  "white", (248, 248, 248))
    assert ask(twins, "shape", random.Random(0)) is None
    with pytest.raises(ValueError, match="known: count"):
        ask(single, "size", random.Random(0))


# An independent reading of the generated questions, from the objects alone.
def _solve(question: str, objects: list[dict], image_size: int = 224) -> str:
    def find(colour=None, shape=None, size=None) -> dict:
        hits = [o for o in objects if (colour in (None, o["colour"]) and shape in (None, o["shape"])
                                       and size in (None, o["size"]))]
        assert len(hits) == 1, (question, hits)
        return hits[0]

    if m := re.match(r"How many (objects|shapes)|Count the objects", question):
        return str(len(objects))
    if m := re.match(r"How many (\w+) objects", question):
        return str(sum(o["colour"] == m.group(1) for o in objects))
    if m := re.match(r"How many (\w+)s are", question):
        return str(sum(o["shape"] == m.group(1) for o in objects))
    if m := re.search(r"colou?r (?:is|of) the (?:(small|large) )?(\w+)\?", question):
        return find(shape=m.group(2), size=m.group(1))["colour"]
    if m := re.search(r"shape is the (?:(small|large) )?(\w+) object\?", question):
        return find(colour=m.group(2), size=m.group(1))["shape"]
    if m := re.search(r"the (\w+) (\w+) relative to the (\w+) (\w+)\?", question):
        a, b = find(m.group(1), m.group(2)), find(m.group(3), m.group(4))
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]
        if abs(dx) >= abs(dy):
            return "to the left" if dx > 0 else "to the right"
        return "above" if dy > 0 else "below"
    if m := re.search(r"the (\w+) (\w+)(?: in the image)?\?", question):
        o = find(m.group(1), m.group(2))
        row = ("top", "middle", "bottom")[min(2, o["y"] * 3 // image_size)]
        col = ("left", "centre", "right")[min(2, o["x"] * 3 // image_size)]
        return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"
    raise AssertionError(f"unreadable question {question!r}")


def _relation_true_by_centres(question: str, choice: str, objects: list[dict]) -> bool:
    m = re.search(r"the (\w+) (\w+) relative to the (\w+) (\w+)\?", question)
    a, b = ({(o["colour"], o["shape"]): o for o in objects}[k] for k in (m.group(1, 2), m.group(3, 4)))
    return {"to the left": a["x"] < b["x"], "to the right": a["x"] > b["x"],
            "above": a["y"] < b["y"], "below": a["y"] > b["y"]}[choice]


@pytest.fixture(scope="module")
def examples():
    return generate_shapes(300, seed=11)


def test_mcq_answers_correct_and_distractors_wrong(examples) -> None:
    seen = Counter()
    for ex in examples:
        objects = [o.to_dict() for o in ex.scene.objects]
        for rec in mcq_records(ex.scene, ex.id, f"images/{ex.id}.png", seed=0, per_image=3):
            choices, answer = rec["choices"], rec["answer"]
            assert 3 <= len(choices) <= 4 and len(set(choices)) == len(choices) and 0 <= answer < len(choices)
            assert rec["hint"] == "" and rec["image"] == f"images/{ex.id}.png"
            category, question = rec["category"], rec["question"]
            seen[category] += 1
            if category == "relation":
                # the answer is the dominant separated direction; every wrong choice is false even by centres
                assert choices[answer] == _solve(question, objects), rec
                assert not any(_relation_true_by_centres(question, c, objects)
                               for k, c in enumerate(choices) if k != answer), rec
            else:
                assert choices[answer] == _solve(question, objects), rec
            if category == "position":
                o = next(o for o in objects if f"the {o['colour']} {o['shape']}" in question)
                for k, c in enumerate(choices):
                    if k != answer:  # a wrong region is one the object's box does not touch
                        row, _, col = c.partition(" ") if c != "centre" else ("middle", "", "centre")
                        r, cl = ("top", "middle", "bottom").index(row), ("left", "centre", "right").index(col)
                        x0, y0, x1, y1 = o["bbox"]
                        touches = x0 < (cl + 1) * 224 / 3 and x1 > cl * 224 / 3 and y0 < (r + 1) * 224 / 3 \
                            and y1 > r * 224 / 3
                        assert not touches, rec
    assert set(seen) == set(MCQ_CATEGORIES) and min(seen.values()) > 50


def test_mcq_answer_position_uniform(examples) -> None:
    by_size: dict[int, Counter] = {3: Counter(), 4: Counter()}
    for ex in examples:
        for rec in mcq_records(ex.scene, ex.id, "x.png", seed=1, per_image=4):
            by_size[len(rec["choices"])][rec["answer"]] += 1
    four = by_size[4]
    n = sum(four.values())
    assert n > 600 and set(four) == {0, 1, 2, 3}
    assert all(abs(four[k] - n / 4) < 0.2 * n / 4 for k in range(4)), four  # > 4 sigma margin
    assert set(by_size[3]) == {0, 1, 2}


def test_conversation_answers_correct(examples) -> None:
    turns_per = Counter()
    for ex in examples[:150]:
        rec = conversation_record(ex.scene, ex.id, "img.png", seed=0)
        turns = rec["conversations"]
        turns_per[len(turns) // 2] += 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        assert len(set(rec["categories"])) == len(rec["categories"])
        objects = [o.to_dict() for o in ex.scene.objects]
        for q, a, cat in zip(turns[::2], turns[1::2], rec["categories"], strict=True):
            question, answer = q["value"].removeprefix("<image>\n"), a["value"]
            if cat == "existence":
                colour, shape = re.search(r"a (\w+) (\w+) in", question).groups()
                present = any((o["colour"], o["shape"]) == (colour, shape) for o in objects)
                assert answer.startswith("Yes" if present else "No"), (question, answer)
            elif cat == "count":
                words = ["no", "one", "two", "three"]
                assert re.search(rf"\b{words[int(_solve(question, objects))]}\b", answer), (question, answer)
            elif cat in ("colour", "shape"):
                assert answer.endswith(f" {_solve(question, objects)}."), (question, answer)
                wrong = (set(COLOURS) if cat == "colour" else set(SHAPES)) - {_solve(question, objects)}
                assert not any(re.search(rf"\b{w}\.$", answer) for w in wrong)
    assert set(turns_per) == {1, 2, 3}


def test_deterministic_and_seed_dependent(tmp_path: Path, examples) -> None:
    scenes = {"train": [(e.id, e.scene) for e in examples[:40]], "test": [(e.id, e.scene) for e in examples[40:60]]}
    for name in "abc":
        (tmp_path / name).mkdir()
    counts = write_instruct_files(tmp_path / "a", scenes, seed=0)
    write_instruct_files(tmp_path / "b", scenes, seed=0)
    write_instruct_files(tmp_path / "c", scenes, seed=1)
    assert counts == {"instruct_train.json": 40, "mcq_train.json": 40, "instruct_test.json": 20, "mcq_test.json": 60}
    for name in counts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # a sample's records depend on (seed, id) only, not on the other samples
    alone = mcq_records(examples[45].scene, examples[45].id, f"images/{examples[45].id}.png", seed=0, per_image=3)
    assert alone == [r for r in json.loads((tmp_path / "a" / "mcq_test.json").read_text())
                     if r["id"].startswith(examples[45].id)]


def test_write_shapes_writes_loadable_instruct_files(shapes_root: Path) -> None:
    for split in ("train", "val", "test"):
        ids = [json.loads(line)["id"] for line in (shapes_root / f"{split}.jsonl").read_text().splitlines()]
        report = ConversationLoadReport()
        convs = load_conversations(shapes_root / f"instruct_{split}.json", report=report, check_images=True)
        assert [c.id for c in convs] == ids and report.total_skipped() == 0 and report.repaired == {}
        assert all(c.image == (shapes_root / "images" / f"{c.id}.png").resolve() for c in convs)
        mcq = json.loads((shapes_root / f"mcq_{split}.json").read_text())
        images = [r["id"].rsplit("_q", 1)[0] for r in mcq]
        assert list(dict.fromkeys(images)) == ids
        per_image = {i: images.count(i) for i in ids}
        assert set(per_image.values()) == ({1} if split == "train" else {HELDOUT_MCQ_PER_IMAGE})
        assert all((shapes_root / r["image"]).is_file() for r in mcq)


def test_ensure_shapes_adds_missing_instruct_files(tmp_path: Path) -> None:
    write_shapes(tmp_path, 12, seed=4)
    original = {name: (tmp_path / name).read_bytes() for name in INSTRUCT_FILES}
    for name in INSTRUCT_FILES:
        (tmp_path / name).unlink()
    (tmp_path / "train.jsonl").write_text("sentinel")
    ensure_shapes(tmp_path, 12, seed=4)
    assert {name: (tmp_path / name).read_bytes() for name in INSTRUCT_FILES} == original
    assert (tmp_path / "train.jsonl").read_text() == "sentinel"  # the rest is left alone
