"""Multiple-choice items (ScienceQA style): loading, and the one home of the prompt format.

Two sources yield the same `MCQItem`:

- `load_mcq_json`: the flat files `shapes` writes (`mcq_{train,val,test}.json`, see
  `data/instruct.py`): a JSON list (or JSONL) of
  `{"id", "question", "choices", "answer", "image", "hint", "category"}`;
- `load_scienceqa`: the real ScienceQA release (Lu et al. 2022): `problems.json`
  (pid -> problem) + `pid_splits.json` (split -> pids), images at
  `{image_root}/{split}/{pid}/image.png`; `img_only` keeps the IMG subset (problems with
  an image context), the subset LLaVA and CG-VLM report.

The prompt (`mcq_prompt`) follows LLaVA's ScienceQA evaluation prompt; training files
made with `mcq_to_conversation` / `write_mcq_conversations` and the evaluation in
`eval/mcq.py` both use it, so the model is tested on exactly the format it was taught:

    Context: {hint}                 (only when the hint is non-empty)
    {question}
    Options: (A) {choice 0} (B) {choice 1} ...
    Answer with the option's letter from the given choices directly.

and the answer is the option's letter alone ("B").

Loader skip reasons (counted in the `LoadReport` with `file:[index]` or `file:pid`):
`malformed_json` (a JSONL line), `not_an_object`, `missing_key`, `wrong_type`,
`empty_question`, `empty_choice`, `too_few_choices` (< 2), `too_many_choices` (> 26
letters), `duplicate_choices` (two options with exactly the same text: the answer would
be ambiguous; options differing only in case, as ScienceQA has, stay distinct), `answer_out_of_range`, `duplicate_record` (equal
to an earlier record; ScienceQA: a pid listed twice), `outside_root` (an image path
leaving the data root, unless `allow_outside_root`), `missing_image`, `unknown_pid`
(ScienceQA: a pid in the split list but not in problems). As in `formats.py`, a repeated
id with different content is kept as `id#2`, ... and counted in `report.repaired`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmalign.data.formats import (
    DuplicateTracker,
    read_json_file,
    read_records,
    resolve_image_path,
    valid_id,
)
from vlmalign.data.sample import LoadReport

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"  # = models.language.IMAGE_TOKEN (kept free of transformers imports)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MIN_CHOICES = 2
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class MCQItem:
    """One multiple-choice question about an image (or text only when `image` is None).

    `answer` indexes `choices`. `category` is the key of per-category accuracy (the
    question type for `shapes`, the subject for ScienceQA); `meta` keeps the source's
    other fields (ScienceQA: topic, skill, task, solution, its fine-grained category).
    """

    id: str
    question: str
    choices: list[str]
    answer: int
    image: Path | None = None
    hint: str = ""
    lecture: str = ""
    category: str = ""
    subject: str = ""
    grade: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def answer_letter(self) -> str:
        """The correct option's letter ("A" for answer 0)."""
        return LETTERS[self.answer]


def option_letter(index: int) -> str:
    """"A" for 0, "B" for 1, ... (at most 26 options)."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} has no letter; items hold at most {len(LETTERS)} options")
    return LETTERS[index]


# ---------------------------------------------------------------- prompt format


def mcq_prompt(item: MCQItem) -> str:
    """The question as the user sees it (LLaVA's ScienceQA style, no image marker):
    `Context: {hint}\\n{question}\\nOptions: (A) x (B) y\\nAnswer with the option's letter
    from the given choices directly.`; the context line only when the hint is non-empty."""
    options = " ".join(f"({option_letter(k)}) {c}" for k, c in enumerate(item.choices))
    lines = [f"Context: {item.hint.strip()}"] if item.hint.strip() else []
    lines += [item.question.strip(), f"Options: {options}", ANSWER_INSTRUCTION]
    return "\n".join(lines)


def mcq_user_turn(item: MCQItem) -> str:
    """The user turn's text: `"<image>\\n"` + `mcq_prompt(item)` (no marker when the item
    has no image), as LLaVA writes the first human turn."""
    prompt = mcq_prompt(item)
    return f"{IMAGE_MARKER}\n{prompt}" if item.image is not None else prompt


def _portable(path: Path, folder: Path) -> str:
    """`path` relative to `folder` when it lies inside it (the file stays movable), else absolute."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def mcq_to_conversation(item: MCQItem, image_folder: str | Path | None = None) -> dict:
    """A LLaVA conversation record teaching `item`: human turn = `mcq_user_turn(item)`,
    gpt turn = the answer letter ("B"). The image path is made relative to
    `image_folder` when it lies inside it (pass the output file's folder)."""
    record: dict[str, Any] = {"id": item.id}
    if item.image is not None:
        record["image"] = _portable(item.image, Path(image_folder)) if image_folder is not None else str(item.image)
    record["conversations"] = [
        {"from": "human", "value": mcq_user_turn(item)},
        {"from": "gpt", "value": item.answer_letter},
    ]
    if item.category:
        record["categories"] = [item.category]
    return record


