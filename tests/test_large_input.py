"""Inputs at real size (issue 18): a LLaVA-format conversation file (LLaVA's 558K
pretraining file at a smaller size) and a captions JSONL are read by `vlmalign data
check` in a stream, with peak memory at most 3x the file's size; the whole-file JSON
array is parsed one element at a time, with the exact error position kept.

The files are made here (nothing is committed); docs/troubleshooting.md has the figures
at full size."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vlmalign.data.formats import iter_json_array

ROOT = Path(__file__).resolve().parents[1]
# Conversations are tokenised with the chat template (~1K a second here), captions only
# counted: the captions file is larger so that its records, not the fixed working memory
# of the tokenizer and the allocator's steps, make the difference measured.
N_CONVERSATIONS = 20_000
N_CAPTIONS = 100_000

# Run in a fresh process: resets the peak resident set (VmHWM) after the imports, runs one
# command, prints the peak's growth in bytes.
MEASURE = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import transformers, vlmalign.cli, vlmalign.models.vlm, vlmalign.data.splits  # imported before measuring
open("/proc/self/clear_refs", "w").write("5")  # peak := current
base = status("VmRSS")
rc = vlmalign.cli.main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "peak_growth": status("VmHWM") - base}))
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


def peak_growth(argv: list[str]) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(argv)], capture_output=True, text=True,
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
        growth = peak_growth(argv[0]) - peak_growth(argv[1])
        size = big.stat().st_size - small.stat().st_size
        assert growth <= 3 * size, f"{recipe}: peak grew {growth / 1e6:.1f} MB for {size / 1e6:.1f} MB more data"


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
