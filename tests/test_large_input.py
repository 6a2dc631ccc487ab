"""Inputs at real size (issue 18): a LLaVA-format conversation file (LLaVA's 558K
pretraining file at a smaller size) and a captions JSONL are read by `vlmalign data
check` in a stream, and loaded for training into a compact `RecordStore`, each with peak
memory at most 3x the file's size; the whole-file JSON array is parsed one element at a
time, with the exact error position kept; a record read back from the store equals the
one the loader parsed.

The files are made here (nothing is committed); docs/troubleshooting.md has the figures
at full size."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vlmalign.data import records as records_module
from vlmalign.data.conversations import (
    CONVERSATION_CODEC,
    Conversation,
    iter_conversations,
    load_conversations,
)
from vlmalign.data.formats import iter_captions_jsonl, iter_json_array, load_captions_jsonl
from vlmalign.data.records import RecordStore
from vlmalign.data.sample import LoadReport

ROOT = Path(__file__).resolve().parents[1]
# Conversations are tokenised with the chat template (~1K a second here), captions only
# counted: the captions file is larger so that its records, not the fixed working memory
# of the tokenizer and the allocator's steps, make the difference measured.
N_CONVERSATIONS = 20_000
N_CAPTIONS = 100_000
# Loading without the tokenizer is fast, so the training-load test reads larger files: a
# peak also holds one-off steps of the interpreter's own tables (parsing image paths
# resizes its ~8 MB table of interned strings now and then, the old and the new copy held
# together for a moment), which must stay small against the data measured.
N_LOAD_CONVERSATIONS = 60_000
N_LOAD_CAPTIONS = 300_000

# Run in a fresh process: resets the peak resident set (VmHWM) after the imports, runs one
# CLI command (`{"cli": argv}`) or loads a training file as training does (`{"load":
# "captions" | "conversations", "data": DataConfig fields}`, the records kept while the
# peak is read), prints the peak's growth in bytes.
MEASURE = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import transformers, vlmalign.cli, vlmalign.models.vlm, vlmalign.data.splits  # imported before measuring
from vlmalign.config import DataConfig
task = json.loads(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # peak := current
base = status("VmRSS")
if "cli" in task:
    rc, n = vlmalign.cli.main(task["cli"]), None
else:
    load = {"captions": vlmalign.data.splits.train_samples,
            "conversations": vlmalign.data.splits.train_conversations}[task["load"]]
    records = load(DataConfig(**task["data"]))
    rc, n = 0, len(records)
print(json.dumps({"rc": rc, "peak_growth": status("VmHWM") - base, "records": n}))
"""

WORDS = ("a the red blue green cat dog photo of on in with large small man woman street car tree sky wooden table "
         "window old new city beach mountain river people standing sitting next to near front background").split()
PROMPTS = ["Render a clear and concise summary of the photo.\n<image>", "<image>\nGive a brief description of the image.",
           "Describe the image concisely.\n<image>", "<image>\nWrite a terse but informative summary of the picture."]


def make_files(folder: Path, n: int, n_captions: int | None = None) -> tuple[Path, Path]:
    """A LLaVA pretraining-format JSON (one line, as LLaVA ships it) of `n` records and a
    captions JSONL of `n_captions` (default `n`) lines, over 100 image files."""
    rng = random.Random(0)
    images = folder / "images" / "00453"
    images.mkdir(parents=True)
    for k in range(100):
        (images / f"{4539300 + k:09d}.jpg").touch()

    def caption() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))

    llava, captions = folder / "llava.json", folder / "captions.jsonl"
    with llava.open("w") as f:
        f.write("[")
        for i in range(n):
            rec = {"id": f"{4539300 + i:09d}", "image": f"images/00453/{4539300 + i % 100:09d}.jpg",
                   "conversations": [{"from": "human", "value": rng.choice(PROMPTS)},
                                     {"from": "gpt", "value": caption()}]}
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    with captions.open("w") as f:
        for i in range(n if n_captions is None else n_captions):
            f.write(json.dumps({"image": f"images/00453/{4539300 + i % 100:09d}.jpg", "caption": caption()}) + "\n")
    return llava, captions


