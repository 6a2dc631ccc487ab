"""Zero-shot classification data: the image-folder loader and CLIP-style class embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmalign.data.classification import class_embeddings, load_image_folder
from vlmalign.data.sample import LoadReport
from vlmalign.data.shapes import COLOURS, SHAPES


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_image_folder_labels_names_and_skips(tmp_path: Path) -> None:
    _png(tmp_path / "tabby_cat" / "1.png")
    _png(tmp_path / "tabby_cat" / "sub" / "2.JPG")  # nested and upper-case extension
    _png(tmp_path / "dog" / "3.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("x")
    (tmp_path / "dog" / ".DS_Store").write_text("x")  # dot files are ignored, not counted
    (tmp_path / "empty").mkdir()
    (tmp_path / "stray.png").write_bytes(b"")
    report = LoadReport()
    folder = load_image_folder(tmp_path, report)
    assert folder.folders == ["dog", "empty", "tabby_cat"]  # sorted, as torchvision's ImageFolder
    assert folder.class_names == ["dog", "empty", "tabby cat"]
    assert [p.name for p in folder.images] == ["3.jpg", "1.png", "2.JPG"]
    assert folder.labels.tolist() == [0, 2, 2]
    assert report.skipped == {"not_an_image": 1, "empty_class": 1, "outside_class_folder": 1}
    assert report.loaded == 3


def test_class_names_file_maps_folders(tmp_path: Path) -> None:
    _png(tmp_path / "n01440764" / "a.png")
    _png(tmp_path / "n01443537" / "b.png")
    (tmp_path / "class_names.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    assert load_image_folder(tmp_path).class_names == ["tench", "goldfish"]
    (tmp_path / "class_names.json").write_text(json.dumps({"n01440764": "tench"}))
    with pytest.raises(ValueError, match="n01443537"):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folder"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path)


def test_class_embedding_is_the_normalised_mean_of_normalised_template_embeddings() -> None:
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def embed(texts: list[str]) -> torch.Tensor:  # unnormalised on purpose
        for t in texts:
            table.setdefault(t, torch.randn(8, generator=gen) * (1 + len(table)))
        return torch.stack([table[t] for t in texts])

    templates = ["a photo of a {}.", "a drawing of a {}."]
    emb = class_embeddings(embed, ["cat", "dog"], templates)
    assert emb.shape == (2, 8)
    for row, name in zip(emb, ["cat", "dog"], strict=True):
        parts = [F.normalize(table[t.format(name)], dim=0) for t in templates]
        expected = F.normalize(sum(parts), dim=0)
        assert torch.allclose(row, expected, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        class_embeddings(embed, ["cat"], ["no placeholder"])


def test_shapes_zeroshot_folder_shows_its_class_colour(shapes_root: Path) -> None:
    """24 classes <colour>_<shape>, a small and a large image each; the pixels of the
    class colour are present, no other palette colour is, and the large object covers
    more pixels than the small one."""
    folder = load_image_folder(shapes_root / "zeroshot")
    assert len(folder.class_names) == len(COLOURS) * len(SHAPES) == 24
    assert torch.equal(torch.bincount(folder.labels), torch.full((24,), 2))
    palette = np.array(list(COLOURS.values()))  # [6, 3]
    for c, name in enumerate(folder.class_names):
        colour, shape = name.split(" ")
        assert colour in COLOURS and shape in SHAPES
        counts = {}
        for path in [p for p, y in zip(folder.images, folder.labels.tolist(), strict=True) if y == c]:
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)[::2, ::2]  # [112, 112, 3]
            dist = np.abs(pixels[:, :, None, :] - palette).sum(-1)  # [112, 112, 6]
            near = dict(zip(COLOURS, (dist < 30).sum(axis=(0, 1)).tolist(), strict=True))
            assert near[colour] > 60, (path, near)  # > 240 full-resolution pixels
            assert all(v < 15 for k, v in near.items() if k != colour), (path, near)
            counts["large" if "large" in path.name else "small"] = near[colour]
        assert counts["large"] > counts["small"]
