"""Loaders (JSONL captions, SugarCrepe) and `load_image` on real files with bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmalign.data.formats import load_captions_jsonl, load_sugarcrepe
from vlmalign.data.images import BadImageError, load_image
from vlmalign.data.sample import LoadReport


def _png(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    _png(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------- JSONL captions


@pytest.fixture()
def caption_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", seed=1)
    _truncated_png(tmp_path / "img" / "broken.png")
    lines = [
        json.dumps({"image": "img/a.png", "caption": "a cat"}),  # 1 good
        json.dumps({"id": "x7", "image": "img/b.png", "short_caption": "a dog",
                    "long_caption": "a brown dog on grass", "source": "web"}),  # 2 good
        '{"image": "img/a.png", "caption": "unterminated',  # 3 malformed
        "",  # 4 blank: ignored, not counted
        json.dumps([1, 2]),  # 5 not an object
        json.dumps({"caption": "no image key"}),  # 6 missing key
        json.dumps({"image": "img/a.png", "caption": 5}),  # 7 wrong type
        json.dumps({"image": "img/a.png", "caption": "   "}),  # 8 empty caption
        json.dumps({"image": "img/missing.png", "caption": "gone"}),  # 9 missing image
        json.dumps({"image": "img/broken.png", "caption": "truncated"}),  # 10 bad with check
        "   ",  # 11 blank
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_jsonl_skips_bad_lines_with_reasons(caption_dir: Path) -> None:
    report = LoadReport()
    samples = load_captions_jsonl(caption_dir / "data.jsonl", report=report, check_images=True)
    assert [s.caption for s in samples] == ["a cat", "a dog"]
    d = report.as_dict()
    assert d["loaded"] == 2
    assert d["skipped"] == {
        "malformed_json": 1, "not_an_object": 1, "missing_key": 1, "wrong_type": 1,
        "empty_caption": 1, "missing_image": 1, "bad_image": 1,
    }
    assert report.total_skipped() == 7
    path = str(caption_dir / "data.jsonl")
    assert d["examples"]["malformed_json"][0].startswith(f"{path}:3:")
    assert d["examples"]["wrong_type"][0].startswith(f"{path}:7:")
    assert d["examples"]["missing_image"][0].startswith(f"{path}:9:")
    assert d["examples"]["bad_image"][0].startswith(f"{path}:10:")
    assert "skipped 7" in report.summary() and "bad_image" in report.summary()


def test_jsonl_fields_ids_and_paths(caption_dir: Path) -> None:
    samples = load_captions_jsonl(caption_dir / "data.jsonl")
    a, b = samples[0], samples[1]
    assert a.id == "data:1" and b.id == "x7"
    assert a.image == (caption_dir / "img" / "a.png").resolve() and a.image.is_absolute()
    assert (b.caption, b.short_caption, b.long_caption) == ("a dog", "a dog", "a brown dog on grass")
    assert b.meta == {"source": "web"}
    # without check_images the truncated file is not decoded, so its record is kept
    assert [s.caption for s in samples][-1] == "truncated"


def test_jsonl_caption_field_and_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "pic.png")
    (tmp_path / "sub").mkdir()
    line = {"image": "pic.png", "short_caption": "short", "long_caption": "long text"}
    (tmp_path / "sub" / "d.jsonl").write_text(json.dumps(line) + "\n")
    report = LoadReport()
    assert load_captions_jsonl(tmp_path / "sub" / "d.jsonl", report=report) == []
    assert report.skipped == {"missing_image": 1}  # resolved against sub/, the JSONL folder
    got = load_captions_jsonl(tmp_path / "sub" / "d.jsonl", image_root=tmp_path,
                              caption_field="long_caption")
    assert got[0].caption == "long text"
    got = load_captions_jsonl(tmp_path / "sub" / "d.jsonl", image_root=tmp_path)
    assert got[0].caption == "short"  # no "caption" key: falls back to short_caption


def test_jsonl_missing_file_and_clean_report(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_captions_jsonl(tmp_path / "nope.jsonl")
    _png(tmp_path / "a.png")
    (tmp_path / "ok.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "caption": "ok"}).encode() + b"\n\xff\xfe\n"
    )
    report = LoadReport()
    assert len(load_captions_jsonl(tmp_path / "ok.jsonl", report=report)) == 1
    assert report.skipped == {"bad_encoding": 1}
    assert LoadReport().summary() == ""


# ---------------------------------------------------------------- SugarCrepe


def _sugarcrepe_dir(root: Path) -> Path:
    (root / "images").mkdir()
    _png(root / "images" / "1.png")
    _png(root / "images" / "2.png", seed=2)
    folder = root / "sugarcrepe"
    folder.mkdir()
    (folder / "replace_att.json").write_text(json.dumps({
        "0": {"filename": "images/1.png", "caption": "a red cube", "negative_caption": "a blue cube"},
        "1": {"filename": "images/2.png", "caption": "a dog", "negative_caption": "a dog"},
        "2": {"filename": "images/none.png", "caption": "x", "negative_caption": "y"},
    }))
    (folder / "swap_att.json").write_text(json.dumps({
        "5": {"filename": "images/2.png", "caption": "a big cat", "negative_caption": "a cat big"},
        "6": {"filename": "images/1.png", "caption": "a cat"},
    }))
    return folder


def test_sugarcrepe_directory(tmp_path: Path) -> None:
    folder = _sugarcrepe_dir(tmp_path)
    report = LoadReport()
    items = load_sugarcrepe(folder, report=report)
    assert [(i.category, i.id) for i in items] == [("replace_att", "0"), ("swap_att", "5")]
    assert items[0].image == (tmp_path / "images" / "1.png").resolve()  # found via the parent
    assert items[0].negative_caption == "a blue cube"
    assert report.skipped == {"identical_negative": 1, "missing_image": 1, "missing_key": 1}
    assert report.as_dict()["examples"]["missing_key"][0].startswith(f"{folder / 'swap_att.json'}:6")
    (folder / "broken.json").write_text("{not json")
    report = LoadReport()
    assert len(load_sugarcrepe(folder, report=report)) == 2
    assert report.skipped["malformed_json"] == 1


def test_sugarcrepe_single_file_and_list(tmp_path: Path) -> None:
    folder = _sugarcrepe_dir(tmp_path)
    items = load_sugarcrepe(folder / "swap_att.json", image_root=tmp_path)
    assert [(i.category, i.caption) for i in items] == [("swap_att", "a big cat")]
    records = [
        {"image": "images/1.png", "caption": "p", "negative_caption": "n", "category": "add_obj"},
        {"filename": "images/2.png", "caption": "p2", "negative_caption": "n2"},
        "oops",
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    report = LoadReport()
    items = load_sugarcrepe(tmp_path / "mixed.json", report=report)
    assert [(i.category, i.id) for i in items] == [("add_obj", "mixed-0"), ("mixed", "mixed-1")]
    assert report.skipped == {"not_an_object": 1}
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(ValueError, match="bad.json"):
        load_sugarcrepe(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_sugarcrepe(tmp_path / "absent")


# ---------------------------------------------------------------- load_image


def test_load_image_converts_modes(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 77).save(tmp_path / "gray.png")
    img = load_image(tmp_path / "gray.png")
    assert img.mode == "RGB" and img.size == (4, 3) and img.getpixel((0, 0)) == (77, 77, 77)

    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white -> mid grey
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((2, 0)))

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert load_image(tmp_path / "cmyk.tif").getpixel((1, 1)) == (255, 0, 0)

    deep = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    got = np.asarray(img)[..., 0]
    assert got.tolist() == [[0, 128], [255, 4]]  # scaled by 1/257, not clipped at 255

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    img = load_image(tmp_path / "pal.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (200, 100, 50)


@pytest.mark.parametrize("kind", ["missing", "tiny", "truncated", "garbage", "empty"])
def test_load_image_rejects_bad_files(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "tiny":
        Image.new("RGB", (1, 1)).save(path)
    elif kind == "truncated":
        _truncated_png(path)
    elif kind == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and info.value.path == path
    expected = {"missing": "not found", "tiny": "1x1", "truncated": "truncated",
                "garbage": "unreadable", "empty": "unreadable"}[kind]
    assert expected in info.value.reason
