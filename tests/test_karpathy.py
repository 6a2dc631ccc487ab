"""Karpathy-split loader (COCO / Flickr30k format) and the 5-captions retrieval protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmalign.data.karpathy import load_karpathy
from vlmalign.data.sample import LoadReport
from vlmalign.eval.metrics import retrieval_metrics


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def _sentences(*raws: str) -> list[dict]:
    return [{"raw": r, "tokens": r.lower().split()} for r in raws]


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    """A COCO-style file: test images in val2014/, one train, one restval, bad records."""
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"):
        _png(tmp_path / "val2014" / name)
    five = [f"caption {i}" for i in range(5)]
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "imgid": 0, "sentences": _sentences(*five)},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train", "imgid": 1, "sentences": _sentences("t")},
        # six captions (COCO has a few): all kept
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "imgid": 2,
         "sentences": _sentences(*[f"c{i}" for i in range(6)])},
        {"filepath": "val2014", "filename": "missing.jpg", "split": "test", "imgid": 3, "sentences": _sentences("x")},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "imgid": 4, "sentences": []},
        # one empty sentence dropped, a sentence with tokens only kept as joined tokens
        {"filepath": "val2014", "filename": "e.jpg", "split": "test", "imgid": 5,
         "sentences": [{"raw": "  "}, {"tokens": ["two", "dogs"]}, {"raw": " A cat. "}]},
        {"filepath": "val2014", "filename": "f.jpg", "split": "restval", "imgid": 6, "sentences": _sentences("r")},
        "not a record",
        {"filepath": "val2014", "split": "test", "sentences": _sentences("no filename")},
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_loads_the_test_split_with_every_caption_and_counts_skips(coco: Path) -> None:
    report = LoadReport()
    images, captions, t2i = load_karpathy(coco, coco.parent, "test", report)
    assert [p.name for p in images] == ["a.jpg", "c.jpg", "e.jpg"]
    assert images[0] == coco.parent / "val2014" / "a.jpg"
    assert captions == [f"caption {i}" for i in range(5)] + [f"c{i}" for i in range(6)] + ["two dogs", "A cat."]
    assert t2i.dtype == torch.long and t2i.tolist() == [0] * 5 + [1] * 6 + [2] * 2
    assert report.skipped == {
        "missing_image": 1, "no_captions": 1, "empty_caption": 1, "not_an_object": 1, "missing_key": 1,
    }
    assert report.loaded == 3


def test_train_with_restval_and_max_captions(coco: Path) -> None:
    images, captions, _ = load_karpathy(coco, coco.parent, ("train", "restval"))
    assert [p.name for p in images] == ["b.jpg", "f.jpg"] and captions == ["t", "r"]
    _, captions, t2i = load_karpathy(coco, coco.parent, "test", max_captions=5)
    assert t2i.tolist().count(1) == 5  # the 6-caption image cut to 5


def test_flickr_layout_without_filepath(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "1000.jpg")
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1000.jpg", "split": "test", "sentences": _sentences("a", "b", "c", "d", "e")}]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    images, captions, t2i = load_karpathy(path, tmp_path / "imgs")
    assert images == [tmp_path / "imgs" / "1000.jpg"] and len(captions) == 5 and t2i.tolist() == [0] * 5


def test_clear_errors(tmp_path: Path, coco: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_karpathy(coco, coco.parent, "testing")
    only_train = tmp_path / "train_only.json"
    only_train.write_text(json.dumps({"images": [{"filename": "b.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(ValueError, match="splits present"):
        load_karpathy(only_train, tmp_path, "test")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid"):
        load_karpathy(bad, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_karpathy(tmp_path / "nope.json", tmp_path)


def test_five_caption_protocol_by_hand() -> None:
    """3 images x 5 captions. i2t: a hit at K if ANY own caption is in the image's top K;
    t2i: each caption ranks the 3 images."""
    t2i = torch.arange(3).repeat_interleave(5)  # [15]
    sim = torch.zeros(3, 15)
    # image 0: own caption 3 scores best of all -> i2t rank 0
    sim[0] = torch.tensor([0.1, 0.1, 0.1, 0.9, 0.1] + [0.5] * 5 + [0.2] * 5)
    # image 1: best own caption 0.6, beaten by two captions of image 2 -> rank 2
    sim[1] = torch.tensor([0.0] * 5 + [0.6, 0.1, 0.1, 0.1, 0.1] + [0.7, 0.8, 0.0, 0.0, 0.0])
    # image 2: all own captions 0.3, beaten by all 10 others at 0.4 -> rank 10
    sim[2] = torch.tensor([0.4] * 10 + [0.3] * 5)
    m = retrieval_metrics(sim, t2i)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)  # image 0
    assert m["i2t_R@5"] == pytest.approx(200 / 3)  # images 0, 1
    assert m["i2t_R@10"] == pytest.approx(200 / 3)  # image 2 ranks at 10 (0-based): miss
    # t2i: caption j's rank = other images scoring >= its own image's score.
    # image-0 captions: col 3 (0.9 vs 0, 0.4) rank 0; cols 0,1,2,4 (0.1 vs 0.0, 0.4) rank 1.
    # image-1 captions: col 5 (0.6 vs 0.5, 0.4) rank 0; cols 6-9 (0.1 vs 0.5, 0.4) rank 2.
    # image-2 captions: col 10, 11 (0.3 vs 0.2, 0.7 / 0.8) rank 1; cols 12-14 (0.3 vs 0.2, 0.0) rank 0.
    assert m["t2i_R@1"] == pytest.approx(100 * 5 / 15)  # cols 3, 5, 12, 13, 14
    assert m["t2i_R@5"] == pytest.approx(100.0)


def test_shapes_writes_a_loadable_karpathy_file(shapes_root: Path) -> None:
    test_records = [json.loads(line) for line in (shapes_root / "test.jsonl").read_text().splitlines()]
    report = LoadReport()
    images, captions, t2i = load_karpathy(shapes_root / "karpathy_shapes.json", shapes_root, "test", report)
    assert report.total_skipped() == 0
    assert [p.name for p in images] == [Path(r["image"]).name for r in test_records]
    assert torch.equal(torch.bincount(t2i), torch.full((len(images),), 5))
    assert captions[0::5] == [r["short_caption"] for r in test_records]
    assert captions[1::5] == [r["long_caption"] for r in test_records]
    all_images, _, _ = load_karpathy(shapes_root / "karpathy_shapes.json", shapes_root, ("train", "val", "test"))
    assert len(all_images) == json.loads((shapes_root / "meta.json").read_text())["n"]
