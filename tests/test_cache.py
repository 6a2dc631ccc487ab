"""Precomputed tower features: bad images are skipped and counted, shared images encoded once."""

from pathlib import Path

import torch
from PIL import Image

from vlmalign.cache import tower_features
from vlmalign.data.sample import LoadReport, Sample


def _png(path: Path, colour) -> Path:
    Image.new("RGB", (40, 40), colour).save(path)
    return path


def test_bad_images_are_counted_and_the_rest_kept(tiny_model, tmp_path):
    good = [_png(tmp_path / f"g{i}.png", (40 * i, 0, 0)) for i in range(3)]
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    samples = [Sample(id="a", image=good[0]), Sample(id="b", image=truncated), Sample(id="c", image=good[1]),
               Sample(id="d", image=tmp_path / "missing.png"), Sample(id="e", image=good[2]), Sample(id="f", image=good[1])]
    report = LoadReport()
    feats, kept = tower_features(tiny_model, samples, batch_size=2, report=report)
    assert [s.id for s in kept] == ["a", "c", "e", "f"]
    assert report.total_skipped() == 2
    assert feats.shape == (4, tiny_model.vision.num_patches, tiny_model.vision.hidden_size)
    assert torch.equal(feats[1], feats[3])  # same image, same features
    direct = tiny_model.tower_features(tiny_model.preprocess([Image.open(good[2])]))
    assert torch.allclose(feats[2], direct[0], atol=1e-5)
