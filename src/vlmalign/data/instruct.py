"""Instruction data for `shapes`: questions with answers derived from the scene objects.

Every answer is computed from the objects (colour, shape, size, centre, bbox), never from
caption text, and every wrong option is checked to be false for the scene:

- `count`: objects in total, of one shape, or of one colour;
- `colour` / `shape`: of an object named by its other attributes ("the large circle");
- `position`: the third of the canvas (row x column) holding the object's centre; wrong
  options are regions the object's bounding box does not touch at all;
- `relation`: where one object lies relative to another (`relation_between`); wrong
  options are relations that are false even by centres (`relation_holds(strict=False)`);
- `existence` (conversations only): "Is there a green star?" with yes / no.

Two forms are written next to the captions (LLaVA stage 2 / CG-VLM instruction tuning,
ScienceQA-style evaluation): conversations (1-3 QA turns per image, the LLaVA JSON
format that `load_conversations` reads) and multiple-choice records
`{"id", "question", "choices", "answer", "image", "hint", "category"}` with 3-4 choices
and the answer's position uniform. Each image draws from its own `random.Random` seeded
by (seed, id), so the files are deterministic and independent of other outputs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmalign.data.shapes import (
    COLOURS,
    REGION_PHRASES,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    region_of,
    relation_between,
    relation_holds,
)

# LLaVA's image marker in conversation files; equal to `models.language.IMAGE_TOKEN`
# (a test checks), not imported from there so that writing data never imports transformers.
IMAGE_MARKER = "<image>"

MCQ_CATEGORIES: tuple[str, ...] = ("count", "colour", "shape", "position", "relation")
QA_CATEGORIES: tuple[str, ...] = (*MCQ_CATEGORIES, "existence")
MAX_TURNS = 3  # QA turns per conversation: 1..MAX_TURNS, uniform
MAX_CHOICES = 4  # ScienceQA has 2-5; we use 4, or 3 when only two options are surely wrong
MIN_CHOICES = 3
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
REGION_NAMES: dict[tuple[str, str], str] = {
    (r, c): "centre" if (r, c) == ("middle", "centre") else f"{r} {c}" for r in ROWS for c in COLUMNS
}
RELATION_ANSWERS: dict[str, str] = {
    "left of": "to the left", "right of": "to the right", "above": "above", "below": "below",
}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below",
}
_NUMBER_WORDS = ("no", "one", "two", "three", "four")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}


@dataclass(frozen=True)
class QA:
    """One question about a scene.

    `answer` is the short answer (a multiple-choice option), `sentence` the full answer a
    conversation uses, `distractors` short answers that are false for the scene, the most
    plausible first (empty for yes/no questions, which make no 3-choice item).
    """

    category: str
    question: str
    answer: str
    sentence: str
    distractors: tuple[str, ...] = ()


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _reference(obj: ShapeObject, objects: tuple[ShapeObject, ...], without: str) -> str | None:
    """The shortest name for `obj` that avoids the attribute `without` and no other object
    shares ("the circle", "the large circle", "the red object"), or None."""
    options = {
        "colour": [("shape",), ("size", "shape")],
        "shape": [("colour",), ("size", "colour")],
    }[without]
    for attrs in options:
        if sum(all(getattr(o, a) == getattr(obj, a) for a in attrs) for o in objects) == 1:
            words = [getattr(obj, a) for a in attrs]
            return "the " + " ".join(words) + ("" if "shape" in attrs else " object")
    return None


def _name(obj: ShapeObject) -> str:
    return f"the {obj.colour} {obj.shape}"  # unique: a scene never repeats a colour + shape


def _count_qa(scene: Scene, rng: random.Random) -> QA:
    objs = scene.objects
    kind = rng.choice(("total", "shape", "colour"))
    if kind == "total":
        n = len(objs)
        question = rng.choice(("How many objects are in the image?", "How many shapes can you see?",
                               "Count the objects in the image."))
        sentence = "There is one object in the image." if n == 1 else f"There are {_NUMBER_WORDS[n]} objects in the image."
        pool = [k for k in range(1, 5) if k != n]
    else:
        if kind == "shape":
            # half the time a shape that is present, else any shape (answers 0..3)
            value = rng.choice([o.shape for o in objs]) if rng.random() < 0.5 else rng.choice(SHAPES)
            n = sum(o.shape == value for o in objs)
            noun, noun_plural = value, _PLURALS[value]
        else:
            value = rng.choice([o.colour for o in objs]) if rng.random() < 0.5 else rng.choice(list(COLOURS))
            n = sum(o.colour == value for o in objs)
            noun, noun_plural = f"{value} object", f"{value} objects"
        question = rng.choice((f"How many {noun_plural} are in the image?", f"How many {noun_plural} are there?"))
        if n == 0:
            sentence = f"There are no {noun_plural} in the image."
        elif n == 1:
            sentence = f"There is one {noun} in the image."
        else:
            sentence = f"There are {_NUMBER_WORDS[n]} {noun_plural} in the image."
        pool = [k for k in range(0, 5) if k != n]
    rng.shuffle(pool)
    pool.sort(key=lambda k: abs(k - n))  # nearest counts are the most plausible mistakes
    return QA("count", question, str(n), sentence, tuple(str(k) for k in pool))


def _attribute_distractors(answer: str, in_scene: list[str], universe: list[str], rng: random.Random) -> tuple[str, ...]:
    """Wrong values: those seen elsewhere in the scene first (plausible), then the rest."""
    seen = [v for v in dict.fromkeys(in_scene) if v != answer]
    rest = [v for v in universe if v != answer and v not in seen]
    rng.shuffle(seen)
    rng.shuffle(rest)
    return tuple(seen + rest)


def _attribute_qa(scene: Scene, rng: random.Random, attribute: str, questions: tuple[str, str],
                  answer: str, universe: tuple[str, ...]) -> QA | None:
    """"What colour / shape is <the object named by its other attributes>?": `questions`
    and `answer` are templates over `{ref}` and `{value}`."""
    objs = scene.objects
    named = [(o, ref) for o in objs if (ref := _reference(o, objs, attribute))]
    if not named:
        return None
    obj, ref = rng.choice(named)
    value = getattr(obj, attribute)
    question = rng.choice(questions).format(ref=ref)
    others = [getattr(o, attribute) for o in objs if o is not obj]
    return QA(attribute, question, value, answer.format(ref=_cap(ref), value=value),
              _attribute_distractors(value, others, list(universe), rng))


def _colour_qa(scene: Scene, rng: random.Random) -> QA | None:
    return _attribute_qa(scene, rng, "colour", ("What colour is {ref}?", "What is the colour of {ref}?"),
                         "{ref} is {value}.", tuple(COLOURS))


def _shape_qa(scene: Scene, rng: random.Random) -> QA | None:
    return _attribute_qa(scene, rng, "shape", ("What shape is {ref}?", "What kind of shape is {ref}?"),
                         "{ref} is a {value}.", tuple(SHAPES))


def _touched(lo: int, hi: int, image_size: int) -> set[int]:
    """Indices of the canvas thirds that the pixel span [lo, hi) overlaps."""
    third = image_size / 3
    return {k for k in range(3) if lo < (k + 1) * third and hi > k * third}


def _position_qa(scene: Scene, rng: random.Random) -> QA:
    obj = rng.choice(scene.objects)
    row, col = region_of(obj, scene.image_size)
    x0, y0, x1, y1 = obj.bbox
    rows, cols = _touched(y0, y1, scene.image_size), _touched(x0, x1, scene.image_size)
    wrong = [REGION_NAMES[(r, c)] for i, r in enumerate(ROWS) for j, c in enumerate(COLUMNS)
             if i not in rows or j not in cols]  # cells the object does not reach at all
    rng.shuffle(wrong)
    name = _name(obj)
    question = rng.choice((f"Where is {name} in the image?", f"In which part of the image is {name}?"))
    return QA("position", question, REGION_NAMES[(row, col)],
              f"{_cap(name)} is {REGION_PHRASES[(row, col)]}.", tuple(wrong))


def _relation_qa(scene: Scene, rng: random.Random) -> QA | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects
             if a is not b and relation_between(a, b) is not None]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    rel = relation_between(a, b)
    assert rel is not None
    wrong = [RELATION_ANSWERS[r] for r in RELATIONS if not relation_holds(a, r, b, strict=False)]
    rng.shuffle(wrong)
    question = rng.choice((f"Where is {_name(a)} relative to {_name(b)}?",
                           f"What is the position of {_name(a)} relative to {_name(b)}?"))
    return QA("relation", question, RELATION_ANSWERS[rel],
              f"{_cap(_name(a))} is {RELATION_PHRASES[rel]} {_name(b)}.", tuple(wrong))


def _existence_qa(scene: Scene, rng: random.Random) -> QA:
    objs = scene.objects
    if rng.random() < 0.5:
        obj = rng.choice(objs)
        return QA("existence", f"Is there a {obj.colour} {obj.shape} in the image?", "yes",
                  f"Yes, there is a {obj.size} {obj.colour} {obj.shape} in the image.")
    present = {(o.colour, o.shape) for o in objs}
    # plausible absentees: a present shape in another colour, or a present colour on another shape
    near = [(c, o.shape) for o in objs for c in COLOURS] + [(o.colour, s) for o in objs for s in SHAPES]
    colour, shape = rng.choice([k for k in near if k not in present])
    return QA("existence", f"Is there a {colour} {shape} in the image?", "no",
              f"No, there is no {colour} {shape} in the image.")


_GENERATORS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "count": _count_qa, "colour": _colour_qa, "shape": _shape_qa, "position": _position_qa,
    "relation": _relation_qa, "existence": _existence_qa,
}


def ask(scene: Scene, category: str, rng: random.Random) -> QA | None:
    """A random question of `category` about `scene` with its correct answer, or None when
    the scene allows none (e.g. `relation` with one object)."""
    if category not in _GENERATORS:
        raise ValueError(f"unknown question category {category!r}; known: {', '.join(_GENERATORS)}")
    return _GENERATORS[category](scene, rng)


def conversation_record(scene: Scene, sample_id: str, image: str, seed: int) -> dict:
    """A LLaVA conversation record: 1-3 QA turns of distinct categories, `<image>\\n` at the
    start of the first human turn; `categories` lists each turn's category."""
    rng = random.Random(f"{seed}-instruct-{sample_id}")
    categories = list(QA_CATEGORIES)
    rng.shuffle(categories)
    wanted = rng.randint(1, MAX_TURNS)
    qas = []
    for category in categories:
        qa = ask(scene, category, rng)
        if qa is not None:
            qas.append(qa)
        if len(qas) == wanted:
            break
    turns = []
    for k, qa in enumerate(qas):
        question = f"{IMAGE_MARKER}\n{qa.question}" if k == 0 else qa.question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.sentence}]
    return {"id": sample_id, "image": image, "conversations": turns, "categories": [q.category for q in qas]}


