"""The on-disk feature store: a second run reads features from disk (no tower call), an
edited image is recomputed, a damaged or partial store is rebuilt, another tower never
reads these rows."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmalign.cache import open_store, tower_features
from vlmalign.data.sample import Sample
from vlmalign.feature_store import DATA_NAME, INDEX_NAME, FeatureStore, image_digest


def _png(path: Path, colour) -> Path:
    Image.new("RGB", (40, 40), colour).save(path)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    return [Sample(id=str(i), image=_png(folder / f"{i}.png", (60 * i, 20, 200 - 40 * i))) for i in range(4)]


class CountingTower:
    """Wraps model.tower_features, counting the images it encodes."""

    def __init__(self, model):
        self.model, self.inner, self.images = model, model.tower_features, 0
        model.tower_features = self

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return self.inner(pixels)


def test_second_call_reads_from_disk_without_the_tower(tiny_model, images, tmp_path):
    store_dir = tmp_path / "store"
    counter = CountingTower(tiny_model)
    first, _ = tower_features(tiny_model, images + images[:1], batch_size=3, store=store_dir)
    assert counter.images == 4  # the repeated image once
    second, kept = tower_features(tiny_model, images + images[:1], batch_size=3, store=store_dir)
    assert counter.images == 4 and len(kept) == 5
    assert torch.equal(first, second)
    direct = counter.inner(tiny_model.preprocess([Image.open(images[2].image)]))
    assert torch.allclose(second[2], direct[0], atol=1e-5)


def test_store_from_the_config_and_content_change_invalidates(tiny_model, images, tmp_path):
    tiny_model.cfg.train.feature_cache_dir = str(tmp_path / "store")  # the field the lead adds
    counter = CountingTower(tiny_model)
    before, _ = tower_features(tiny_model, images)
    _png(Path(images[1].image), (0, 255, 0))  # same path, new content
    after, _ = tower_features(tiny_model, images)
    assert counter.images == 5  # only the edited image again
    assert not torch.allclose(before[1], after[1])
    assert torch.equal(before[0], after[0]) and torch.equal(before[3], after[3])


def test_partial_data_file_is_rebuilt(tiny_model, images, tmp_path):
    store_dir = tmp_path / "store"
    reference, _ = tower_features(tiny_model, images, store=store_dir)
    store = open_store(tiny_model, store_dir)
    data = store.data_path
    data.write_bytes(data.read_bytes()[: store.row_bytes + 10])  # crash mid-write
    counter = CountingTower(tiny_model)
    again, _ = tower_features(tiny_model, images, store=store_dir)
    assert counter.images == 4
    assert torch.allclose(again, reference, atol=1e-6)
    assert len(open_store(tiny_model, store_dir)) == 4  # whole again


def test_corrupt_index_and_flipped_bytes_are_rebuilt(tiny_model, images, tmp_path):
    store_dir = tmp_path / "store"
    reference, _ = tower_features(tiny_model, images, store=store_dir)
    store = open_store(tiny_model, store_dir)
    raw = bytearray(store.data_path.read_bytes())
    raw[store.row_bytes + 5] ^= 0xFF  # damage row 1
    store.data_path.write_bytes(bytes(raw))
    counter = CountingTower(tiny_model)
    again, _ = tower_features(tiny_model, images, store=store_dir)
    assert counter.images == 1  # the damaged row only
    assert torch.allclose(again, reference, atol=1e-6)
    store.index_path.write_text("{ not json")
    again, _ = tower_features(tiny_model, images, store=store_dir)
    assert counter.images == 5  # all rebuilt
    assert json.loads(store.index_path.read_text())["n"] == 4


def test_extra_bytes_of_an_unfinished_append_are_cut(tmp_path):
    store = FeatureStore(tmp_path, "tower", (2, 3))
    store.put(["a", "b"], torch.arange(12.0).view(2, 2, 3))
    with open(store.data_path, "ab") as f:
        f.write(b"\0" * 7)  # bytes written, index never updated
    reopened = FeatureStore(tmp_path, "tower", (2, 3))
    assert reopened.data_path.stat().st_size == 2 * reopened.row_bytes
    got = reopened.get(["b", "a", "missing"])
    assert set(got) == {"a", "b"} and torch.equal(got["b"], torch.arange(6.0, 12.0).view(2, 3))
    reopened.put(["c"], torch.ones(1, 2, 3))
    assert torch.equal(FeatureStore(tmp_path, "tower", (2, 3)).get(["c"])["c"], torch.ones(2, 3))


def test_other_tower_or_shape_never_reads_these_rows(tiny_model, images, tmp_path):
    store_dir = tmp_path / "store"
    tower_features(tiny_model, images, store=store_dir)
    key = tiny_model.vision.cache_key()
    assert (store_dir / key / DATA_NAME).exists() and (store_dir / key / INDEX_NAME).exists()
    with torch.no_grad():
        next(tiny_model.vision.parameters()).add_(1.0)  # other weights: another key
    assert tiny_model.vision.cache_key() != key
    counter = CountingTower(tiny_model)
    tower_features(tiny_model, images, store=store_dir)
    assert counter.images == 4
    wrong_shape = FeatureStore(store_dir, key, (1, 1))  # a mismatching index is reset
    assert len(wrong_shape) == 0 and wrong_shape.rebuilt == 1
    with pytest.raises(ValueError, match="rows of shape"):
        wrong_shape.put(["x"], torch.zeros(1, 2, 2))


def test_digest_follows_bytes_not_names(tmp_path):
    a = _png(tmp_path / "a.png", (1, 2, 3))
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    assert image_digest(a) == image_digest(b)
    assert image_digest(Image.open(a)) != image_digest(Image.new("RGB", (40, 40), (1, 2, 4)))
