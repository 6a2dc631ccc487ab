"""Exact mid-epoch resume of a shard stream after skipped records (corrupt members,
conversations with no label left after truncation): the stream position saved with a
checkpoint says, per DataLoader worker, which record comes next, so a resumed run reads
neither a record twice nor one too few, with 0 or 2 workers and on each of 2 ranks.

Each test breaks records at chosen positions of the rank's shuffled sequence (the order
depends on the seed, epoch, rank and sample counts only, not on the content), early
enough that the old resume offset, batches_done // world * batch_size, is wrong."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlmalign.data.shards import ShardStream, StreamPosition, rank_position, shard_command
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.train import trainer
from vlmalign.train.batches import Batches
from vlmalign.train.datasets import TrainSet, build_stream
from vlmalign.train.trainer import train

BATCH = 4
TAKEN = 3  # batches the interrupted run consumed
BAD_JPEG = b"\xff\xd8\xff garbage, not a jpeg"


@pytest.fixture(scope="module")
def caption_shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caption_shards")
    shard_command(shapes_root, out, shard_size=20)
    return out


@pytest.fixture(scope="module")
def conv_shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv_shards")
    shard_command(shapes_root, out, shard_size=7, kind="conversations")
    return out


# ----------------------------------------------------------------------------- helpers
def _break(shards: Path, positions: tuple[int, ...], rank: int = 0, world: int = 1, seed: int = 0,
           kind: str = "captions") -> list[str]:
    """Spoil the records at `positions` of the rank's epoch-0 sequence (as the trainer
    streams it: even split, batch BATCH) in place: a caption record gets an undecodable
    image, a conversation a question that leaves no assistant token after truncation.
    Returns the spoiled records' ids."""
    order = list(ShardStream(shards, rank=rank, world_size=world, seed=seed, batch_size=BATCH, even=True,
                             decode="bytes", kind=kind))
    ids = []
    for p in positions:
        rec = order[p]
        assert rec.meta["position"] == p
        if kind == "captions":
            replace = {f"{rec.meta['key']}.jpg": BAD_JPEG}
        else:
            turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n" + "why " * 400}, {"from": "gpt", "value": "No."}]
            replace = {f"{rec.meta['key']}.json": json.dumps({"id": rec.id, "conversations": turns}).encode()}
        _rewrite_members(shards / rec.meta["shard"], replace)
        ids.append(rec.id)
    return ids