def mcq_record(qa: QA, record_id: str, image: str, rng: random.Random) -> dict | None:
    """A ScienceQA-style record from `qa`: the most plausible distractors, 3-4 choices, the
    answer at a uniformly drawn position. None when fewer than 2 distractors exist."""
    n = min(MAX_CHOICES, 1 + len(qa.distractors))
    if n < MIN_CHOICES:
        return None
    choices = list(qa.distractors[: n - 1])
    rng.shuffle(choices)
    answer = rng.randrange(n)
    choices.insert(answer, qa.answer)
    return {"id": record_id, "question": qa.question, "choices": choices, "answer": answer,
            "image": image, "hint": "", "category": qa.category}


def mcq_records(scene: Scene, sample_id: str, image: str, seed: int, per_image: int = 1) -> list[dict]:
    """`per_image` multiple-choice records of distinct categories, each category drawn
    uniformly among those the scene allows (ids `{sample_id}_q{k}`)."""
    rng = random.Random(f"{seed}-mcq-{sample_id}")
    categories = list(MCQ_CATEGORIES)
    rng.shuffle(categories)
    out: list[dict] = []
    for category in categories:
        qa = ask(scene, category, rng)
        record = mcq_record(qa, f"{sample_id}_q{len(out)}", image, rng) if qa is not None else None
        if record is not None:
            out.append(record)
        if len(out) == per_image:
            break
    return out


