"""Streaming data: webdataset tar shards, written from caption or LLaVA conversation
data and read back split across ranks and DataLoader workers with no sample seen twice in
an epoch.

Layout written by `write_shards` (webdataset convention: one sample = the tar members
sharing a key):

    out/shard-000000.tar   000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    out/shard-000001.tar
    out/index.json         {"format", "kind", "shards": [{"name", "count"}], "total", "skipped"}

Two kinds of content (`index.json` "kind"; an index without one holds captions):

- "captions": `KEY.jpg`, `KEY.txt` (the caption), `KEY.json` {"id", "caption",
  "short_caption", "long_caption", "meta"} (the empty ones left out; "meta": the source
  record's other keys, so a `data.short_field` / `data.long_field` naming one of them
  still works). Serves the `captions` and `short_long` training kinds.
- "conversations": `KEY.jpg` + `KEY.json` {"id", "conversations": [{"from": "human"|"gpt",
  "value"}], "meta"}: the turns as `load_conversations` parsed them (stripped, `<image>`
  in the first human turn). Text-only conversations are not written (counted `no_image`).

Keys are the sample's position in the whole set (`%09d`), so they are unique and free of
the dots and slashes webdataset would split on; the dataset's own id is in the JSON.

How `ShardStream` splits an epoch (a pure function of the index, seed, epoch, rank and
world size, so every process computes the same plan without talking to the others):

1. The shard order is shuffled by (seed, epoch).
2. The concatenated stream of N samples is cut into `world_size` contiguous ranges of
   N // world_size or N // world_size + 1 samples (`even=True`: all N // world_size, the
   last N % world_size samples of the epoch's order dropped so every rank runs the same
   number of steps). A rank reads only the shards overlapping its range: any number of
   shards works, dividing evenly or not, and none is read twice across ranks.
3. The rank's range passes through a shuffle buffer seeded by (seed, epoch, rank): this is
   the rank's sample sequence for the epoch, the same whatever the number of workers.
4. Worker w of W keeps the samples j with (j // batch_size) % W == w. A DataLoader takes
   batches from its workers in turn, so with the same `batch_size` and no skipped record
   it yields the rank's sequence in order, batch by batch, for any W. Every worker reads
   the rank's tar bytes but decodes only its own samples (decoding is the expensive part).
   A skipped record (below) leaves its worker's batch short, and the worker fills it from
   its next block: the batches then depend on W, and one offset into the sequence no
   longer says where every worker stands.
5. Resuming mid-epoch: `StreamPosition` records, per worker slot, the first position the
   slot still owes and which slot serves the next batch. The training loop takes a fresh
   one from `position(workers)`, `advance`s it with the positions of each batch it
   consumes, saves it, and a resumed run hands it to `resume`: the rest of the epoch is
   then the batches the interrupted run would have had, skipped records or not, with the
   same number of workers. `skip(n)` drops the first n samples (exact when no record
   before n was skipped, or with no workers).

A corrupt sample (undecodable image, bad JSON, no image or caption member, conversation
turns of the wrong shape) is skipped and counted in `ShardStream.report` (in the process
that read it; with workers the skips are logged as warnings), never a crash; a truncated
shard loses the samples after the damage, counted under `corrupt_shard`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from vlmalign import dist
from vlmalign.models.language import IMAGE_TOKEN

from .conversations import Conversation, _parse_turns, load_conversations
from .formats import load_captions_jsonl
from .images import MIN_IMAGE_SIDE, BadImageError, _to_rgb, load_image
from .sample import LoadReport, Sample

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "vlmalign-shards/1"
# JPEG quality when a non-JPEG image is re-encoded; 95 keeps re-encoding artefacts below
# what a 224-pixel vision tower resolves (PIL's default is 75).
JPEG_QUALITY = 95
# Samples held by the shuffle buffer of each reader (raw bytes, ~50-200 kB per image);
# 1000 is webdataset's usual `.shuffle(1000)`.
SHUFFLE_BUFFER = 1000
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELDS = ("id", "caption", "short_caption", "long_caption")
# What a shard set holds (index.json "kind"); "captions" serves both caption training kinds.
SHARD_KINDS = ("captions", "conversations")
_ROLE_NAMES = {"user": "human", "assistant": "gpt"}  # stored in LLaVA's own role names
_JPEG_MAGIC = b"\xff\xd8\xff"


# ------------------------------------------------------------------------------ writing
def _image_bytes(image: Path, where: str, report: LoadReport, quality: int) -> bytes | None:
    """The JPEG bytes to store for the image file `image`, or None (skip counted) when it
    is bad.

    The image is always decoded once (the check); a file that already is a JPEG is stored
    as it is, anything else is re-encoded from its RGB decoding."""
    try:
        rgb = load_image(image)
    except BadImageError as err:
        reason = "missing_image" if not Path(image).exists() else "bad_image"
        report.skip(reason, where, err.reason)
        return None
    raw = Path(image).read_bytes()
    if raw.startswith(_JPEG_MAGIC):
        return raw
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _members(record: Sample | Conversation, where: str, report: LoadReport) -> dict | None:
    """The text members of one record ({"txt"?, "json"}), or None (skip counted)."""
    meta = {"meta": record.meta} if record.meta else {}
    if isinstance(record, Conversation):
        if record.image is None:
            report.skip("no_image", where, "text-only conversation (every row of a VLM batch needs its image)")
            return None
        turns = [{"from": _ROLE_NAMES[role], "value": text} for role, text in record.turns]
        text = {"id": record.id, "conversations": turns} | meta
        return {"json": json.dumps(text, ensure_ascii=False, default=str).encode("utf-8")}
    if not record.caption.strip():
        report.skip("empty_caption", where, "caption is empty")
        return None
    text = {k: getattr(record, k) for k in TEXT_FIELDS if getattr(record, k)} | meta
    return {"txt": record.caption, "json": json.dumps(text, ensure_ascii=False, default=str).encode("utf-8")}


def write_shards(
    samples: Iterable[Sample] | Iterable[Conversation],
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    report: LoadReport | None = None,
    jpeg_quality: int = JPEG_QUALITY,
) -> list[Path]:
    """Write `samples` (caption `Sample`s, or LLaVA `Conversation`s as `load_conversations`
    returns them; not both) as webdataset tar shards `{prefix}-{i:06d}.tar` of
    `shard_size` samples each (the last one smaller), plus `out_dir/index.json`; returns
    the shard paths.

    Per sample: `KEY.jpg` (the original bytes if the file is a JPEG, else re-encoded at
    `jpeg_quality`) and `KEY.json`; for captions also `KEY.txt` (the caption). The JSON
    holds id, caption, short_caption, long_caption (when present) and the record's `meta`,
    or id, the conversation turns and `meta` (module docstring). Unusable images
    (missing, undecodable, truncated, smaller than 2x2), empty captions and text-only
    conversations are skipped and counted in `report`; the index records the counts and
    the kind. Tar members carry mtime 0, so the same input gives byte-identical shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report if report is not None else LoadReport()
    paths: list[Path] = []
    counts: list[int] = []
    writer: wds.TarWriter | None = None
    written = 0
    kind: str | None = None
    try:
        for n, sample in enumerate(samples):
            this = "conversations" if isinstance(sample, Conversation) else "captions"
            if kind is not None and this != kind:
                raise ValueError(f"sample {n} ({sample.id}) is {this}, the ones before it {kind}: "
                                 "write caption and conversation data to separate shard folders")
            kind = this
            where = f"sample {n} ({sample.id or sample.image})"
            members = _members(sample, where, report)
            if members is None:
                continue
            jpg = _image_bytes(sample.image, where, report, jpeg_quality)
            if jpg is None:
                continue
            if writer is None or counts[-1] == shard_size:
                if writer is not None:
                    writer.close()
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                counts.append(0)
                writer = wds.TarWriter(str(paths[-1]), mtime=0)
            writer.write({"__key__": f"{written:09d}", "jpg": jpg} | members)
            counts[-1] += 1
            written += 1
            report.loaded += 1
    finally:
        if writer is not None:
            writer.close()
    index = {
        "format": INDEX_FORMAT,
        "kind": kind or "captions",
        "shards": [{"name": p.name, "count": c} for p, c in zip(paths, counts, strict=True)],
        "total": written,
        "shard_size": shard_size,
        "skipped": report.as_dict(),
    }
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_NAME)
    return paths


