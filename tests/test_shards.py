"""webdataset shards: writing, per-rank/per-worker splitting, shuffling, corrupt samples, resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vlmalign.data.formats import load_captions_jsonl
from vlmalign.data.images import load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.shards import INDEX_NAME, ShardStream, load_index, shard_command, write_shards

# 7 does not divide the ~76 training samples, and the resulting 11 shards divide neither
# 2 ranks nor 2 ranks x 2 workers: the uneven case is the one under test.
SHARD_SIZE = 7
BATCH = 4


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard_command(shapes_root, out, shard_size=SHARD_SIZE)
    return out


@pytest.fixture(scope="module")
def source(shapes_root) -> list[Sample]:
    return load_captions_jsonl(shapes_root / "train.jsonl")


def _ids(samples) -> list[str]:
    return [s.id for s in samples]


def _rank_sequence(shards: Path, rank: int, world: int, workers: int, **kw) -> list[str]:
    """The ids one rank sees in an epoch, in DataLoader order."""
    stream = ShardStream(shards, rank=rank, world_size=world, batch_size=BATCH, shuffle_buffer=16, **kw)
    loader = DataLoader(stream, batch_size=BATCH, num_workers=workers, collate_fn=list)
    return [s.id for batch in loader for s in batch]


def test_index_counts_every_written_sample_and_shards_are_uneven(shards, source):
    index = json.loads((shards / INDEX_NAME).read_text())
    counts = [s["count"] for s in index["shards"]]
    assert index["total"] == sum(counts) == len(source)
    assert counts[:-1] == [SHARD_SIZE] * (len(counts) - 1) and 0 < counts[-1] < SHARD_SIZE
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(counts))]
    assert [s.count for s in load_index(shards)] == counts
    # Without the index (a brace pattern), the counts come from scanning the tars.
    pattern = str(shards / f"shard-{{000000..{len(counts) - 1:06d}}}.tar")
    assert [s.count for s in load_index(pattern)] == counts


def test_captions_and_images_round_trip(shards, source):
    stream = ShardStream(shards, rank=0, world_size=1, shuffle=False)
    got = list(stream)
    assert _ids(got) == _ids(source)  # unshuffled: the written order
    for s, ref in zip(got, source, strict=True):
        assert (s.caption, s.short_caption, s.long_caption) == (ref.caption, ref.short_caption, ref.long_caption)
    # shapes images are PNGs, re-encoded as JPEG at quality 95: close, not identical.
    a = np.asarray(got[0].image, dtype=np.float32)
    b = np.asarray(load_image(source[0].image), dtype=np.float32)
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 3.0


def test_jpeg_files_are_stored_byte_for_byte(tmp_path, source):
    jpg = tmp_path / "photo.jpg"
    load_image(source[0].image).save(jpg, format="JPEG", quality=80)
    write_shards([Sample(id="a/b.c", image=jpg, caption="a photo")], tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        stored = tar.extractfile("000000000.jpg").read()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert sorted(names) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert stored == jpg.read_bytes()
    assert meta == {"id": "a/b.c", "caption": "a photo"}  # ids with dots/slashes survive


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_ranks_and_workers_cover_every_sample_exactly_once(shards, source, world, workers):
    per_rank = [_rank_sequence(shards, r, world, workers) for r in range(world)]
    seen = [i for seq in per_rank for i in seq]
    assert len(seen) == len(set(seen))  # disjoint, inside and across ranks
    assert set(seen) == set(_ids(source))  # nothing lost although nothing divides evenly
    for r, seq in enumerate(per_rank):
        assert len(seq) == len(ShardStream(shards, rank=r, world_size=world))
        # The rank's sequence does not depend on the number of workers.
        if workers:
            assert seq == _rank_sequence(shards, r, world, 0)


def test_even_gives_every_rank_the_same_count_and_drops_less_than_world(shards, source):
    world = 3
    seqs = [_rank_sequence(shards, r, world, 0, even=True) for r in range(world)]
    assert len({len(s) for s in seqs}) == 1
    seen = {i for s in seqs for i in s}
    assert len(seen) == sum(len(s) for s in seqs) and len(source) - len(seen) == len(source) % world


def test_shuffle_depends_on_seed_and_epoch_only(shards):
    def order(seed, epoch):
        stream = ShardStream(shards, rank=0, world_size=2, seed=seed, shuffle_buffer=16)
        stream.set_epoch(epoch)
        return _ids(stream)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    # Rank 0 reads a different part of the data in another epoch (the shard order changes).
    assert set(order(0, 1)) != set(order(0, 2))


def _rewrite_member(src: Path, dst: Path, name: str, data: bytes) -> None:
    """Copy tar `src` to `dst` with member `name` replaced by `data`."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            payload = data if m.name == name else tin.extractfile(m).read()
            m.size = len(payload)
            tout.addfile(m, io.BytesIO(payload))


