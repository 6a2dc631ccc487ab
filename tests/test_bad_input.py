"""The bad-input matrix (issue 9): every kind of broken data gives a counted skip with its
reason and `file:line`, a conversion, or an error naming the file, the position and the
fix; never a crash mid-run and never a silent drop. Real files written to tmp_path.

The user's own folder and real-size files (issue 18) have their cases in
tests/test_user_data.py (a folder hashed before and after every command, held-out
evaluation, ScienceQA options, invalid JSON at the CLI, skipped.jsonl, counts, the run
lock, provenance) and tests/test_large_input.py (streamed checks within 3x a file's size)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
from vlmalign.data.conversations import load_conversations
from vlmalign.data.formats import load_captions_jsonl, load_sugarcrepe
from vlmalign.data.images import load_image
from vlmalign.data.sample import DataQualityError, LoadReport

# ---------------------------------------------------------------- real image bytes


def _noise(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): gray [H, W] or RGB [H, W, 3]."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


JPEG = _encode(Image.fromarray(_noise(64, 64)), "JPEG", quality=90)
PNG = _encode(Image.fromarray(_noise(64, 64)), "PNG")
RGBA = np.zeros((4, 4, 4), dtype=np.uint8)
RGBA[..., 0], RGBA[..., 3] = 255, 0  # red, fully transparent -> white
RGBA[0, 0] = (0, 0, 255, 255)  # one opaque blue pixel

# name -> (file bytes, expected skip detail or None, check of the loaded RGB image)
IMAGES: dict[str, tuple[bytes | None, str | None, Callable[[Image.Image], bool] | None]] = {
    "unreadable bytes": (b"<html>404 not found</html>" * 20, "unreadable", None),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "truncated", None),
    "truncated PNG": (PNG[: len(PNG) // 2], "truncated", None),
    "zero-byte file": (b"", "empty (0 bytes)", None),
    "1x1 image": (_encode(Image.new("RGB", (1, 1)), "PNG"), "1x1 pixels", None),
    "1x50 image": (_encode(Image.new("RGB", (1, 50)), "PNG"), "1x50 pixels", None),
    "missing file": (None, "not found", None),
    "grayscale JPEG": (_encode(Image.new("L", (8, 8), 90), "JPEG"),
                       None, lambda im: len(set(im.getpixel((3, 3)))) == 1 and abs(im.getpixel((3, 3))[0] - 90) <= 2),
    "CMYK JPEG": (_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
                  None, lambda im: np.abs(np.subtract(im.getpixel((4, 4)), (255, 0, 0))).max() <= 3),
    "RGBA PNG": (_encode(Image.fromarray(RGBA, "RGBA"), "PNG"),
                 None, lambda im: im.getpixel((1, 1)) == (255, 255, 255) and im.getpixel((0, 0)) == (0, 0, 255)),
    "16-bit gray PNG": (_png16(np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)),
                        None, lambda im: np.asarray(im)[..., 0].tolist() == [[0, 255], [128, 4]]),
    "16-bit RGB PNG": (_png16(np.full((3, 3, 3), (65535, 32896, 0), dtype=np.uint16)),
                       None, lambda im: im.getpixel((1, 1)) == (255, 128, 0)),
}


@dataclass
class Outcome:
    """What a loader made of one record: loaded ids, skips by reason, repairs, examples."""

    samples: list
    report: LoadReport

    @property
    def skipped(self) -> dict[str, int]:
        return self.report.skipped

    def example(self, reason: str) -> str:
        return self.report.as_dict()["examples"][reason][0]


def _captions(root: Path, lines: list[str | bytes], **kw) -> Outcome:
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    report = LoadReport()
    return Outcome(load_captions_jsonl(path, report=report, **kw), report)


# ---------------------------------------------------------------- images, through the loader


@pytest.mark.parametrize("case", list(IMAGES))
def test_image_matrix(tmp_path: Path, case: str) -> None:
    data, detail, check = IMAGES[case]
    if data is not None:
        (tmp_path / "img.bin").write_bytes(data)
    line = json.dumps({"image": "img.bin", "caption": "a picture"})
    got = _captions(tmp_path, [line], check_images=True)
    if detail is None:  # converted, never skipped
        assert got.skipped == {} and len(got.samples) == 1
        img = load_image(got.samples[0].image)
        assert img.mode == "RGB" and check(img)
    else:
        reason = "missing_image" if data is None else "bad_image"
        assert got.samples == [] and got.skipped == {reason: 1}
        example = got.example(reason)
        assert example.startswith(f"{tmp_path / 'data.jsonl'}:1:") and detail in example


def test_decompression_bomb_is_a_counted_skip(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "big.png").write_bytes(_encode(Image.new("RGB", (64, 64)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: PIL's hard limit
    got = _captions(tmp_path, [json.dumps({"image": "big.png", "caption": "x"})], check_images=True)
    assert got.skipped == {"bad_image": 1} and "MAX_IMAGE_PIXELS" in got.example("bad_image")


# ---------------------------------------------------------------- records of a captions JSONL

OK = {"image": "a.png", "caption": "a red circle"}

# name -> (line, reason, substring of the example after "file:line: ")
RECORDS: dict[str, tuple[str | bytes, str, str]] = {
    "empty caption": (json.dumps({"image": "a.png", "caption": ""}), "empty_caption", "'caption' is empty"),
    "whitespace caption": (json.dumps({"image": "a.png", "caption": " \t "}), "empty_caption", "is empty"),
    "malformed JSON": ('{"image": "a.png", "caption": "unterminated', "malformed_json", "column"),
    "trailing comma": ('{"image": "a.png", "caption": "x",}', "malformed_json", "Expecting property name"),
    "not an object": (json.dumps(["a.png", "x"]), "not_an_object", "got array"),
    "missing image key": (json.dumps({"caption": "x"}), "missing_key", "no 'image' key"),
    "missing caption key": (json.dumps({"image": "a.png", "text": "x"}), "missing_key", "no 'caption'"),
    "caption is a number": (json.dumps({"image": "a.png", "caption": 5}), "wrong_type", "got number"),
    "caption is null": (json.dumps({"image": "a.png", "caption": None}), "wrong_type", "got null"),
    "image is a list": (json.dumps({"image": ["a.png"], "caption": "x"}), "wrong_type", "'image' must be"),
    "id is an object": (json.dumps({"id": {"n": 1}, "image": "a.png", "caption": "x"}), "wrong_type", "'id' must be"),
    "non-UTF-8 line": (b'{"image": "a.png", "caption": "caf\xe9"}', "bad_encoding", "byte 0xe9 at file offset"),
    "path escapes root": (json.dumps({"image": "../../etc/passwd", "caption": "x"}), "outside_root", "outside the data root"),
    "absolute path outside": (json.dumps({"image": "/etc/hostname", "caption": "x"}), "outside_root", "allow_outside_root"),
    "image missing": (json.dumps({"image": "nope.png", "caption": "x"}), "missing_image", "not found"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_record_matrix(tmp_path: Path, case: str) -> None:
    line, reason, detail = RECORDS[case]
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(_noise()).save(root / "a.png")
    got = _captions(root, [json.dumps(OK), line, json.dumps({**OK, "caption": "a blue star"})])
    assert [s.caption for s in got.samples] == ["a red circle", "a blue star"]  # neighbours survive
    assert got.skipped == {reason: 1} and got.report.loaded == 2
    assert got.example(reason).startswith(f"{root / 'data.jsonl'}:2: ") and detail in got.example(reason)


def test_non_utf8_offset_is_the_byte_in_the_file(tmp_path: Path) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    first = json.dumps(OK).encode()
    bad = b'{"image": "a.png", "caption": "caf\xe9"}'
    got = _captions(tmp_path, [b"\xef\xbb\xbf" + first, bad])  # a BOM, then the bad line
    offset = 3 + len(first) + 1 + bad.index(b"\xe9")
    assert f"file offset {offset} " in got.example("bad_encoding") and "iconv" in got.example("bad_encoding")
    assert (tmp_path / "data.jsonl").read_bytes()[offset] == 0xE9


def test_utf16_file_is_an_error_not_a_skip_per_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(OK) + "\n").encode("utf-16"))
    with pytest.raises(ValueError, match=r"data\.jsonl is UTF-16-encoded.*re-encode it as UTF-8"):
        load_captions_jsonl(path)


def test_outside_root_allowed_by_flag_and_symlinks_inside_root_followed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(_noise()).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    lines = [json.dumps({"image": "../outside.png", "caption": "up"}),
             json.dumps({"image": str(tmp_path / "outside.png"), "caption": "absolute"}),
             json.dumps({"image": "link.png", "caption": "a link the root's owner made"}),
             json.dumps({"image": "sub/../link.png", "caption": "dots that stay inside"})]
    got = _captions(root, lines)
    assert [s.caption for s in got.samples] == ["a link the root's owner made", "dots that stay inside"]
    assert got.skipped == {"outside_root": 2}
    got = _captions(root, lines, allow_outside_root=True)
    assert len(got.samples) == 4 and got.skipped == {}
    assert got.samples[0].image == (tmp_path / "outside.png").resolve()


def test_duplicate_ids_are_kept_renamed_and_exact_duplicates_skipped(tmp_path: Path) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    a = json.dumps({"id": "7", "image": "a.png", "caption": "a red circle"})
    lines = [a, json.dumps({"id": "7", "image": "a.png", "caption": "a second caption of the image"}),
             a, json.dumps({"id": 7, "image": "a.png", "caption": "third"}), json.dumps(OK), json.dumps(OK)]
    got = _captions(tmp_path, lines)
    assert [s.id for s in got.samples] == ["7", "7#2", "7#3", "data:5"]
    assert got.skipped == {"duplicate_record": 2}
    assert got.report.repaired == {"duplicate_id": 2}
    path = tmp_path / "data.jsonl"
    assert got.example("duplicate_record") == f"{path}:3: identical to the record at {path}:1"
    assert "Repaired: 2 duplicate_id" in got.report.summary() and "kept as '7#2'" in got.report.summary()


def test_overlong_caption_keeps_at_least_one_label_token() -> None:
    from vlmalign.models.language import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    collator = CaptionCollator(tok, tok.convert_tokens_to_ids("<image>"), 4, max_caption_tokens=1)
    batch = collator([{"index": 0, "caption": "a large blue square left of a small green star " * 20},
                      {"index": 1, "caption": "a red circle"}])
    assert collator.truncated == 2
    labels = batch["labels"]  # [B, T]
    assert ((labels != IGNORE_INDEX).sum(1) == 2).all()  # one caption token + eos, per row
    assert (labels[:, :4] == IGNORE_INDEX).all()


# ---------------------------------------------------------------- conversations


def _conv(rid, turns, image="a.png"):
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    return rec | ({"image": image} if image else {})


QA = [("human", "<image>\nWhat is it?"), ("gpt", "A circle.")]


@pytest.mark.parametrize("case,record,reason,detail", [
    ("no assistant turn", _conv("1", [("human", "<image>\nHi")]), "no_assistant_turn", "no 'gpt' turn"),
    ("only the assistant", _conv("1", [("gpt", "A circle.")]), "not_alternating", "turn 0 is assistant"),
    ("ends with the user", _conv("1", QA + [("human", "And?")]), "ends_with_user", "no answer"),
    ("empty turn", _conv("1", [("human", "<image>\nQ"), ("gpt", " ")]), "empty_value", "turn 1"),
    ("unknown role", _conv("1", [("human", "<image>\nQ"), ("bot", "A")]), "unknown_role", "'bot'"),
    ("conversations is a string", {"id": "1", "image": "a.png", "conversations": "hi"}, "wrong_type", "must be a list"),
    ("value is a number", _conv("1", [("human", "<image>\nQ"), ("gpt", 3)]), "wrong_type", "turn 1: 'value'"),
    ("no conversations key", {"id": "1", "image": "a.png"}, "missing_key", "no 'conversations'"),
    ("path escapes root", _conv("1", QA, image="../../etc/passwd"), "outside_root", "outside the data root"),
    ("missing image", _conv("1", QA, image="nope.png"), "missing_image", "not found"),
])
def test_conversation_matrix(tmp_path: Path, case, record, reason, detail) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    path = tmp_path / "convs.json"
    path.write_text(json.dumps([_conv("ok", QA), record]))
    report = LoadReport()
    convs = load_conversations(path, report=report)
    assert [c.id for c in convs] == ["ok"] and report.skipped == {reason: 1}
    example = report.as_dict()["examples"][reason][0]
    assert example.startswith(f"{path}:[1]: ") and detail in example


def test_conversation_duplicate_ids_and_records(tmp_path: Path) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    other = [("human", "<image>\nColour?"), ("gpt", "Red.")]
    path = tmp_path / "convs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_conv("9", QA), _conv("9", other), _conv("9", QA)]) + "\n")
    report = LoadReport()
    convs = load_conversations(path, report=report)
    assert [c.id for c in convs] == ["9", "9#2"]
    assert report.skipped == {"duplicate_record": 1} and report.repaired == {"duplicate_id": 1}


def test_conversation_encoding_errors(tmp_path: Path) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    text = json.dumps([_conv("1", QA)], indent=1).encode()
    pos = text.index(b"circle")
    bad = text[:pos] + b"\xff" + text[pos + 1:]
    (tmp_path / "convs.json").write_bytes(bad)
    line = bad[:pos].count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"convs\.json is not UTF-8: byte 0xff at offset {pos} \(line {line}, column \d+"):
        load_conversations(tmp_path / "convs.json")
    (tmp_path / "convs.json").write_bytes(text[:-3])
    with pytest.raises(ValueError, match=r"convs\.json is not valid JSON: .* at line \d+, column \d+"):
        load_conversations(tmp_path / "convs.json")
    lines = [json.dumps(_conv("1", QA)).encode(), json.dumps(_conv("2", QA)).encode().replace(b"circle", b"circl\xe9")]
    (tmp_path / "convs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = LoadReport()
    assert [c.id for c in load_conversations(tmp_path / "convs.jsonl", report=report)] == ["1"]
    assert report.skipped == {"bad_encoding": 1}
    assert report.as_dict()["examples"]["bad_encoding"][0].startswith(f"{tmp_path / 'convs.jsonl'}:2: not UTF-8")


# ---------------------------------------------------------------- SugarCrepe


def test_sugarcrepe_duplicate_keys_escape_and_encoding(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.fromarray(_noise()).save(tmp_path / "images" / "1.png")
    folder = tmp_path / "sugarcrepe"
    folder.mkdir()
    rec = '{"filename": "images/1.png", "caption": "%s", "negative_caption": "%s"}'
    # "0" twice: json.loads would keep only the second, silently
    (folder / "replace_att.json").write_text(
        "{" + ", ".join([f'"0": {rec % ("a red cube", "a blue cube")}',
                         f'"0": {rec % ("a big cube", "a small cube")}',
                         f'"1": {rec % ("a big cube", "a small cube")}',
                         '"2": {"filename": "../../etc/passwd", "caption": "a", "negative_caption": "b"}']) + "}")
    (folder / "swap_att.json").write_text(json.dumps({"0": json.loads(rec % ("a cat", "a dog"))}))
    (folder / "latin1.json").write_bytes(json.dumps({"0": json.loads(rec % ("x", "y"))}).encode().replace(b"x", b"\xe9"))
    report = LoadReport()
    items = load_sugarcrepe(folder, report=report)
    assert [(i.category, i.id, i.caption) for i in items] == [
        ("replace_att", "0", "a red cube"), ("replace_att", "0#2", "a big cube"), ("swap_att", "0", "a cat")]
    assert report.skipped == {"duplicate_record": 1, "outside_root": 1, "malformed_json": 1}
    assert report.repaired == {"duplicate_id": 1}  # "0" again in swap_att is another category: no repair
    assert "not UTF-8: byte 0xe9 at offset" in report.as_dict()["examples"]["malformed_json"][0]
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8: byte 0xe9 at offset \d+ \(line 1"):
        load_sugarcrepe(folder / "latin1.json")


# ---------------------------------------------------------------- --max-skip-fraction


def test_check_skip_fraction() -> None:
    report = LoadReport()
    report.loaded = 3
    for i in range(7):
        report.skip("missing_image", f"train.jsonl:{i + 1}", "image file x not found")
    with pytest.raises(DataQualityError, match=r"training data: 7 of 10 records \(70\.0%\) .*data\.max_skip_fraction=0\.5") as info:
        report.check_skip_fraction(0.5, "training data")
    assert "train.jsonl:1: image file x not found" in str(info.value)  # the first example
    assert isinstance(info.value, ValueError)
    assert report.check_skip_fraction(0.7, "training data") == pytest.approx(0.7)  # not above: fine
    assert report.check_skip_fraction(1.0) == pytest.approx(0.7)
    assert LoadReport().check_skip_fraction(0.0) == 0.0  # nothing read: nothing to judge


def test_a_mostly_broken_file_is_caught_by_the_skip_fraction(tmp_path: Path) -> None:
    Image.fromarray(_noise()).save(tmp_path / "a.png")
    lines = [json.dumps(OK)] + [json.dumps({"image": f"img/{i}.png", "caption": "x"}) for i in range(3)]
    got = _captions(tmp_path, lines)
    assert got.report.loaded == 1 and got.skipped == {"missing_image": 3}
    with pytest.raises(DataQualityError, match=rf"3 of 4 records .*{os.sep}img{os.sep}0\.png not found"):
        got.report.check_skip_fraction(0.5, "training data")
