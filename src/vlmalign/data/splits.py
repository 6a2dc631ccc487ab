"""Where a run's data lives: the files named by `DataConfig`, generating `shapes` on demand."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TypeVar

from vlmalign.config import DataConfig
from vlmalign.data.conversations import Conversation, load_conversations
from vlmalign.data.formats import load_captions_jsonl, load_sugarcrepe
from vlmalign.data.sample import CompositionalItem, LoadReport, Sample

log = logging.getLogger(__name__)

T = TypeVar("T")

# The instruct recipe's default training files in the shapes layout: QA conversations and
# the multiple-choice training questions as conversations (answer = the option letter).
INSTRUCT_TRAIN = "instruct_train.json,mcq_train_conversations.json"


def _resolve(root: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


def ensure_data(cfg: DataConfig) -> Path:
    """The data root; writes the `shapes` dataset there first when it is missing and
    `generate_shapes` is on."""
    root = Path(cfg.root)
    named = [_resolve(root, n.strip()) for n in cfg.train_file.split(",") if n.strip()]
    if not (root / "train.jsonl").exists() and not (named and all(p.exists() for p in named)):
        if not cfg.generate_shapes:
            raise FileNotFoundError(
                f"no training data: {root / 'train.jsonl'} does not exist; set data.root to a "
                "folder in the shapes layout, data.train_file to a captions JSONL, or "
                "data.generate_shapes=true"
            )
        from vlmalign.data.shapes_writer import write_shapes

        log.info("writing the shapes dataset (n=%d, seed=%d) to %s", cfg.shapes_n, cfg.shapes_seed, root)
        write_shapes(root, cfg.shapes_n, seed=cfg.shapes_seed)
    return root


def train_samples(cfg: DataConfig, report: LoadReport | None = None) -> list[Sample]:
    root = ensure_data(cfg)
    path = _resolve(root, cfg.train_file or "train.jsonl")
    return load_captions_jsonl(path, caption_field=cfg.caption_field, report=report)


def eval_samples(cfg: DataConfig, report: LoadReport | None = None) -> list[Sample]:
    root = ensure_data(cfg)
    path = _resolve(root, cfg.eval_file or "test.jsonl")
    samples = load_captions_jsonl(path, caption_field=cfg.caption_field, report=report)
    return samples[: cfg.eval_max_samples] if cfg.eval_max_samples else samples


def compositional_items(cfg: DataConfig, report: LoadReport | None = None) -> list[CompositionalItem]:
    """SugarCrepe-style items for the evaluation images (empty when there is no such file)."""
    root = ensure_data(cfg)
    path = _resolve(root, cfg.compositional_file or "sugarcrepe")
    if not path.exists():
        return []
    items = load_sugarcrepe(path, image_root=root, report=report)
    if cfg.eval_max_samples:
        keep = {str(s.image) for s in eval_samples(cfg)}
        items = [it for it in items if str(it.image) in keep]
    return items


def subsample(records: list[T], fraction: float, seed: int) -> list[T]:
    """A seeded random subset of round(fraction * N) records (at least 1), in their
    original order: the same (records, fraction, seed) always gives the same subset, and
    a smaller fraction's subset is contained in a larger one's."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.data_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or not records:
        return list(records)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: max(1, round(fraction * len(records)))])
    return [records[i] for i in keep]


def train_conversations(cfg: DataConfig, report: LoadReport | None = None) -> list[Conversation]:
    """Instruction conversations from `data.train_file` (comma-separated files, relative
    to the root) or, by default, the shapes layout's instruct files; text-only records
    are skipped (every row of a VLM batch needs its image)."""
    root = ensure_data(cfg)
    names = [n.strip() for n in (cfg.train_file or INSTRUCT_TRAIN).split(",") if n.strip()]
    out: list[Conversation] = []
    for name in names:
        path = _resolve(root, name)
        if not path.exists() and name == "mcq_train_conversations.json" and (root / "mcq_train.json").exists():
            from vlmalign.data.scienceqa import load_mcq_json, write_mcq_conversations

            write_mcq_conversations(load_mcq_json(root / "mcq_train.json", image_root=root), path)
        out += load_conversations(path, image_root=root, report=report, allow_text_only=False)
    return out


def mcq_items(cfg: DataConfig, report: LoadReport | None = None) -> list:
    """Held-out multiple-choice items (`data.mcq_file`, default the shapes layout's
    mcq_test.json), at most `data.eval_max_samples` of them."""
    from vlmalign.data.scienceqa import load_mcq_json

    root = ensure_data(cfg)
    items = load_mcq_json(_resolve(root, cfg.mcq_file or "mcq_test.json"), image_root=root, report=report)
    return items[: cfg.eval_max_samples] if cfg.eval_max_samples else items