def _is_conversation_file(path: Path) -> bool:
    """True for a LLaVA conversation file: any `.json`, or a `.jsonl` whose first record
    has a "conversations" key (a captions JSONL has "caption" instead)."""
    if path.suffix == ".json":
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return False  # the captions loader names the bad line
                return isinstance(first, dict) and "conversations" in first
    return False


def _source_records(source: Path, kind: str, split: str, caption_field: str, image_root: str | Path | None,
                    allow_outside_root: bool, report: LoadReport) -> tuple[str, list]:
    """(kind, records) of a `shard_command` source, loaded by the loaders training uses."""
    if source.is_dir():
        from vlmalign.config import DataConfig
        from vlmalign.data.splits import train_conversations, train_samples

        kind = "captions" if kind == "auto" else kind
        if kind == "conversations":  # the shapes layout's instruct files (+ the MCQ ones for train)
            cfg = DataConfig(root=str(source), generate_shapes=False, allow_outside_root=allow_outside_root,
                             train_file="" if split == "train" else f"instruct_{split}.json")
            return kind, train_conversations(cfg, report)
        cfg = DataConfig(root=str(source), generate_shapes=False, train_file=f"{split}.jsonl",
                         caption_field=caption_field, allow_outside_root=allow_outside_root)
        return kind, train_samples(cfg, report, holdout=False)  # a shard holds every record
    if not source.exists():
        raise FileNotFoundError(f"--from {source} does not exist; pass a captions .jsonl, a LLaVA conversation "
                                ".json/.jsonl or a shapes-layout folder")
    if source.suffix not in (".json", ".jsonl"):
        raise ValueError(f"--from {source}: expected a captions .jsonl, a LLaVA conversation .json/.jsonl "
                         "or a folder in the shapes layout")
    if kind == "auto":
        kind = "conversations" if _is_conversation_file(source) else "captions"
    if kind == "conversations":
        return kind, load_conversations(source, image_root=image_root, report=report, allow_text_only=False,
                                        allow_outside_root=allow_outside_root)
    if source.suffix == ".json":
        raise ValueError(f"--from {source}: captions are read from a .jsonl file (one JSON object a line)")
    return kind, load_captions_jsonl(source, image_root=image_root, caption_field=caption_field, report=report,
                                     allow_outside_root=allow_outside_root)


