"""Where a run's data lives: the files named by `DataConfig`, generating `shapes` on demand."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmalign.config import DataConfig
from vlmalign.data.formats import load_captions_jsonl, load_sugarcrepe
from vlmalign.data.sample import CompositionalItem, LoadReport, Sample

log = logging.getLogger(__name__)


def _resolve(root: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


def ensure_data(cfg: DataConfig) -> Path:
    """The data root; writes the `shapes` dataset there first when it is missing and
    `generate_shapes` is on."""
    root = Path(cfg.root)
    if not (root / "train.jsonl").exists() and not cfg.train_file:
        if not cfg.generate_shapes:
            raise FileNotFoundError(
                f"no training data: {root / 'train.jsonl'} does not exist; set data.root to a "
                "folder in the shapes layout, data.train_file to a captions JSONL, or "
                "data.generate_shapes=true"
            )
        from vlmalign.data.shapes import write_shapes

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
