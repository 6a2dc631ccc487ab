"""What a recipe trains on: the records of its data kind, the work done on them once, and
the dataset + collator the loop iterates.

A recipe names its data kind (`Recipe.data`); each kind is one entry in `DATA_KINDS`
holding two functions: `load` (records from the config's files) and `build` (a `TrainSet`
from the prepared records). Kinds:

- `captions`: image-caption pairs (`[<image> x Q] caption <eos>`, data/collate.py);
- `conversations`: LLaVA instruction conversations, loss on assistant turns
  (data/conversations.py);
- `short_long`: short captions train the contrastive loss, long ones the next-token loss
  (VladVA; data/short_long.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch.utils.data import Dataset

from vlmalign import cache
from vlmalign.config import Config
from vlmalign.data.collate import CaptionCollator, CaptionDataset
from vlmalign.data.conversations import (
    ConversationCollator,
    ConversationDataset,
    ConversationLoadReport,
)
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.shards import ShardStream
from vlmalign.data.short_long import ShortLongCollator, ShortLongDataset, split_captions
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
    records: list  # Samples or Conversations
    features: torch.Tensor | None
    text_cache: cache.TextStateCache
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def samples(self) -> list:
        return self.records

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
            probes = [Sample(id=str(i), image=r.image) for i, r in enumerate(records)]
            features, kept = cache.tower_features(model, probes, report=report)
            records = [records[int(p.id)] for p in kept]
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


DATA_KINDS: Registry[DataKind] = Registry("training data kind")


def prepare_text_states(model: VLM, objective: Objective, texts: list[str], text_cache: cache.TextStateCache,
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
    text_states = prepare_text_states(model, objective, [s.caption for s in data.records], data.text_cache, cfg)
    dataset = CaptionDataset(data.records, data.features, text_states, model.preprocess)
    collator = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens,
                               prompt=model.caption_prompt())
    lengths = [len(collator.caption_ids(s.caption)) for s in data.records]
    collator.truncated = 0  # counted again while training
    return TrainSet(dataset, collator, lengths, lambda: collator.truncated)


def _build_conversations(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    if objective.uses_embeddings or objective.uses_patch:
        raise ValueError("conversation data trains the next-token loss only; set objective.contrastive=none and objective.patch_weight=0")
    dataset = ConversationDataset(
        data.records, model.tokenizer, model.image_token_id, model.num_visual_tokens,
        cfg.data.max_conversation_tokens, features=data.features, preprocess=model.preprocess, report=data.report,
    )
    if len(dataset) == 0:
        raise ValueError(f"no trainable conversations: {data.report.summary()}")
    lengths = [len(e.input_ids) for e in dataset.encoded]
    n_truncated = sum(e.truncated for e in dataset.encoded)
    return TrainSet(dataset, ConversationCollator(model.tokenizer), lengths, lambda: n_truncated)


def _build_short_long(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    keep, captions = split_captions(data.records, model.tokenizer, cfg.data, data.report)
    if not keep:
        raise ValueError(f"no sample has a short or long caption: {data.report.summary()}")
    images = [data.records[i].image for i in keep]
    features = data.features[keep] if data.features is not None else None
    shorts = [c.short for c in captions if c.short]
    states = prepare_text_states(model, objective, shorts, data.text_cache, cfg) if shorts else None
    if states is not None:  # rows aligned with `captions` (zeros where there is no short caption)
        full = states.new_zeros(len(captions), states.shape[1])
        full[[i for i, c in enumerate(captions) if c.short]] = states
        states = full
    dataset = ShortLongDataset(captions, images, features, states, model.preprocess)
    collator = ShortLongCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.long_max_tokens)
    lengths = [len(model.tokenizer(c.long or c.short, add_special_tokens=False).input_ids) for c in captions]
    return TrainSet(dataset, collator, lengths, lambda: collator.truncated)


DATA_KINDS.register("captions")(DataKind(lambda cfg, report: train_samples(cfg.data, report), _build_captions))
DATA_KINDS.register("conversations")(
    DataKind(lambda cfg, report: train_conversations(cfg.data, report), _build_conversations)
)
DATA_KINDS.register("short_long")(DataKind(lambda cfg, report: train_samples(cfg.data, report), _build_short_long))


def build_stream(model: VLM, cfg: Config, rank: int, world: int) -> TrainSet:
    """Caption pairs streamed from `data.shards`, this rank's share of each epoch (no
    sample twice, `data/shards.py`); images preprocessed as they arrive. Estimates the
    centring mean on the first `embedding.centre_samples` captions when it is missing."""
    def to_item(sample: Sample) -> dict:
        return {"index": sample.meta["position"], "caption": sample.caption,
                "pixel_values": model.preprocess([sample.image])[0]}

    tc = cfg.train
    stream = ShardStream(cfg.data.shards, rank=rank, world_size=world, seed=tc.seed, batch_size=tc.batch_size,
                         even=True, caption_field=cfg.data.caption_field, transform=to_item)
    if cfg.embedding.centre and not bool(model.embed_mean_ready):
        head = ShardStream(cfg.data.shards, rank=0, world_size=1, seed=tc.seed, decode="bytes",
                           caption_field=cfg.data.caption_field)
        texts = [s.caption for s in itertools.islice(head, cfg.embedding.centre_samples)]
        with torch.no_grad():
            model.set_embedding_mean(torch.cat([model.text_states(texts[i : i + 64]) for i in range(0, len(texts), 64)]))
    collator = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, cfg.data.max_caption_tokens,
                               prompt=model.caption_prompt())
    return TrainSet(stream, collator, [], lambda: collator.truncated, stream=stream)


def build_trainset(model: VLM, objective: Objective, data: TrainData, cfg: Config) -> TrainSet:
    """The dataset, collator and lengths for `data.kind`."""
    return DATA_KINDS.get(data.kind).build(model, objective, data, cfg)