# Held-out images get several questions of distinct categories (more evaluation items for
# the same images; their first question is the one a single-question file would hold).
HELDOUT_MCQ_PER_IMAGE = 3

INSTRUCT_FILES: tuple[str, ...] = tuple(
    f"{kind}_{split}.json" for kind in ("instruct", "mcq") for split in ("train", "val", "test")
)


def write_instruct_files(
    out_dir: str | Path, scenes: dict[str, list[tuple[str, Scene]]], seed: int,
    mcq_per_image: int = 1, heldout_mcq_per_image: int = HELDOUT_MCQ_PER_IMAGE,
) -> dict[str, int]:
    """Write `instruct_{split}.json` (conversations) and `mcq_{split}.json` for each split.

    `scenes` maps a split to its `(sample id, scene)` pairs; images are referenced as
    `images/{id}.png` relative to `out_dir`. The train split gets `mcq_per_image`
    multiple-choice records per image, other splits `heldout_mcq_per_image`. Returns the
    record count per file name.
    """
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for split, items in scenes.items():
        convs = [conversation_record(scene, sid, f"images/{sid}.png", seed) for sid, scene in items]
        per_image = mcq_per_image if split == "train" else heldout_mcq_per_image
        mcqs = [r for sid, scene in items for r in mcq_records(scene, sid, f"images/{sid}.png", seed, per_image)]
        for name, records in ((f"instruct_{split}.json", convs), (f"mcq_{split}.json", mcqs)):
            (out / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            counts[name] = len(records)
    return counts