def write_mcq_conversations(items: list[MCQItem], path: str | Path) -> Path:
    """Write `items` as a LLaVA conversation JSON list (`load_conversations` reads it);
    image paths relative to the file's folder when inside it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [mcq_to_conversation(it, path.parent) for it in items]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- validation


def _parse_fields(rec: Any, where: str, report: LoadReport) -> tuple[str, list[str], int] | None:
    """(question, choices, answer) of a record, or None after counting the skip."""
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
        return None
    for key in ("question", "choices", "answer"):
        if key not in rec:
            report.skip("missing_key", where, f"no {key!r} key")
            return None
    question, choices, answer = rec["question"], rec["choices"], rec["answer"]
    if not isinstance(question, str):
        report.skip("wrong_type", where, f"'question' must be a string, got {type(question).__name__}")
        return None
    if not question.strip():
        report.skip("empty_question", where, "'question' is empty")
        return None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        report.skip("wrong_type", where, f"'choices' must be a list of strings, got {choices!r:.80}")
        return None
    choices = [c.strip() for c in choices]
    if len(choices) < MIN_CHOICES:
        report.skip("too_few_choices", where, f"{len(choices)} choice(s); a question needs at least {MIN_CHOICES}")
        return None
    if len(choices) > len(LETTERS):
        report.skip("too_many_choices", where, f"{len(choices)} choices; at most {len(LETTERS)} have letters")
        return None
    if not all(choices):
        report.skip("empty_choice", where, f"choice {choices.index('')} is empty")
        return None
    if len(set(choices)) != len(choices):  # exact: options differing only in case are distinct (ScienceQA has them)
        report.skip("duplicate_choices", where, f"two options have the same text: {choices}")
        return None
    if not isinstance(answer, int) or isinstance(answer, bool):
        report.skip("wrong_type", where, f"'answer' must be an integer index, got {answer!r}")
        return None
    if not 0 <= answer < len(choices):
        report.skip("answer_out_of_range", where, f"answer {answer} but {len(choices)} choices (0-based index)")
        return None
    return question.strip(), choices, answer


def _optional_string(rec: dict, key: str, where: str, report: LoadReport) -> str | None:
    """`rec[key]` stripped ("" when absent or null), or None after counting a wrong type."""
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        report.skip("wrong_type", where, f"{key!r} must be a string, got {type(value).__name__}")
        return None
    return value.strip()


# ---------------------------------------------------------------- shapes-style files


def _existing_image(image: str, root: Path, where: str, report: LoadReport, allow_outside_root: bool) -> Path | None:
    """The image's absolute path under `root`, or None after an `outside_root` or
    `missing_image` skip."""
    candidates = resolve_image_path(image, [root], where, report, allow_outside_root)
    if candidates is None:
        return None
    if not candidates[0].is_file():
        report.skip("missing_image", where, f"image file {candidates[0]} not found (set image_root)")
        return None
    return candidates[0]


def _read_list(path: Path, report: LoadReport) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    return read_records(path, report, 'a multiple-choice file is a list [{"id", "question", "choices", "answer", "image"}, ...]')


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    return read_json_file(path)


def load_mcq_json(
    path: str | Path,
    image_root: str | Path | None = None,
    report: LoadReport | None = None,
    allow_outside_root: bool = False,
) -> list[MCQItem]:
    """Load multiple-choice records `{"id", "question", "choices", "answer", "image",
    "hint", "category"}` (a `.json` list or `.jsonl`), as `shapes` writes them.

    `image` may be absent or null (a text-only question); relative paths resolve against
    `image_root` (default: the file's folder), which images may not leave unless
    `allow_outside_root`. Bad records are skipped and counted in
    `report` (reasons in the module docstring); a record without `id` gets
    `"{file stem}-{index}"`; other keys go to `meta`. Raises FileNotFoundError if `path`
    is missing and ValueError if a `.json` file is not a valid JSON list.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    root = Path(image_root) if image_root is not None else path.parent
    items: list[MCQItem] = []
    dups = DuplicateTracker(report)
    known = {"id", "question", "choices", "answer", "image", "hint", "lecture", "category", "subject", "grade"}
    for i, (where, rec) in enumerate(_read_list(path, report)):
        parsed = _parse_fields(rec, where, report)
        if parsed is None:
            continue
        question, choices, answer = parsed
        if not valid_id(rec, where, report):
            continue
        texts = {k: _optional_string(rec, k, where, report) for k in ("hint", "lecture", "category", "subject", "grade")}
        if any(v is None for v in texts.values()):
            continue
        image = rec.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            report.skip("wrong_type", where, f"'image' must be a non-empty string or null, got {image!r}")
            continue
        image_path = None
        if image is not None:
            image_path = _existing_image(image, root, where, report, allow_outside_root)
            if image_path is None:
                continue
        if dups.is_duplicate_record(rec, where):
            continue
        items.append(MCQItem(
            id=dups.unique_id(str(rec.get("id", f"{path.stem}-{i}")), where), question=question, choices=choices, answer=answer, image=image_path,
            meta={k: v for k, v in rec.items() if k not in known}, **texts,  # type: ignore[arg-type]
        ))
        report.loaded += 1
    return items


# ---------------------------------------------------------------- ScienceQA


def load_scienceqa(
    problems_json: str | Path,
    pid_splits_json: str | Path,
    split: str = "test",
    image_root: str | Path | None = None,
    img_only: bool = True,
    report: LoadReport | None = None,
    allow_outside_root: bool = False,
) -> list[MCQItem]:
    """Load one split of ScienceQA (Lu et al. 2022, the release's `problems.json` and
    `pid_splits.json`).

    `problems.json` maps pid -> {question, choices, answer, hint, image ("image.png" or
    null), task, grade, subject, topic, category, skill, lecture, solution, split};
    `pid_splits.json` maps split names ("train", "val", "test", "minival", ...) to pids.
    Images are read from `{image_root}/{problem's split}/{pid}/{image}` (default root:
    `images/` next to problems.json when that folder exists, else its folder). With
    `img_only` (default) only problems with an image are kept: the IMG subset (2017 of
    the 4241 test problems); the others are dropped by design, logged, not counted as
    skips. `category` is the subject (natural / social / language science), the
    breakdown ScienceQA reports; the fine-grained ScienceQA `category`, topic, skill,
    task and solution go to `meta`. Bad problems are skipped and counted in `report`.
    """
    problems_json, pid_splits_json = Path(problems_json), Path(pid_splits_json)
    report = report if report is not None else LoadReport()
    problems = _read_json(problems_json)
    splits = _read_json(pid_splits_json)
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_json} holds a JSON {type(problems).__name__}; expected a dict pid -> problem")
    if not isinstance(splits, dict):
        raise ValueError(f"{pid_splits_json} holds a JSON {type(splits).__name__}; expected a dict split -> [pid, ...]")
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {pid_splits_json}; known: {', '.join(map(str, splits))}")
    if image_root is None:
        images = problems_json.parent / "images"
        root = images if images.is_dir() else problems_json.parent
    else:
        root = Path(image_root)
    items: list[MCQItem] = []
    text_only = 0
    seen: set[str] = set()
    for pid in splits[split]:
        pid = str(pid)
        where = f"{problems_json}:{pid}"
        if pid not in problems:
            report.skip("unknown_pid", where, f"pid listed in {pid_splits_json.name}[{split!r}] but not in problems")
            continue
        rec = problems[pid]
        parsed = _parse_fields(rec, where, report)
        if parsed is None:
            continue
        question, choices, answer = parsed
        texts = {k: _optional_string(rec, k, where, report)
                 for k in ("hint", "lecture", "subject", "grade", "image", "split")}
        if any(v is None for v in texts.values()):
            continue
        image_path = None
        if texts["image"]:
            rel = f"{texts['split'] or split}/{pid}/{texts['image']}"
            image_path = _existing_image(rel, root, where, report, allow_outside_root)
            if image_path is None:
                continue
        elif img_only:
            text_only += 1
            continue
        if pid in seen:
            report.skip("duplicate_record", where, f"pid {pid} listed twice in split {split!r}")
            continue
        seen.add(pid)
        meta = {k: rec[k] for k in ("task", "topic", "category", "skill", "solution", "split") if k in rec}
        items.append(MCQItem(
            id=pid, question=question, choices=choices, answer=answer, image=image_path,
            hint=texts["hint"] or "", lecture=texts["lecture"] or "", category=texts["subject"] or "",
            subject=texts["subject"] or "", grade=texts["grade"] or "", meta=meta,
        ))
        report.loaded += 1
    if text_only:
        log.info("ScienceQA %s: kept %d problems with an image (IMG subset), left out %d text-only",
                 split, len(items), text_only)
    return items
