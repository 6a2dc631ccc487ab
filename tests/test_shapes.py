"""The built-in `shapes` dataset: determinism, splits, captions, negatives, rendering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmalign.data.formats import load_captions_jsonl, load_sugarcrepe
from vlmalign.data.sample import LoadReport
from vlmalign.data.shapes import (
    COLOURS,
    NEGATIVE_CATEGORIES,
    SHAPES,
    ShapeObject,
    generate_shapes,
    relation_between,
)
from vlmalign.data.shapes_writer import ensure_shapes, write_shapes

N = 100
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, N, seed=0)
    return out


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# An independent reading of a short caption, written without the generator's code:
# mentions ("a large red circle" / "the red circle") and relation words in order.
_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_TOKEN = re.compile(
    rf"\b(?:(a) (small|large) ({_COLOUR}) ({_SHAPE})|(the) ({_COLOUR}) ({_SHAPE})"
    r"|(left of|right of|above|below))\b"
)


def _parse(caption: str) -> list[tuple]:
    """[(mention, rel, mention) or (mention,)], mention = (size or None, colour, shape)."""
    items: list = []
    for m in _TOKEN.finditer(caption):
        if m.group(1):
            items.append(("m", (m.group(2), m.group(3), m.group(4))))
        elif m.group(5):
            items.append(("m", (None, m.group(6), m.group(7))))
        else:
            items.append(("r", m.group(8)))
    clauses, i = [], 0
    while i < len(items):
        assert items[i][0] == "m", caption
        if i + 2 < len(items) and items[i + 1][0] == "r":
            clauses.append((items[i][1], items[i + 1][1], items[i + 2][1]))
            i += 3
        else:
            clauses.append((items[i][1],))
            i += 1
    return clauses


def _true_for(caption: str, objects: list[dict]) -> bool:
    """Whether the caption can be read as true of the scene (relations by centres)."""
    by_kind = {(o["colour"], o["shape"]): o for o in objects}
    assert len(by_kind) == len(objects), "scene objects must have distinct colour+shape"

    def find(mention: tuple) -> dict | None:
        size, colour, shape = mention
        obj = by_kind.get((colour, shape))
        if obj is None or (size is not None and obj["size"] != size):
            return None
        return obj

    for clause in _parse(caption):
        objs = [find(m) for m in (clause[0], clause[-1])]
        if any(o is None for o in objs):
            return False
        if len(clause) == 3:
            a, b, rel = objs[0], objs[1], clause[1]
            ok = {"left of": a["x"] < b["x"], "right of": a["x"] > b["x"],
                  "above": a["y"] < b["y"], "below": a["y"] > b["y"]}[rel]
            if not ok:
                return False
    return True


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, shapes_dir: Path) -> None:
    again = tmp_path / "again"
    write_shapes(again, N, seed=0)
    first, second = _all_files(shapes_dir), _all_files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    write_shapes(other, N, seed=1)
    assert (other / "train.jsonl").read_bytes() != first["train.jsonl"]
    differing = [k for k in first if k.endswith(".png") and (other / k).read_bytes() != first[k]]
    assert len(differing) > N // 2


def test_splits_disjoint_and_counted(shapes_dir: Path) -> None:
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert meta["counts"] == {"train": 80, "val": 10, "test": 10}
    recs = {s: _records(shapes_dir, s) for s in SPLITS}
    assert {s: len(r) for s, r in recs.items()} == meta["counts"]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not {r["short_caption"] for r in recs[a]} & {r["short_caption"] for r in recs[b]}
        assert not {r["id"] for r in recs[a]} & {r["id"] for r in recs[b]}
        scenes_a = {json.dumps(r["objects"], sort_keys=True) for r in recs[a]}
        assert not scenes_a & {json.dumps(r["objects"], sort_keys=True) for r in recs[b]}
    for split_recs in recs.values():
        captions = [r["short_caption"] for r in split_recs]
        assert len(set(captions)) == len(captions)
        assert all(r["caption"] == r["short_caption"] for r in split_recs)


def test_caption_lengths() -> None:
    examples = generate_shapes(600, seed=3)
    short = [len(e.short_caption.split()) for e in examples]
    long = [len(e.long_caption.split()) for e in examples]
    assert max(short) < 30
    assert min(long) > 30 and min(long) >= 40 and max(long) <= 120
    assert {len(e.scene.objects) for e in examples} == {1, 2, 3}


def test_positives_true_negatives_false_and_different() -> None:
    examples = generate_shapes(400, seed=5)
    checked = 0
    for ex in examples:
        objects = [o.to_dict() for o in ex.scene.objects]
        assert _true_for(ex.short_caption, objects), ex.short_caption
        assert len(_parse(ex.short_caption)) == max(1, len(objects) - 1)
        for category, negative in ex.negatives.items():
            assert negative != ex.short_caption
            assert not _true_for(negative, objects), (category, ex.short_caption, negative)
            checked += 1
        if len(objects) == 1:
            assert "swap_att" not in ex.negatives and "replace_rel" not in ex.negatives
    assert checked > 4 * len(examples)


def _first_mentions(caption: str) -> list[tuple]:
    """(size, colour, shape) of each object in order of first mention."""
    mentions = []
    for clause in _parse(caption):
        mentions += [clause[0], clause[2]] if len(clause) == 3 else [clause[0]]
    return [m for m in mentions if m[0] is not None]


def test_negative_categories_edit_what_they_claim() -> None:
    for ex in generate_shapes(200, seed=7):
        pos, neg = ex.short_caption, ex.negatives
        pos_m = _first_mentions(pos)
        if "replace_rel" in neg:  # only relation words change
            changed = [(a, b) for a, b in zip(pos.split(), neg["replace_rel"].split(), strict=True)
                       if a != b]
            assert len(changed) == 1 and changed[0][0] in {"left", "right", "above", "below"}
        neg_m = _first_mentions(neg["replace_obj"])  # exactly one shape differs
        assert [(s, c) for s, c, _ in neg_m] == [(s, c) for s, c, _ in pos_m]
        assert sum(a[2] != b[2] for a, b in zip(pos_m, neg_m, strict=True)) == 1
        neg_m = _first_mentions(neg["replace_att"])  # exactly one size or colour differs
        assert [m[2] for m in neg_m] == [m[2] for m in pos_m]
        assert sum(a != b for a, b in zip(pos_m, neg_m, strict=True)) == 1
        neg_m = _first_mentions(neg["add_obj"])  # the positive's objects plus one new kind
        assert neg_m[:-1] == pos_m and neg_m[-1][1:] not in {m[1:] for m in pos_m}
        if "swap_att" in neg:  # same shapes in place; colours or sizes permuted
            neg_m = _first_mentions(neg["swap_att"])
            assert neg_m != pos_m and [m[2] for m in neg_m] == [m[2] for m in pos_m]
            for k in (0, 1):
                assert sorted(m[k] for m in neg_m) == sorted(m[k] for m in pos_m)


def test_sugarcrepe_files_and_counts(shapes_dir: Path) -> None:
    meta = json.loads((shapes_dir / "meta.json").read_text())
    for folder, split in (("sugarcrepe", "test"), ("sugarcrepe_val", "val")):
        files = sorted(p.stem for p in (shapes_dir / folder).glob("*.json"))
        assert files == sorted(NEGATIVE_CATEGORIES)
        recs = {r["id"]: r for r in _records(shapes_dir, split)}
        multi = sum(len(r["objects"]) >= 2 for r in recs.values())
        for category in NEGATIVE_CATEGORIES:
            data = json.loads((shapes_dir / folder / f"{category}.json").read_text())
            assert len(data) == meta["sugarcrepe"][folder][category]
            assert set(data) <= set(recs)
            for key, item in data.items():
                assert item["caption"] == recs[key]["short_caption"]
                assert item["negative_caption"] == recs[key]["negatives"][category]
                assert (shapes_dir / item["filename"]).is_file()
        assert meta["sugarcrepe"][folder]["replace_att"] == len(recs)
        assert meta["sugarcrepe"][folder]["add_obj"] == len(recs)
        assert meta["sugarcrepe"][folder]["replace_rel"] == multi
    report = LoadReport()
    items = load_sugarcrepe(shapes_dir / "sugarcrepe", report=report)
    assert report.total_skipped() == 0
    assert len(items) == sum(meta["sugarcrepe"]["sugarcrepe"].values())
    assert {i.category for i in items} == set(NEGATIVE_CATEGORIES)


def test_jsonl_loads_back_with_objects(shapes_dir: Path) -> None:
    report = LoadReport()
    samples = load_captions_jsonl(shapes_dir / "train.jsonl", report=report, check_images=True)
    assert report.as_dict()["skipped"] == {} and len(samples) == 80 == report.loaded
    s = samples[0]
    assert s.image.is_absolute() and s.image.is_file()
    assert s.caption == s.short_caption and len(s.long_caption.split()) > 30
    assert {"colour", "shape", "size", "x", "y", "bbox"} <= set(s.meta["objects"][0])


def test_rendered_pixels_match_objects(shapes_dir: Path) -> None:
    for rec in _records(shapes_dir, "test"):
        pixels = np.asarray(Image.open(shapes_dir / rec["image"]).convert("RGB"), dtype=int)
        assert pixels.shape == (224, 224, 3)
        boxes = [o["bbox"] for o in rec["objects"]]
        for obj in rec["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            side = x1 - x0
            assert (40 <= side <= 60) if obj["size"] == "small" else (80 <= side <= 110)
            # centre of the bbox lies inside every shape: it must show the object's colour
            centre = pixels[(y0 + y1) // 2 + 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() < 12, rec["id"]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlap_x = min(a[2], b[2]) - max(a[0], b[0])
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_x <= 0 or overlap_y <= 0, rec["id"]
        corner = pixels[0, 0]
        assert corner.min() > 200  # light background


def test_relation_between_picks_the_dominant_separated_axis() -> None:
    def obj(x0: int, y0: int, side: int = 40) -> ShapeObject:
        return ShapeObject("red", "circle", "small", x0 + side // 2, y0 + side // 2,
                           (x0, y0, x0 + side, y0 + side))

    assert relation_between(obj(0, 0), obj(100, 10)) == "left of"
    assert relation_between(obj(100, 10), obj(0, 0)) == "right of"
    assert relation_between(obj(10, 0), obj(0, 100)) == "above"
    assert relation_between(obj(0, 150), obj(100, 0)) == "below"  # dy 150 > dx 100
    assert relation_between(obj(0, 0), obj(20, 20)) is None  # overlapping boxes


def test_rejects_bad_split_fractions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to less than 1"):
        write_shapes(tmp_path, 10, val_fraction=0.5, test_fraction=0.5)


def test_ensure_shapes_reuses_matching_data(tmp_path: Path) -> None:
    ensure_shapes(tmp_path, 12, seed=4)
    (tmp_path / "train.jsonl").write_text("sentinel")
    ensure_shapes(tmp_path, 12, seed=4)  # same arguments: nothing rewritten
    assert (tmp_path / "train.jsonl").read_text() == "sentinel"
    meta = ensure_shapes(tmp_path, 12, seed=5)  # other seed: rewritten
    assert meta["seed"] == 5 and (tmp_path / "train.jsonl").read_text() != "sentinel"


_REGIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "centre": (1, 1),
            "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}


def test_karpathy_file_holds_five_true_captions_per_image(shapes_dir: Path) -> None:
    """Short, long, then 3 paraphrases, each true of the scene (read independently:
    mentions, relations by centres, counts, regions by thirds of the canvas)."""
    data = json.loads((shapes_dir / "karpathy_shapes.json").read_text())
    records = {r["id"]: (split, r) for split in SPLITS for r in _records(shapes_dir, split)}
    assert data["dataset"] == "shapes" and len(data["images"]) == N
    counts = {"one": 1, "two": 2, "three": 3}
    reversed_relations = 0
    for img in data["images"]:
        split, rec = records[img["id"]]
        assert img["split"] == split and f"{img['filepath']}/{img['filename']}" == rec["image"]
        raws = [s["raw"] for s in img["sentences"]]
        assert len(raws) == len(set(raws)) == 5
        assert raws[:2] == [rec["short_caption"], rec["long_caption"]]
        assert img["sentences"][2]["tokens"] == re.findall(r"[a-z0-9]+", raws[2].lower())
        objs = rec["objects"]
        for raw in raws[2:]:
            assert _true_for(raw, objs), raw
            mentioned = {m[1:] for clause in _parse(raw) for m in (clause[0], clause[-1])}
            assert mentioned == {(o["colour"], o["shape"]) for o in objs}, raw  # every object, once
        count = re.match(r"a picture of (one|two|three) shapes?: ", raws[3])
        assert count and counts[count.group(1)] == len(objs), raws[3]
        third = 224 / 3
        for obj, region in zip(objs, re.findall(
                r"(?:a (?:small|large) \w+ \w+) (?:at the |on the |in the )(top left|top right|bottom left"
                r"|bottom right|top|bottom|left|right|centre)\b", raws[4]), strict=True):
            assert _REGIONS[region] == (min(2, int(obj["y"] // third)), min(2, int(obj["x"] // third))), raws[4]
        if len(objs) == 2:  # the relation is told from the other side
            assert _parse(raws[2])[0][1] != _parse(raws[0])[0][1]
            reversed_relations += 1
    assert reversed_relations > 0


def test_zeroshot_images_are_extra_and_deterministic(shapes_dir: Path, tmp_path: Path) -> None:
    zs = sorted(p.relative_to(shapes_dir) for p in (shapes_dir / "zeroshot").rglob("*.png"))
    assert len(zs) == 48 and str(zs[0]) == "zeroshot/blue_circle/zs_blue_circle_large.png"
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert meta["zeroshot"]["classes"] == 24 and meta["karpathy"]["file"] == "karpathy_shapes.json"
    listed = {r["image"] for split in SPLITS for r in _records(shapes_dir, split)}
    assert not any(str(p) in listed for p in zs)  # not a training or test image


def test_ensure_shapes_adds_benchmark_files_to_older_data(tmp_path: Path) -> None:
    ensure_shapes(tmp_path, 12, seed=4)
    first = (tmp_path / "karpathy_shapes.json").read_bytes()
    (tmp_path / "karpathy_shapes.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "zeroshot")
    ensure_shapes(tmp_path, 12, seed=4)
    assert (tmp_path / "karpathy_shapes.json").read_bytes() == first
    assert len(list((tmp_path / "zeroshot").rglob("*.png"))) == 48