def shard_command(
    source: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    split: str = "train",
    caption_field: str = "caption",
    kind: str = "auto",
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> dict:
    """`vlmalign data shard --from SOURCE --out OUT --shard-size N [--kind K]`: read the
    records of SOURCE with the loaders training uses, write shards to `out` and print
    one summary line.

    SOURCE: a captions JSONL (`image`, `caption`, optional `short_caption` /
    `long_caption`), a LLaVA conversation `.json` / `.jsonl` (`id`, `image`,
    `conversations`), or a folder in the shapes layout (its `{split}.jsonl` captions, or
    with `kind="conversations"` its instruct files as the `instruct` recipe reads them).
    `kind`: "auto" (a `.json`, or a `.jsonl` whose first record has "conversations", is
    conversation data; a folder is captions), "captions" or "conversations". Relative
    image paths resolve against `image_root` (default: the file's folder). Text-only
    conversations are skipped and counted (`no_image`), as training skips them.

    Returns `{"out", "kind", "shards": [names], "samples": written, "skipped": {reason: n},
    "summary": the printed line}`. Raises FileNotFoundError when `source` is missing,
    ValueError for an unknown `kind` or an unsupported file type.
    """
    if kind not in ("auto", *SHARD_KINDS):
        raise ValueError(f"kind must be one of auto, {', '.join(SHARD_KINDS)}; got {kind!r}")
    source = Path(source)
    report = LoadReport()
    kind, records = _source_records(source, kind, split, caption_field, image_root, allow_outside_root, report)
    loaded = report.loaded  # records read; write_shards counts the written ones again
    report.loaded = 0
    paths = write_shards(records, out, shard_size=shard_size, prefix=prefix, report=report)
    what = "conversations" if kind == "conversations" else "samples"
    summary = (
        f"wrote {report.loaded} {what} (of {loaded} records) to {len(paths)} shards in {out}"
        + (f"; {report.summary()}" if report.total_skipped() else "")
    )
    if report.records:  # every skipped record, with its reason and place, beside the shards
        (Path(out) / "skipped.jsonl").unlink(missing_ok=True)
        report.write_jsonl(Path(out) / "skipped.jsonl")
        summary += f"; every skipped record is listed in {Path(out) / 'skipped.jsonl'}"
    print(summary)
    return {
        "out": str(out),
        "kind": kind,
        "shards": [p.name for p in paths],
        "samples": report.loaded,
        "skipped": report.skipped,
        "summary": summary,
    }


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Shard:
    """One tar shard: where to open it (path or any `webdataset.gopen` URL) and its size."""

    url: str
    count: int


def count_samples(url: str) -> int:
    """Samples (distinct consecutive keys) in one tar shard, reading only member headers."""
    n, last = 0, None
    with wds.gopen(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            key, _ = base_plus_ext(member.name)
            if member.isreg() and key is not None and key != last:
                n, last = n + 1, key
    return n


def load_index(source: str | Path | Sequence[str]) -> list[Shard]:
    """The shards of `source`: an `index.json` written by `write_shards`, a folder holding
    one, a single `.tar`, a brace pattern (`data/shard-{000000..000009}.tar`) or a list of
    paths/URLs. Without an index the shards are scanned once to count their samples."""
    if isinstance(source, (str, Path)) and not str(source).endswith(".tar") and "{" not in str(source):
        path = Path(source)
        index = path / INDEX_NAME if path.is_dir() else path
        if not index.is_file():
            raise FileNotFoundError(
                f"no shard index at {index}; write shards with `vlmalign data shard` (it writes "
                f"{INDEX_NAME}) or pass the .tar files / a brace pattern instead"
            )
        data = json.loads(index.read_text())
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index}: format {data.get('format')!r}, expected {INDEX_FORMAT!r}")
        return [Shard(str(index.parent / s["name"]), int(s["count"])) for s in data["shards"]]
    urls = [str(source)] if isinstance(source, (str, Path)) else [str(u) for u in source]
    urls = [u for pattern in urls for u in wds.shardlists.expand_urls(pattern)]
    if not urls:
        raise ValueError(f"no shards in {source!r}")
    log.info("no index: counting the samples of %d shards", len(urls))
    return [Shard(u, count_samples(u)) for u in urls]


def index_kind(source: str | Path | Sequence[str]) -> str | None:
    """What the shard set holds according to its `index.json` ("captions" or
    "conversations"; "captions" for an index written before kinds existed), or None when
    `source` names tar files directly (no index to ask)."""
    if not isinstance(source, (str, Path)) or str(source).endswith(".tar") or "{" in str(source):
        return None
    path = Path(source)
    index = path / INDEX_NAME if path.is_dir() else path
    if not index.is_file():
        return None
    return str(json.loads(index.read_text()).get("kind", "captions"))


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes as `images.load_image` decodes a file: fully, EXIF-rotated, 8-bit
    RGB; raises `BadImageError` for bytes PIL cannot decode or images below 2x2."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except Exception as err:
        raise BadImageError(where, f"unreadable or truncated ({type(err).__name__}: {err})") from err
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise BadImageError(where, f"image is {rgb.size[0]}x{rgb.size[1]} pixels")
    return rgb


def _distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the
    RANK / WORLD_SIZE variables torchrun and accelerate set, else (0, 1)."""
    if dist.initialized():
        world, rank = dist.world_and_rank()
        return rank, world
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: hold `size` items, emit a random one as each new item arrives."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamPosition:
    """Where one rank stands in an epoch of its `ShardStream`: enough to continue exactly
    as the interrupted run would have, even after skipped records.

    From `start` on, the rank's sequence is cut into blocks of `batch_size` positions dealt
    to `workers` slots in turn (block k -> slot k % workers; one slot without DataLoader
    workers). Slot s has delivered every record of its blocks before `next[s]`; `first` is
    the slot whose batch comes next. A DataLoader takes its first batch from worker 0, so
    worker w plays slot (w + first) % workers. After a skipped record a worker's batch
    reaches into its next block while the other workers are still behind: that is why one
    offset per rank is not enough with workers (with none, `next[0]` is that offset).

    [Contract] `advance` gets the positions (`meta["position"]`, the items' "index") of a
    batch as the DataLoader returned it: all from one worker, so from one slot.
    """

    epoch: int
    start: int = 0  # positions before it are dropped; blocks are counted from it
    batch_size: int = 1
    workers: int = 1  # slots (DataLoader workers, at least 1)
    next: list[int] = field(default_factory=list)  # per slot; [] = every slot at `start`
    first: int = 0  # slot of the next batch

    def slot(self, position: int) -> int:
        """The slot that serves `position` (>= start)."""
        return ((position - self.start) // self.batch_size) % self.workers

    def advance(self, positions: Sequence[int]) -> None:
        """Count one consumed batch: its slot now owes the records after the batch's last
        one, and the next batch comes from the slot after it."""
        positions = [int(p) for p in positions]
        if not positions:
            raise ValueError("advance() needs the positions of a non-empty batch")
        if len(self.next) != self.workers:
            self.next = [self.start] * self.workers
        slot = self.slot(min(positions))
        self.next[slot] = max(positions) + 1
        self.first = (slot + 1) % self.workers

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (trainer_state.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        """The position `as_dict` wrote; ValueError naming the problem when it is not one."""
        try:
            pos = cls(**{k: data[k] for k in ("epoch", "start", "batch_size", "workers", "next", "first")})
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a stream position (expected epoch, start, batch_size, workers, next, first): "
                             f"{data!r}") from err
        pos.check()
        return pos

    def check(self) -> None:
        """ValueError when the fields cannot describe a position."""
        bad = (self.start < 0 or self.batch_size < 1 or self.workers < 1 or not 0 <= self.first < self.workers
               or len(self.next) not in (0, self.workers) or any(n < self.start for n in self.next))
        if bad:
            raise ValueError(f"inconsistent stream position {self.as_dict()}: need start >= 0, batch_size >= 1, "
                             "0 <= first < workers, and `next` empty or one entry >= start per worker")


def rank_position(saved: dict[str, Any] | None, rank: int, world: int, epoch: int) -> StreamPosition | None:
    """This rank's position from a saved record {"world": n, "ranks": [position dicts,
    by rank]} (the training state's "stream" entry), or None when the record does not
    apply: none saved (an older checkpoint), another world size (the ranks then read
    other parts of the epoch), another epoch, or no entry for this rank."""
    if not saved or saved.get("world") != world:
        return None
    ranks = saved.get("ranks") or []
    if rank >= len(ranks) or ranks[rank] is None:
        return None
    position = StreamPosition.from_dict(ranks[rank])
    return position if position.epoch == epoch else None


class ShardStream(IterableDataset):
    """Samples streamed from tar shards, this rank's share of each epoch (see the module
    docstring for the plan). Yields `Sample`s (`kind="captions"`) or `Conversation`s
    (`kind="conversations"`) whose `image` is a decoded RGB PIL image (`decode="pil"`) or
    the stored bytes (`decode="bytes"`), `meta` = the stored meta + {"shard", "key",
    "position"} (position: index in this rank's epoch sequence); or `transform(sample)`,
    dropped when the transform returns None (it counts its skip in `self.report`).

    `kind=None` takes the kind from the shard set's index.json (captions without one); a
    kind other than the index's raises ValueError.

    `rank` / `world_size` default to torch.distributed (or RANK / WORLD_SIZE), read when the
    stream is built. Call
    `set_epoch(e)` before each epoch (the order is a function of (seed, epoch) only, so a
    DataLoader re-created or with workers gets the same order); `position` / `resume`
    (exact) or `skip(n)` resume inside an epoch. `batch_size` must equal the DataLoader's
    for the worker split to reproduce the rank's sequence. Do not use
    `persistent_workers=True` (workers would keep a stale epoch).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str],
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        batch_size: int = 1,
        even: bool = False,
        decode: str = "pil",
        caption_field: str = "caption",
        transform: Callable[[Any], Any] | None = None,
        kind: str | None = None,
    ) -> None:
        if decode not in ("pil", "bytes"):
            raise ValueError(f"decode must be 'pil' or 'bytes', got {decode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if kind is not None and kind not in SHARD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SHARD_KINDS)}, got {kind!r}")
        self.shards = load_index(source)
        found = index_kind(source)
        if kind is not None and found is not None and found != kind:
            raise ValueError(
                f"{source} holds {found} (its {INDEX_NAME} says kind={found!r}), not {kind}; write "
                f"{kind} shards with `vlmalign data shard --from FILE --kind {kind}` and point data.shards at them"
            )
        self.kind: str = kind or found or "captions"
        env_rank, env_world = _distributed_rank_world()  # resolved now, in the main process
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.seed, self.epoch = seed, epoch
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.batch_size, self.even = batch_size, even
        self.decode, self.caption_field, self.transform = decode, caption_field, transform
        self._resume: StreamPosition | None = None  # where its epoch starts (skip / resume)
        self.report = LoadReport()

    # --------------------------------------------------------------- the epoch's plan
    @property
    def total(self) -> int:
        """Samples in all shards."""
        return sum(s.count for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration streams (its shard order and shuffle)."""
        self.epoch = epoch

    def skip(self, samples: int, epoch: int | None = None) -> None:
        """Drop the first `samples` of this rank's sequence in `epoch` (default: the current
        one) only. `samples` counts positions in the rank's sequence (skipped records
        included): one past the last consumed `meta["position"]` continues exactly without
        DataLoader workers; b * batch_size after b batches only when no record before was
        skipped. With workers use `position` / `resume`, exact in every case."""
        if samples < 0:
            raise ValueError(f"cannot skip a negative number of samples ({samples})")
        self._resume = StreamPosition(self.epoch if epoch is None else epoch, start=samples, batch_size=self.batch_size)

    def resume(self, position: StreamPosition) -> None:
        """Continue `position.epoch` where `position` stands: a `position()` the interrupted
        run advanced with every batch it consumed. Exact when this run has the same
        `batch_size` and DataLoader worker count; otherwise the epoch resumes after the
        furthest record any worker had delivered (a warning says so): nothing is seen
        twice, but records a lagging worker still owed are lost."""
        position.check()
        self._resume = StreamPosition(**position.as_dict())

    def position(self, workers: int = 0) -> StreamPosition:
        """Where the next iteration of the current epoch starts when a DataLoader with
        `workers` workers (0: the main process) reads this stream; a fresh copy, to be
        `advance`d with each batch the loop consumes and saved for `resume`."""
        return self._layout(max(1, workers))

    def _layout(self, workers: int, warn: bool = False) -> StreamPosition:
        """The current epoch's `StreamPosition` for `workers` slots, from `skip`/`resume`."""
        fresh = StreamPosition(self.epoch, 0, self.batch_size, workers, [0] * workers, 0)
        saved = self._resume
        if saved is None or saved.epoch != self.epoch:
            return fresh
        if not saved.next:  # skip(n): every slot from n, blocks counted from n
            return StreamPosition(self.epoch, saved.start, self.batch_size, workers, [saved.start] * workers, 0)
        if (saved.workers, saved.batch_size) == (workers, self.batch_size):
            return StreamPosition(**saved.as_dict())
        start = max(saved.next)
        if warn:
            log.warning("resuming epoch %d with %d DataLoader workers and batch size %d, saved with %d and %d: "
                        "continuing after position %d, where the furthest worker stood (records a slower worker "
                        "still owed are not read); keep both settings for an exact resume",
                        self.epoch, workers, self.batch_size, saved.workers, saved.batch_size, start)
        return StreamPosition(self.epoch, start, self.batch_size, workers, [start] * workers, 0)

    def rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank in the epoch's concatenated stream."""
        rank, world = self.rank, self.world_size
        n = self.total
        if self.even:
            per = n // world
            return rank * per, (rank + 1) * per
        return rank * n // world, (rank + 1) * n // world

    def __len__(self) -> int:
        """Samples this rank reads in an epoch (before `skip`, counting corrupt ones)."""
        start, stop = self.rank_range()
        return stop - start

    def plan(self) -> list[tuple[Shard, int, int]]:
        """This rank's reads for the current epoch: (shard, first, stop) sample positions
        inside each shard, in stream order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"vlmalign-shards:{self.seed}:{self.epoch}").shuffle(order)
        start, stop = self.rank_range()
        reads, offset = [], 0
        for i in order:
            shard = self.shards[i]
            lo, hi = max(start, offset), min(stop, offset + shard.count)
            if lo < hi:
                reads.append((shard, lo - offset, hi - offset))
            offset += shard.count
        return reads

    # --------------------------------------------------------------------- reading
    def _read(self, shard: Shard, first: int, stop: int, counting: bool) -> Iterator[tuple[str, str, dict]]:
        """(url, key, {ext: bytes}) for samples first..stop-1 of one shard; members before
        `first` are passed over without being extracted. A damaged or short tar ends the
        shard early; the samples it lost are counted (by the reader with `counting`)."""
        position, key, record, yielded, error = -1, None, {}, 0, ""
        try:
            with wds.gopen(shard.url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    k, ext = base_plus_ext(member.name)
                    if not member.isreg() or k is None:
                        continue
                    if k != key:
                        if key is not None and first <= position < stop:
                            yield shard.url, key, record
                            yielded += 1
                        position, key, record = position + 1, k, {}
                        if position >= stop:
                            return
                    if position >= first:
                        record[ext.lower()] = tar.extractfile(member).read()
            if key is not None and first <= position < stop:
                yield shard.url, key, record
                yielded += 1
        except (tarfile.TarError, OSError, EOFError) as err:
            error = f"{type(err).__name__}: {err}"
        lost = (stop - first) - yielded
        if lost and counting:
            detail = error or f"the tar holds {position + 1} samples, the index says {shard.count}"
            self.report.skip("corrupt_shard", shard.url, f"{detail}; {lost} samples lost")
            log.warning("shard %s ended early (%s): %d samples lost", shard.url, detail, lost)

    def _image(self, record: dict, where: str) -> tuple[Any, str]:
        """(the record's image, "") or (None, skip reason + detail counted)."""
        ext = next((e for e in IMAGE_EXTS if e in record), None)
        if ext is None:
            self._skipped("missing_image", where, f"no image member ({', '.join(IMAGE_EXTS)})")
            return None, "missing_image"
        if self.decode == "bytes":
            return record[ext], ""
        try:
            return decode_image(record[ext], where), ""
        except BadImageError as err:
            self._skipped("bad_image", where, err.reason)
            return None, "bad_image"

    def _sample(self, url: str, key: str, record: dict, position: int) -> Sample | Conversation | None:
        """A Sample or Conversation from one record's members, or None (skip counted) when
        it is unusable."""
        where = f"{url}:{key}"
        text: dict = {}
        if "json" in record:
            try:
                text = json.loads(record["json"].decode("utf-8"))
                if not isinstance(text, dict):
                    raise ValueError(f"a JSON {type(text).__name__}, not an object")
            except (UnicodeDecodeError, ValueError) as err:
                return self._skipped("malformed_json", where, str(err))
        meta = text.get("meta") if isinstance(text.get("meta"), dict) else {}
        meta = meta | {"shard": Path(url).name, "key": key, "position": position}
        if self.kind == "conversations":
            return self._conversation(text, record, where, meta)
        caption = text.get(self.caption_field) or text.get("caption")
        if not caption and "txt" in record:
            caption = record["txt"].decode("utf-8", errors="replace")
        caption = str(caption or "").strip()
        if not caption:
            return self._skipped("empty_caption", where, f"no {self.caption_field!r} in .json and no .txt")
        image, failed = self._image(record, where)
        if failed:
            return None
        return Sample(
            id=str(text.get("id", key)),
            image=image,
            caption=caption,
            short_caption=str(text.get("short_caption", "")),
            long_caption=str(text.get("long_caption", "")),
            meta=meta,
        )

    def _conversation(self, text: dict, record: dict, where: str, meta: dict) -> Conversation | None:
        """A Conversation from one record, its turns checked by the conversation loader's
        rules (roles, alternation, empty turns: `conversations._parse_turns`) and the
        `<image>` marker put in the first human turn when missing, as the loader does."""
        if "conversations" not in text:
            return self._skipped("missing_key", where, "no .json member with a 'conversations' list")
        turns = _parse_turns(text["conversations"], where, self.report, {})
        if turns is None:
            log.warning("skipping sample %s: its conversation turns are malformed (counted in the report)", where)
            return None
        markers = [t.count(IMAGE_TOKEN) for _, t in turns]
        if sum(markers) > 1 or (sum(markers) == 1 and markers[0] == 0):
            reason = "multiple_image_markers" if sum(markers) > 1 else "misplaced_image_marker"
            return self._skipped(reason, where, f"one {IMAGE_TOKEN} marker, in the first human turn, per record")
        image, failed = self._image(record, where)
        if failed:
            return None
        if markers[0] == 0:
            turns[0] = ("user", f"{IMAGE_TOKEN}\n{turns[0][1]}")
            self.report.repair("inserted_image_marker", where, f"{IMAGE_TOKEN} put at the start of the first human turn")
        return Conversation(id=str(text.get("id", meta["key"])), image=image, turns=turns, meta=meta)

    def _skipped(self, reason: str, where: str, detail: str) -> None:
        self.report.skip(reason, where, detail)
        log.warning("skipping sample %s: %s (%s)", where, reason, detail)
        return None

    def __iter__(self) -> Iterator[Any]:
        rank = self.rank
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        at = self._layout(workers, warn=worker == 0)
        slot = (worker + at.first) % at.workers  # the DataLoader asks worker 0 first
        records = (r for shard, lo, hi in self.plan() for r in self._read(shard, lo, hi, counting=worker == 0))
        if self.shuffle:
            rng = random.Random(f"vlmalign-buffer:{self.seed}:{self.epoch}:{rank}")
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        for position, (url, key, record) in enumerate(records):
            if position < at.next[slot] or at.slot(position) != slot:  # next[slot] >= start
                continue
            sample = self._sample(url, key, record, position)
            if sample is not None and self.transform is not None:
                sample = self.transform(sample)  # None: a skip the transform counted
            if sample is not None:
                yield sample
