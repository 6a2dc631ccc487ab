"""What a recipe trains on: the records of its data kind, the work done on them once, and
the dataset + collator the loop iterates.

A recipe names its data kind (`Recipe.data`); each kind is one entry in `DATA_KINDS`
holding three functions: `load` (records from the config's files), `build` (a `TrainSet`
from the prepared records) and `stream` (a `TrainSet` streamed from `data.shards`, each
record encoded as it arrives by the same code `build` uses). Kinds:

- `captions`: image-caption pairs (`[<image> x Q] caption <eos>`, data/collate.py);
- `conversations`: LLaVA instruction conversations, loss on assistant turns
  (data/conversations.py);
- `short_long`: short captions train the contrastive loss, long ones the next-token loss
  (VladVA; data/short_long.py).

A streamed record that the map-style path would skip (no label left after truncation, no
short or long caption, a template mismatch) is skipped and counted in the stream's report.

[Contract] A streamed item's "index" is its record's position in the rank's sequence
(`meta["position"]`): the collators pass it on as `batch["index"]`, and the trainer
advances the stream's `StreamPosition` with it, which is how a resumed run continues at
the exact record after its last batch even when records were skipped.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch.utils.data import Dataset

from vlmalign import cache
from vlmalign.config import Config
from vlmalign.data.collate import CaptionCollator, CaptionDataset
from vlmalign.data.conversations import (
    Conversation,
    ConversationCollator,
    ConversationDataset,
    ConversationLoadReport,
    TemplateMismatchError,
    encode_conversation,
)
from vlmalign.data.records import Column, ImageProbes, take
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.shards import ShardStream
from vlmalign.data.short_long import ShortLong, ShortLongCollator, ShortLongDataset, split_captions
from vlmalign.data.splits import subsample, train_conversations, train_samples
from vlmalign.models.registry import Registry
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective

log = logging.getLogger(__name__)
console = Console()


@dataclass
class TrainData:
    """A recipe's training records with what is computed once: tower features (frozen
    tower; rows align with `records`) and a text-state cache (frozen text path). Shared by
    several recipes trained on the same backbone (the demo)."""

    kind: str
    records: Sequence  # Samples or Conversations: a RecordStore as loaded (data/records.py), or a list
    features: torch.Tensor | None
    text_cache: cache.TextStateCache
    report: LoadReport = field(default_factory=LoadReport)

    @classmethod
    def prepare(
        cls, model: VLM, cfg: Config, kind: str = "captions", text_cache: cache.TextStateCache | None = None
    ) -> TrainData:
        """Load the kind's records (subsampled to `data.data_fraction`), cache tower
        features of their images when the tower is frozen, count what was skipped."""
        loader = DATA_KINDS.get(kind)
        report = ConversationLoadReport() if kind == "conversations" else LoadReport()
        records = loader.load(cfg, report)
        if cfg.data.data_fraction < 1.0:
            n = len(records)
            records = subsample(records, cfg.data.data_fraction, cfg.data.fraction_seed)
            console.print(f"data: a {cfg.data.data_fraction:g} fraction: {len(records)} of {n} records (seed {cfg.data.fraction_seed})")
        features = None
        if cfg.train.cache_vision_features and cfg.vision.frozen:
            t = time.perf_counter()
            # one small probe per record, not a Sample with its Path: the records stay compact
            features, kept = cache.tower_features(model, ImageProbes(records), report=report)
            records = take(records, [p.index for p in kept])
            log.info("cached tower features for %d images in %.1f s", len(records), time.perf_counter() - t)
        if report.total_skipped():
            console.print(f"[yellow]data: {report.summary()}")
        if not records:
            raise ValueError(f"no usable training records of kind {kind!r} under {cfg.data.root}")
        return cls(kind, records, features, text_cache if text_cache is not None else cache.TextStateCache(), report)


@dataclass
class TrainSet:
    """What the loop iterates: a map-style dataset, its collator, and the token length of
    each item (for length-grouped batches)."""

    dataset: Dataset
    collator: Callable[[list[dict]], dict]
    lengths: list[int]
    truncated: Callable[[], int]  # items cut to the length limit so far
    stream: ShardStream | None = None  # an iterable dataset streamed from shards


@dataclass(frozen=True)
class DataKind:
    load: Callable[[Config, LoadReport], list]
    build: Callable[[VLM, Objective, TrainData, Config], TrainSet]
    # (model, objective or None, cfg, stream) -> TrainSet; sets `stream.transform`
    stream: Callable[[VLM, Objective | None, Config, ShardStream], TrainSet]
    shard_kind: str = "captions"  # what its shards hold (data/shards.py SHARD_KINDS)


DATA_KINDS: Registry[DataKind] = Registry("training data kind")


def prepare_text_states(model: VLM, objective: Objective, texts: Sequence[str], text_cache: cache.TextStateCache,
                        cfg: Config) -> torch.Tensor | None:
    """Cached prompted text states of the training texts when the contrastive loss needs
    them and nothing on the text path trains ([N, D], or None); estimates the centring mean
    once on the first `embedding.centre_samples` texts (a resumed run has it back with its
    weights, and a model reused across recipes keeps its own)."""
    frozen = model.text_path_frozen()
    need_mean = cfg.embedding.centre and not bool(model.embed_mean_ready)
    states = None
    if (objective.uses_embeddings or need_mean) and cfg.train.cache_text_embeddings and frozen:
        states = text_cache.states(model, texts)  # [N, D]
    if need_mean:
        head = texts[: cfg.embedding.centre_samples]
        if states is not None:
            model.set_embedding_mean(states[: len(head)])
        else:
            with torch.no_grad():
                model.set_embedding_mean(torch.cat([model.text_states(head[i : i + 64]) for i in range(0, len(head), 64)]))
    return states if objective.uses_embeddings and frozen else None


def _build_captions(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    text_states = prepare_text_states(model, objective, Column(data.records, "caption"), data.text_cache, cfg)
    dataset = CaptionDataset(data.records, data.features, text_states, model.preprocess)
    collator = _caption_collator(model, cfg)
    lengths = [len(collator.caption_ids(s.caption)) for s in data.records]
    collator.truncated = 0  # counted again while training
    return TrainSet(dataset, collator, lengths, lambda: collator.truncated)


def _caption_collator(model: VLM, cfg: Config) -> CaptionCollator:
    """The caption collator of the map-style and the streamed paths alike."""
    return CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens,
                           prompt=model.caption_prompt())


def _require_ntp_only(objective: Objective | None) -> None:
    if objective is not None and (objective.uses_embeddings or objective.uses_patch):
        raise ValueError("conversation data trains the next-token loss only; set objective.contrastive=none and objective.patch_weight=0")


def _build_conversations(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    _require_ntp_only(objective)
    dataset = ConversationDataset(
        data.records, model.tokenizer, model.image_token_id, model.num_visual_tokens,
        cfg.data.max_conversation_tokens, features=data.features, preprocess=model.preprocess, report=data.report,
    )
    if len(dataset) == 0:
        raise ValueError(f"no trainable conversations: {data.report.summary()}")
    lengths = [len(e.input_ids) for e in dataset.encoded]
    n_truncated = sum(e.truncated for e in dataset.encoded)
    return TrainSet(dataset, ConversationCollator(model.tokenizer), lengths, lambda: n_truncated)


def short_long_collator(model: VLM, cfg: Config) -> ShortLongCollator:
    """The short/long batcher; long captions continue the image embedding prompt when
    `data.long_caption_prompted` is on."""
    prompt = model.caption_prompt("prompted") if cfg.data.long_caption_prompted else None
    return ShortLongCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens,
                             cfg.data.long_max_tokens, prompt)


def _build_short_long(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    keep, captions = split_captions(data.records, model.tokenizer, cfg.data, data.report)
    if not keep:
        raise ValueError(f"no sample has a short or long caption: {data.report.summary()}")
    images = Column(data.records, "image", keep)  # read per item, not a list of every path
    features = data.features[keep] if data.features is not None else None
    shorts = [c.short for c in captions if c.short]
    states = prepare_text_states(model, objective, shorts, data.text_cache, cfg) if shorts else None
    if states is not None:  # rows aligned with `captions` (zeros where there is no short caption)
        full = states.new_zeros(len(captions), states.shape[1])
        full[[i for i, c in enumerate(captions) if c.short]] = states
        states = full
    dataset = ShortLongDataset(captions, images, features, states, model.preprocess)
    collator = short_long_collator(model, cfg)
    lengths = [len(model.tokenizer(c.long or c.short, add_special_tokens=False).input_ids) for c in captions]
    return TrainSet(dataset, collator, lengths, lambda: collator.truncated)


def _set_mean_from_stream(model: VLM, cfg: Config, texts: Callable[[Sample], list[str]], kind: str) -> None:
    """Estimate the centring mean on the first `embedding.centre_samples` contrastive texts
    of the shard set (every rank reads the same head: rank 0 of 1, the run's seed), as
    `prepare_text_states` does on the map-style records, when centring is on and the
    model has no mean yet."""
    if not cfg.embedding.centre or bool(model.embed_mean_ready):
        return
    head = ShardStream(cfg.data.shards, rank=0, world_size=1, seed=cfg.train.seed, decode="bytes",
                       caption_field=cfg.data.caption_field, kind=kind)
    found = (t for sample in head for t in texts(sample))
    chosen = list(itertools.islice(found, cfg.embedding.centre_samples))
    if not chosen:
        raise ValueError(f"data.shards={cfg.data.shards}: no text to estimate the embedding mean from "
                         f"({head.report.summary() or 'the shards are empty'})")
    with torch.no_grad():
        model.set_embedding_mean(torch.cat([model.text_states(chosen[i : i + 64]) for i in range(0, len(chosen), 64)]))


def _stream_captions(model: VLM, objective: Objective | None, cfg: Config, stream: ShardStream) -> TrainSet:
    """Caption pairs as `CaptionDataset` items (text states computed each step)."""
    def to_item(sample: Sample) -> dict:
        return {"index": sample.meta["position"], "id": sample.id, "caption": sample.caption,
                "pixel_values": model.preprocess([sample.image])[0]}

    _set_mean_from_stream(model, cfg, lambda s: [s.caption], "captions")
    stream.transform = to_item
    collator = _caption_collator(model, cfg)
    return TrainSet(stream, collator, [], lambda: collator.truncated, stream=stream)


def _stream_conversations(model: VLM, objective: Objective | None, cfg: Config, stream: ShardStream) -> TrainSet:
    """Conversations encoded as `ConversationDataset` encodes them (`encode_conversation`:
    the chat template, assistant-only labels, the template check) and batched by the same
    `ConversationCollator`. A record with no label left after truncation is skipped as in
    the map-style path; a template mismatch is a counted skip here (the first records
    are checked before training, `_check_stream_head`, so a wrong template still fails
    at once)."""
    _require_ntp_only(objective)
    max_len = cfg.data.max_conversation_tokens
    counts = {"truncated": 0}

    def encode(conv: Conversation) -> dict | None:
        where = f"{conv.meta.get('shard')}:{conv.meta.get('key')} ({conv.id})"
        try:
            enc = encode_conversation(conv, model.tokenizer, model.image_token_id, model.num_visual_tokens, max_len)
        except TemplateMismatchError as err:
            stream.report.skip("template_mismatch", where, str(err))
            log.warning("skipping conversation %s: %s", where, err)
            return None
        if enc.num_labels == 0:
            stream.report.skip("no_labels_after_truncation", where, f"{max_len} tokens hold no assistant token; "
                               "raise data.max_conversation_tokens")
            return None
        counts["truncated"] += enc.truncated
        return {"index": conv.meta["position"], "id": conv.id, "input_ids": enc.input_ids, "labels": enc.labels}

    def to_item(conv: Conversation) -> dict | None:
        item = encode(conv)
        if item is not None:
            item["pixel_values"] = model.preprocess([conv.image])[0]  # [3, H, W]
        return item

    def usable(conv: Conversation) -> bool:  # raises TemplateMismatchError, as the map-style path
        enc = encode_conversation(conv, model.tokenizer, model.image_token_id, model.num_visual_tokens, max_len)
        return enc.num_labels > 0

    _check_stream_head(cfg, "conversations", usable)
    stream.transform = to_item
    return TrainSet(stream, ConversationCollator(model.tokenizer), [], lambda: counts["truncated"], stream=stream)


def _stream_short_long(model: VLM, objective: Objective | None, cfg: Config, stream: ShardStream) -> TrainSet:
    """Samples split into short / long captions by `split_captions` (the token-count rule
    of `data.short_max_tokens`, `long_min_tokens`, `long_max_tokens`) and batched by the
    same `ShortLongCollator` as the map-style path; a sample with neither is skipped and
    counted. The text states of short captions are computed each step."""
    def split(sample: Sample, report: LoadReport) -> ShortLong | None:
        keep, captions = split_captions([sample], model.tokenizer, cfg.data, report)
        return captions[0] if keep else None

    def to_item(sample: Sample) -> dict | None:
        c = split(sample, stream.report)
        if c is None:
            return None
        return {"index": sample.meta["position"], "id": sample.id, "short": c.short, "long": c.long,
                "pixel_values": model.preprocess([sample.image])[0]}  # [3, H, W]

    _check_stream_head(cfg, "captions", lambda s: split(s, LoadReport()) is not None)
    _set_mean_from_stream(model, cfg, lambda s: [c.short] if (c := split(s, LoadReport())) and c.short else [],
                          "captions")
    stream.transform = to_item
    collator = short_long_collator(model, cfg)
    return TrainSet(stream, collator, [], lambda: collator.truncated, stream=stream)


# Records read before training to catch a data set the stream would skip entirely (a
# wrong template or caption field): the map-style path fails on those before step 1 too.
STREAM_HEAD_CHECK = 64


def _check_stream_head(cfg: Config, shard_kind: str, usable: Callable[[Sample | Conversation], bool]) -> None:
    """Raise before training when none of the first `STREAM_HEAD_CHECK` records of the
    shards (in the written order) is `usable`; `usable` may raise itself (a conversation
    failing the template check raises `TemplateMismatchError`, as in the map-style path)."""
    head = ShardStream(cfg.data.shards, rank=0, world_size=1, shuffle=False, decode="bytes",
                       caption_field=cfg.data.caption_field, kind=shard_kind)
    seen = [usable(r) for r in itertools.islice(head, STREAM_HEAD_CHECK)]
    if any(seen):
        return
    raise ValueError(f"data.shards={cfg.data.shards}: none of the first {len(seen)} records is usable for "
                     f"training ({head.report.summary() or 'the shards are empty'})")


DATA_KINDS.register("captions")(
    DataKind(lambda cfg, report: train_samples(cfg.data, report), _build_captions, _stream_captions)
)
DATA_KINDS.register("conversations")(
    DataKind(lambda cfg, report: train_conversations(cfg.data, report), _build_conversations, _stream_conversations,
             shard_kind="conversations")
)
DATA_KINDS.register("short_long")(
    DataKind(lambda cfg, report: train_samples(cfg.data, report), _build_short_long, _stream_short_long)
)


def build_stream(model: VLM, cfg: Config, rank: int, world: int, kind: str = "captions",
                 objective: Objective | None = None) -> TrainSet:
    """The records of data kind `kind` ("captions", "conversations", "short_long")
    streamed from `data.shards`, this rank's share of each epoch (no record twice,
    data/shards.py), each encoded as it arrives by the code the map-style builder of the
    kind uses, with the same collator. `objective` lets the conversation kind reject a
    contrastive objective as the map-style path does. Estimates the centring mean on
    the first `embedding.centre_samples` contrastive texts when it is missing.

    Raises ValueError when the shards hold another kind of data (index.json), when
    `data.data_fraction` < 1 (a stream is not subsampled: shard the subset instead), or
    when none of the first records is usable.
    """
    entry = DATA_KINDS.get(kind)
    if cfg.data.data_fraction < 1.0:
        raise ValueError(f"data.data_fraction={cfg.data.data_fraction:g} does not apply to streamed shards "
                         f"(data.shards={cfg.data.shards}); write the subset as its own shards, or set "
                         "data.data_fraction=1")
    tc = cfg.train
    stream = ShardStream(cfg.data.shards, rank=rank, world_size=world, seed=tc.seed, batch_size=tc.batch_size,
                         even=True, caption_field=cfg.data.caption_field, kind=entry.shard_kind)
    return entry.stream(model, objective, cfg, stream)


def build_trainset(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    """The dataset, collator and lengths for `data.kind`."""
    return DATA_KINDS.get(data.kind).build(model, objective, data, cfg)