def peak_growth(task: dict) -> int:
    """The growth of the peak resident set of a fresh process running `task` (see MEASURE)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(task)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, done.stdout[-2000:]
    return result["peak_growth"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_data_check_streams_large_files_within_3x_their_size(tmp_path):
    from .conftest import TINY

    llava, captions = make_files(tmp_path / "big", N_CONVERSATIONS, N_CAPTIONS)
    small_llava, small_captions = make_files(tmp_path / "small", N_CONVERSATIONS // 10, N_CAPTIONS // 10)
    for recipe, big, small in (("instruct", llava, small_llava), ("align", captions, small_captions)):
        argv = [["data", "check", recipe, *TINY, f"data.root={p.parent}", f"data.train_file={p.name}", "--show", "0"]
                for p in (big, small)]
        # What the data costs: the model, the tokenizer and their working memory are the
        # same for both files, so the difference of the peaks is the cost of the records
        # the big file has more of; at full size the fixed part is negligible.
        growth = peak_growth({"cli": argv[0]}) - peak_growth({"cli": argv[1]})
        size = big.stat().st_size - small.stat().st_size
        assert growth <= 3 * size, f"{recipe}: peak grew {growth / 1e6:.1f} MB for {size / 1e6:.1f} MB more data"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_training_load_keeps_large_files_within_3x_their_size(tmp_path):
    """`train_samples` / `train_conversations` (what `TrainData.prepare` loads) keep every
    record, in a `RecordStore`: as a list of `Sample` / `Conversation` objects the same
    files grew the peak by 4-7x their size (docs/troubleshooting.md)."""
    llava, captions = make_files(tmp_path / "big", N_LOAD_CONVERSATIONS, N_LOAD_CAPTIONS)
    small_llava, small_captions = make_files(tmp_path / "small", N_LOAD_CONVERSATIONS // 10, N_LOAD_CAPTIONS // 10)
    over = []
    for kind, big, small in (("conversations", llava, small_llava), ("captions", captions, small_captions)):
        growth = [peak_growth({"load": kind, "data": {"root": str(p.parent), "train_file": p.name,
                                                      "generate_shapes": False}}) for p in (big, small)]
        size = big.stat().st_size - small.stat().st_size
        if growth[0] - growth[1] > 3 * size:
            over.append(f"{kind}: peak grew {(growth[0] - growth[1]) / 1e6:.1f} MB for {size / 1e6:.1f} MB more data")
    assert not over, "; ".join(over)


def _write_every_field(folder: Path) -> tuple[Path, Path]:
    """A captions JSONL and a LLaVA `.json` using every field the loaders keep, with
    records they skip or repair among them, over images in two folders."""
    for name in ("a.jpg", "sub/b.png", "sub/c d é.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    meta = {"source": "coco", "objects": [{"name": "cat", "box": [1, 2.5, 3, None]}], "ok": True, "n": 2**40}
    captions = [
        {"id": "x1", "image": "a.jpg", "caption": " A cat. ", "short_caption": "cat", "long_caption": "A cat on a mat.",
         **meta},
        {"image": "sub/b.png", "caption": "no id: named by its line"},
        {"id": 7, "image": "sub/c d é.jpg", "short_caption": "only a short one ✓", "extra": "é€"},
        {"id": "x1", "image": "sub/b.png", "caption": "the id again: renamed x1#2"},
        {"image": "missing.jpg", "caption": "skipped"},
        {"id": "x1", "image": "a.jpg", "caption": " A cat. ", "short_caption": "cat", "long_caption": "A cat on a mat.",
         **meta},  # a duplicate record: skipped
        {"image": "a.jpg", "caption": ""},
    ]
    jsonl = folder / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in captions) + "\nnot json\n", encoding="utf-8")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": " A cat. "},
             {"from": "user", "value": "And the colour?"}, {"from": "assistant", "value": "Black ✓"}]
    convs = [
        {"id": "c1", "image": "a.jpg", "conversations": turns, **meta},
        {"id": "c1", "image": "sub/c d é.jpg", "conversations": [{"from": "human", "value": "no marker"},
                                                                {"from": "gpt", "value": "one is put in"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "kept"}]},
        {"id": 3, "image": "sub/b.png", "conversations": turns[:2]},
        {"id": "c9", "image": "a.jpg", "conversations": turns[:1]},  # ends with the user: skipped
    ]
    llava = folder / "convs.json"
    llava.write_text(json.dumps(convs, ensure_ascii=False), encoding="utf-8")
    return jsonl, llava


@pytest.mark.parametrize("small_tables", [False, True])
def test_a_record_read_back_from_the_store_equals_the_parsed_one(tmp_path, monkeypatch, small_tables):
    """Every field of every record, the skips, repairs and their messages: the store
    against the list the loaders returned before (`list(iter_...)`). With tables of one
    entry, folders and texts past the first are stored whole."""
    if small_tables:
        monkeypatch.setattr(records_module, "SHARED_FOLDERS", 1)
        monkeypatch.setattr(records_module, "SHARED_TEXTS", 1)
    jsonl, llava = _write_every_field(tmp_path)
    for load, parse in ((load_captions_jsonl, iter_captions_jsonl), (load_conversations, iter_conversations)):
        path = jsonl if load is load_captions_jsonl else llava
        stored_report, parsed_report = LoadReport(), LoadReport()
        stored, parsed = load(path, report=stored_report), list(parse(path, report=parsed_report))
        assert isinstance(stored, RecordStore) and len(stored) == len(parsed) >= 4
        assert stored_report.records == parsed_report.records and stored_report.as_dict() == parsed_report.as_dict()
        assert stored_report.skipped and stored_report.repaired  # the file exercises skips and repairs
        for got, want in zip(stored, parsed, strict=True):
            assert got == want and vars(got) == vars(want)
            assert type(got.image) is type(want.image) and str(got.image) == str(want.image)
        assert stored == parsed and stored[-1] == parsed[-1] and list(stored[1:3]) == parsed[1:3]
        assert list(stored[[2, 0]]) == [parsed[2], parsed[0]] and list(stored.take([])) == []
        assert list(stored[1:][[0, -1]]) == [parsed[1], parsed[-1]]  # a view of a view
        with pytest.raises(IndexError):
            stored[len(parsed)]
        got = stored[0]
        got.meta["changed"] = True  # a record read is a copy
        assert "changed" not in stored[0].meta
    odd = Conversation(id="o", image=None, turns=[("assistant", "first"), ("user", "then")], meta={})
    assert list(RecordStore.build([odd], CONVERSATION_CODEC)) == [odd]  # roles kept when not alternating


def test_a_json_array_is_parsed_element_by_element_with_exact_errors(tmp_path):
    rng = random.Random(1)
    for _ in range(60):
        data = [rng.choice([{"a": "x" * rng.randint(0, 40), "b": [1, {"c": "é€"}]}, 3, 1.25e-3, "s", None, True, []])
                for _k in range(rng.randint(0, 20))]
        path = tmp_path / "a.json"
        path.write_text(json.dumps(data, indent=rng.choice([None, 1])), encoding="utf-8")
        for chunk in (1, 2, 5, 1 << 20):  # elements and numbers cut at every place
            assert list(iter_json_array(path, chunk_size=chunk)) == data
    path.write_text('[{"a": 1},\n {"b": 2},\n ...\n]')
    with pytest.raises(ValueError, match="line 3, column 2"):
        list(iter_json_array(path, chunk_size=4))
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="holds a JSON object; expected a list"):
        list(iter_json_array(path, "expected a list"))