def test_corrupt_members_and_a_truncated_shard_are_counted_not_fatal(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    first = bad / "shard-000000.tar"
    _rewrite_member(first, tmp_path / "t1.tar", "000000001.jpg", b"\xff\xd8\xff garbage, not a jpeg")
    _rewrite_member(tmp_path / "t1.tar", first, "000000002.json", b"{not json")
    second = bad / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 3])  # cut mid-shard

    stream = ShardStream(bad, rank=0, world_size=1, shuffle=False)
    got = list(stream)
    skipped = stream.report.skipped
    assert skipped["bad_image"] == 1 and skipped["malformed_json"] == 1
    assert skipped["corrupt_shard"] == 1
    lost = int(stream.report.as_dict()["examples"]["corrupt_shard"][0].split("; ")[-1].split()[0])
    assert 0 < lost < SHARD_SIZE
    assert len(got) == stream.total - 2 - lost  # every other sample still arrives
    assert "000000001" not in {s.meta["key"] for s in got}


def test_skip_resumes_the_rank_sequence_for_that_epoch_only(shards):
    full = _rank_sequence(shards, 1, 2, 0, epoch=3)
    stream = ShardStream(shards, rank=1, world_size=2, epoch=3, batch_size=BATCH, shuffle_buffer=16)
    stream.skip(2 * BATCH)  # the interrupted run consumed 2 batches of this rank
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2, collate_fn=list)
    assert [s.id for b in loader for s in b] == full[2 * BATCH :]
    stream.set_epoch(4)  # the next epoch starts from its beginning
    assert len(list(stream)) == len(stream)


def test_shard_command_counts_skipped_records(tmp_path, source, capsys):
    good = load_image(source[0].image)
    good.save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [
        {"image": "good.png", "caption": "a red square"},
        {"image": "missing.png", "caption": "gone"},
        {"image": "broken.png", "caption": "unreadable"},
    ]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = shard_command(tmp_path / "caps.jsonl", tmp_path / "out", shard_size=2)
    assert result["samples"] == 1 and result["shards"] == ["shard-000000.tar"]
    assert result["skipped"] == {"missing_image": 1, "bad_image": 1}
    assert "wrote 1 samples (of 2 records)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["skipped"]["skipped"] == result["skipped"]
    with pytest.raises(FileNotFoundError, match="vlmalign data shard"):
        ShardStream(tmp_path / "nowhere")
    report = LoadReport()
    write_shards([Sample(id="x", image=tmp_path / "good.png", caption="  ")], tmp_path / "o2", report=report)
    assert report.skipped == {"empty_caption": 1}


def test_rank_and_world_default_to_the_launcher_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = ShardStream(shards, shuffle_buffer=16)
    assert (stream.rank, stream.world_size) == (1, 2)
    assert _ids(stream) == _ids(ShardStream(shards, rank=1, world_size=2, shuffle_buffer=16))
    with pytest.raises(ValueError, match="outside world size"):
        ShardStream(shards, rank=2, world_size=2)