def _rewrite_members(tar_path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite tar `tar_path` with the members named in `replace` given new bytes."""
    tmp = tar_path.with_suffix(".tmp")
    with tarfile.open(tar_path) as tin, tarfile.open(tmp, "w") as tout:
        for m in tin.getmembers():
            payload = replace.get(m.name, tin.extractfile(m).read())
            m.size = len(payload)
            tout.addfile(m, io.BytesIO(payload))
    os.replace(tmp, tar_path)


class _Rank:
    """What `Batches` uses of an Accelerator, for rank `process_index` of `num_processes`
    in one process (the ranks never disagree about running out here)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor


def _collate(samples: list) -> dict:
    """Raw stream samples as a batch carrying what the trainer reads: the positions."""
    return {"index": torch.tensor([s.meta["position"] for s in samples]), "id": [s.id for s in samples]}


def _loop(stream: ShardStream, workers: int, rank: int = 0, world: int = 1, collate=_collate) -> Batches:
    """The trainer's batch source over `stream`, with `workers` DataLoader workers."""
    loader = DataLoader(stream, batch_size=BATCH, num_workers=workers, collate_fn=collate)
    return Batches(TrainSet(stream, collate, [], lambda: 0, stream=stream), loader, None, stream.report,
                    _Rank(rank, world), "test")


def _ids(batches: Batches, take: int | None = None) -> list[list[str]]:
    """The ids of each batch of epoch 0 the loop takes (all of them, or the first `take`)."""
    epoch = batches.epoch(0)
    out = [list(b["id"]) for b in itertools.islice(epoch, take)]
    epoch.close()
    return out


def _saved(batches: Batches) -> dict:
    """The checkpoint's "stream" record, through JSON as trainer_state.json holds it."""
    return json.loads(json.dumps(batches.stream_record()))["stream"]


# ----------------------------------------------------------------------- unit: stream
def test_advance_tracks_each_worker_slot():
    pos = StreamPosition(epoch=0, start=0, batch_size=4, workers=2)
    pos.advance([0, 2, 3, 8])  # worker 0 skipped position 1 and filled its batch from block 2
    assert (pos.next, pos.first) == ([9, 0], 1)
    pos.advance(torch.tensor([4, 6, 7, 12]))  # worker 1: position 5 skipped
    assert (pos.next, pos.first) == ([9, 13], 0)
    pos.advance([9, 10, 11, 16])
    assert (pos.next, pos.first) == ([17, 13], 1)
    resumed = StreamPosition(epoch=0, start=8, batch_size=4, workers=2)
    resumed.advance([8, 9])  # blocks counted from start: 8..11 is slot 0
    assert (resumed.next, resumed.first) == ([10, 8], 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_the_record_after_the_last_batch(caption_shards, tmp_path, workers):
    shards = Path(shutil.copytree(caption_shards, tmp_path / "bad"))
    _break(shards, (1, 5))

    def stream() -> ShardStream:
        return ShardStream(shards, rank=0, world_size=1, batch_size=BATCH, even=True)

    full = _ids(_loop(stream(), workers))
    assert sum(map(len, full)) == stream().total - 2  # the two bad images skipped
    cut = _loop(stream(), workers)
    head = _ids(cut, TAKEN)
    saved = _saved(cut)
    # 0 workers: 3 batches of 4 read 14 positions; 2 workers: worker 0 delivered up to 16
    # and worker 1 up to 12, and worker 1 serves next (see test_advance_tracks_each_worker_slot).
    want = ([14], 0) if workers == 0 else ([17, 13], 1)
    assert (saved["ranks"][0]["next"], saved["ranks"][0]["first"]) == want
    resumed = _loop(stream(), workers)
    resumed.skip(0, TAKEN, saved)
    assert head + _ids(resumed) == full
    # The old resume, batches_done * batch_size = 12 positions, is another run.
    old = _loop(stream(), workers)
    old.skip(0, TAKEN, None)
    assert head + _ids(old) != full


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_each_resume_from_their_own_position(caption_shards, tmp_path, workers):
    shards = Path(shutil.copytree(caption_shards, tmp_path / "bad"))
    _break(shards, (1, 5), rank=0, world=2)
    _break(shards, (2,), rank=1, world=2)

    def loop(rank: int) -> Batches:
        return _loop(ShardStream(shards, rank=rank, world_size=2, batch_size=BATCH, even=True), workers, rank, 2)

    full = [_ids(loop(r)) for r in range(2)]
    cuts = [loop(r) for r in range(2)]
    heads = [_ids(c, TAKEN) for c in cuts]
    # As accelerate's gather_object joins the ranks' one-element lists, by rank.
    records = [_saved(c) for c in cuts]
    saved = {"world": 2, "ranks": records[0]["ranks"] + records[1]["ranks"]}
    assert saved["ranks"][0] != saved["ranks"][1]  # rank 0 skipped two records, rank 1 one
    for r in range(2):
        resumed = loop(r)
        resumed.skip(0, 2 * TAKEN, saved)  # batches_done counts both ranks
        assert heads[r] + _ids(resumed) == full[r], r
    # Each rank's own entry matters: rank 1 resumed from rank 0's position is another run.
    swapped = loop(1)
    swapped.skip(0, 2 * TAKEN, {"world": 2, "ranks": [saved["ranks"][1], saved["ranks"][0]]})
    assert heads[1] + _ids(swapped) != full[1]


def test_rank_position_applies_to_its_rank_world_and_epoch():
    p0 = StreamPosition(epoch=2, start=0, batch_size=4, workers=2, next=[9, 13], first=1)
    p1 = StreamPosition(epoch=2, start=0, batch_size=4, workers=2, next=[12, 8], first=0)
    saved = {"world": 2, "ranks": [p0.as_dict(), p1.as_dict()]}
    assert rank_position(saved, 0, 2, 2) == p0 and rank_position(saved, 1, 2, 2) == p1
    assert rank_position(saved, 0, 4, 2) is None  # another world size
    assert rank_position(saved, 1, 2, 3) is None  # another epoch
    assert rank_position(None, 0, 1, 0) is None  # a checkpoint from before positions were saved
    with pytest.raises(ValueError, match="0 <= first < workers"):
        StreamPosition.from_dict(p0.as_dict() | {"first": 2})
    with pytest.raises(ValueError, match="not a stream position"):
        StreamPosition.from_dict({"epoch": 0})


def test_another_worker_count_resumes_after_the_furthest_worker(caption_shards, tmp_path, caplog):
    shards = Path(shutil.copytree(caption_shards, tmp_path / "bad"))
    _break(shards, (1, 5))

    def stream() -> ShardStream:
        return ShardStream(shards, rank=0, world_size=1, batch_size=BATCH, even=True)

    cut = _loop(stream(), 2)
    head = _ids(cut, TAKEN)
    resumed = _loop(stream(), 0)
    resumed.skip(0, TAKEN, _saved(cut))
    with caplog.at_level(logging.WARNING, logger="vlmalign.data.shards"):
        rest = _ids(resumed)
    assert "keep both settings for an exact resume" in caplog.text
    seen = [i for b in head + rest for i in b]
    assert len(seen) == len(set(seen))  # nothing twice (records worker 1 still owed are lost)
    assert rest[0][0] == next(s.id for s in stream() if s.meta["position"] == 17)


def test_map_style_data_saves_no_stream_record():
    batches = Batches(TrainSet([], list, [], lambda: 0), None, None, None, _Rank(), 0)
    assert batches.stream_record() == {}  # the training state keeps today's bytes


@pytest.mark.parametrize("workers", [0, 2])
def test_conversation_stream_resumes_exactly_after_unlabelled_ones(tiny_cfg, conv_shards, tmp_path, workers):
    """The trainer's conversation stream (encoded in the workers; a record with no label
    after truncation is dropped by the transform, after the stream's own checks)."""
    shards = Path(shutil.copytree(conv_shards, tmp_path / "bad"))
    cfg = tiny_cfg("instruct", f"data.shards={shards}", f"train.batch_size={BATCH}")
    _break(shards, (1, 5), seed=cfg.train.seed, kind="conversations")
    from vlmalign.models.vlm import VLM

    model = VLM.build(cfg)

    def loop() -> Batches:
        trainset = build_stream(model, cfg, 0, 1, kind="conversations")
        return _loop(trainset.stream, workers, collate=_ConvIds(trainset.collator))

    full = _ids(loop())
    cut = loop()
    head = _ids(cut, TAKEN)
    saved = _saved(cut)
    assert saved["ranks"][0]["next"][0] > TAKEN * BATCH  # the old offset would re-read records
    resumed = loop()
    resumed.skip(0, TAKEN, saved)
    assert head + _ids(resumed) == full
    old = loop()
    old.skip(0, TAKEN, None)
    assert head + _ids(old) != full


class _ConvIds:
    """The trainer's collator, plus the items' ids (picklable for DataLoader workers)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        return self.collator(items) | {"id": [it["id"] for it in items]}


# -------------------------------------------------------------------- training runs
def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stopped_at(out: Path, step: int) -> None:
    """Leave `out` as if the run had stopped after saving checkpoint-`step`."""
    for path in out.iterdir():
        if path.name == "latest":
            path.unlink()
        elif path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)


def _stream_state(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["stream"]


def test_caption_training_resumed_after_bad_images_matches_an_uninterrupted_run(tiny_cfg, caption_shards, tmp_path,
                                                                               monkeypatch):
    shards = Path(shutil.copytree(caption_shards, tmp_path / "bad"))
    _break(shards, (1, 5), seed=tiny_cfg("align").train.seed)
    common = [f"data.shards={shards}", "train.warmup_steps=1", "train.log_every=1", f"train.batch_size={BATCH}",
              "train.max_steps=6", "train.lr=3e-3"]
    full = train(tiny_cfg("align", *common, f"train.out_dir={tmp_path / 'full'}"))
    assert full.data_report["skipped"]["skipped"] == {"bad_image": 2}
    want = _weights(full)
    cut = tmp_path / "cut"
    train(tiny_cfg("align", *common, "train.save_every=3", f"train.out_dir={cut}"))
    _stopped_at(cut, TAKEN)
    shutil.copytree(cut, tmp_path / "old")
    # 3 steps of 4 usable records read 14 positions; the old resume offset is 12.
    assert _stream_state(cut, TAKEN) == {"world": 1, "ranks": [
        {"epoch": 0, "start": 0, "batch_size": BATCH, "workers": 1, "next": [TAKEN * BATCH + 2], "first": 0}]}
    resumed = train(tiny_cfg("align", *common, "train.resume=latest", f"train.out_dir={cut}"))
    assert _same(_weights(resumed), want)
    assert _stream_state(cut, 6) == _stream_state(tmp_path / "full", 6)

    # The same resume with the old offset (batches_done // world * batch_size) re-reads
    # two records and ends with other weights.
    def old_skip(self, epoch, batches_done, saved=None):
        return original(self, epoch, batches_done, None)

    original = trainer.Batches.skip
    monkeypatch.setattr(trainer.Batches, "skip", old_skip)
    old = train(tiny_cfg("align", *common, "train.resume=latest", f"train.out_dir={tmp_path / 'old'}"))
    assert not _same(_weights(old), want)


def test_conversation_training_resumed_after_unlabelled_ones_matches_an_uninterrupted_run(tiny_cfg, conv_shards,
                                                                                         tmp_path):
    shards = Path(shutil.copytree(conv_shards, tmp_path / "bad"))
    _break(shards, (1, 5), seed=tiny_cfg("instruct").train.seed, kind="conversations")
    common = [f"data.shards={shards}", "train.warmup_steps=1", "train.log_every=1", f"train.batch_size={BATCH}",
              "train.max_steps=6"]
    full = train(tiny_cfg("instruct", *common, f"train.out_dir={tmp_path / 'full'}"))
    assert full.data_report["skipped"]["skipped"].get("no_labels_after_truncation", 0) >= 2
    cut = tmp_path / "cut"
    train(tiny_cfg("instruct", *common, "train.save_every=3", f"train.out_dir={cut}"))
    _stopped_at(cut, TAKEN)
    (next_position,) = _stream_state(cut, TAKEN)["ranks"][0]["next"]
    assert next_position >= TAKEN * BATCH + 2  # the old offset, 12, would re-read records
    resumed = train(tiny_cfg("instruct", *common, "train.resume=latest", f"train.out_dir={cut}"))
    assert _same(_weights(resumed), _weights(full))
