"""Where a run's data lives: the files named by `DataConfig`, generating `shapes` on demand."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from vlmalign.config import DataConfig
from vlmalign.data.conversations import CONVERSATION_CODEC, Conversation, iter_conversations
from vlmalign.data.formats import iter_captions_jsonl, load_captions_jsonl, load_sugarcrepe
from vlmalign.data.records import RecordStore, take
from vlmalign.data.sample import CompositionalItem, DataPathError, LoadReport, Sample

log = logging.getLogger(__name__)

T = TypeVar("T")

# The instruct recipe's default training files in the shapes layout: QA conversations and
# the multiple-choice training questions as conversations (answer = the option letter).
INSTRUCT_TRAIN = "instruct_train.json,mcq_train_conversations.json"


def _resolve(root: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


# What `write_shapes` creates directly under its folder: the names a config may use for
# the shapes layout, and so the only files generation may be asked to make.
SHAPES_LAYOUT = frozenset({
    "train.jsonl", "val.jsonl", "test.jsonl", "meta.json", "images", "sugarcrepe", "sugarcrepe_val",
    "karpathy_shapes.json", "zeroshot", "mcq_train_conversations.json",
    *(f"{kind}_{split}.json" for kind in ("instruct", "mcq") for split in ("train", "val", "test")),
})
# Files a config names, by key; each is checked before anything is read or written.
PATH_KEYS = ("train_file", "eval_file", "compositional_file", "mcq_file", "karpathy_file", "zeroshot_dir")


def is_shapes_folder(root: str | Path) -> bool:
    """Whether `root` holds a dataset `write_shapes` made (its meta.json says so)."""
    meta = Path(root) / "meta.json"
    try:
        return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("dataset") == "shapes"
    except (ValueError, OSError, AttributeError):
        return False


def _train_paths(cfg: DataConfig) -> list[Path]:
    return [_resolve(Path(cfg.root), n.strip()) for n in cfg.train_file.split(",") if n.strip()]


def _in_layout(path: Path, root: Path) -> bool:
    """`path` is one of the shapes layout's names directly under `root`."""
    return path.name in SHAPES_LAYOUT and path.parent.resolve() == root.resolve()


def uses_shapes_layout(cfg: DataConfig) -> bool:
    """Whether the run trains on a folder in the shapes layout (then the layout's held-out
    files, SugarCrepe items and benchmarks are its evaluation data): no `data.train_file`
    and a root that holds `train.jsonl` or a shapes dataset (or is to get one), or
    training files that are layout files of a shapes dataset. A user's own file named in
    `data.train_file` never is, so a run on it is never evaluated on shapes files that
    happen to lie beside it."""
    root = Path(cfg.root)
    if not cfg.train_file.strip():
        # a shapes dataset, one to be generated there, or a folder made in its layout
        return _folder_state(root) != "other" or (root / "train.jsonl").is_file()
    return is_shapes_folder(root) and all(_in_layout(p, root) for p in _train_paths(cfg))


def _folder_state(root: Path) -> str:
    """"absent", "empty", "shapes" (a shapes dataset) or "other" (somebody's files)."""
    if not root.exists():
        return "absent"
    if not root.is_dir():
        return "other"
    if is_shapes_folder(root):
        return "shapes"
    return "other" if any(root.iterdir()) else "empty"


def _missing(key: str, value: str, path: Path, cfg: DataConfig, why: str = "") -> DataPathError:
    given = Path(value)
    hint = ""
    if not given.is_absolute() and given.exists() and path != given:
        hint = (f"; {value} exists relative to the current folder: relative paths are resolved under "
                f"data.root, so give data.{key}={given.resolve()} (absolute) or a path relative to data.root")
    relative = "" if given.is_absolute() else f" (relative to data.root={cfg.root!r})"
    return DataPathError(f"data.{key}={value!r} resolves to {path}{relative}, which does not exist{why}{hint}")


def check_data_paths(cfg: DataConfig, keys: tuple[str, ...] = PATH_KEYS, layout_ok: bool = False) -> None:
    """Raise `DataPathError` for the first file named by `data.<key>` that does not exist,
    naming the key, the value given and the path it resolved to. With `layout_ok`, names
    `write_shapes` is about to create under the root are let through."""
    root = Path(cfg.root)
    for key in keys:
        value = getattr(cfg, key)
        for name in [n.strip() for n in value.split(",") if n.strip()] if key == "train_file" else [value.strip()]:
            if not name:
                continue
            path = _resolve(root, name)
            if path.exists() or (layout_ok and _in_layout(path, root)):
                continue
            if (path.name == "mcq_train_conversations.json" and (path.parent / "mcq_train.json").exists()
                    and is_shapes_folder(path.parent)):
                continue  # made from mcq_train.json on first use (train_conversations)
            raise _missing(key, name if key == "train_file" else value, path, cfg)


def ensure_data(cfg: DataConfig, training: bool = True) -> Path:
    """The data root, checked: every file the config names exists, or a `DataPathError`
    names the key, the value and the resolved path before anything is written.

    The `shapes` dataset is written only when the run asks for the shapes layout (no
    `data.train_file`, or only layout file names) and `data.root` is absent, empty or an
    older shapes dataset: never into a folder holding other files. With
    `training=False` (evaluation) no training file is needed when the config names its
    evaluation files (`data.eval_file`, or a user's training file to hold a split of).
    """
    root = Path(cfg.root)
    if not training and (cfg.eval_file.strip() or cfg.train_file.strip()) and not uses_shapes_layout(cfg):
        keys = tuple(k for k in PATH_KEYS if k != "train_file" or holds_out(cfg))
        check_data_paths(cfg, keys)
        return root
    layout = uses_shapes_layout(cfg) or (not is_shapes_folder(root) and all(_in_layout(p, root) for p in _train_paths(cfg)))
    needed = _train_paths(cfg) if cfg.train_file.strip() else [root / "train.jsonl"]
    if all(p.exists() for p in needed):
        check_data_paths(cfg)
        return root
    state = _folder_state(root)
    if not (layout and cfg.generate_shapes and state in ("absent", "empty", "shapes")):
        if cfg.train_file.strip():
            check_data_paths(cfg, ("train_file",))
        why = {"other": f"; {root} holds other files, so the shapes dataset is not written there",
               "absent": "", "empty": "", "shapes": ""}[state]
        if not cfg.generate_shapes:
            why += "; data.generate_shapes is off"
        raise DataPathError(
            f"no training data: data.root={cfg.root!r} has no train.jsonl{why}. Name your training "
            "file with data.train_file=FILE (relative to data.root, or absolute), or point data.root at "
            "a shapes dataset (`vlmalign data shapes --out DIR`) or at a new folder to generate one"
        )
    check_data_paths(cfg, layout_ok=True)  # the files named besides the layout's: before writing
    from vlmalign.data.shapes_writer import write_shapes

    log.info("writing the shapes dataset (n=%d, seed=%d) to %s", cfg.shapes_n, cfg.shapes_seed, root)
    write_shapes(root, cfg.shapes_n, seed=cfg.shapes_seed)
    check_data_paths(cfg)
    return root


def holds_out(cfg: DataConfig) -> bool:
    """Whether evaluation uses a held-out split of `data.train_file`: the user's own
    captions (not the shapes layout) with no `data.eval_file`."""
    return bool(cfg.train_file.strip()) and not cfg.eval_file.strip() and not uses_shapes_layout(cfg)


def heldout_indices(n: int, cfg: DataConfig) -> list[int]:
    """Positions (sorted) of the held-out records among `n` loaded training records: a
    seeded random `data.heldout_fraction` of them (at least 2 from 4 records on, so
    retrieval has a distractor; at most `data.heldout_max`); none below 2 records."""
    if not 0.0 < cfg.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}")
    if n < 2:
        return []
    k = min(max(2 if n >= 4 else 1, round(cfg.heldout_fraction * n)), max(cfg.heldout_max, 1), n - 1)
    order = list(range(n))
    random.Random(f"heldout-{cfg.heldout_seed}").shuffle(order)
    return sorted(order[:k])


def _split_heldout(samples: Sequence[Sample], cfg: DataConfig) -> tuple[Sequence[Sample], Sequence[Sample]]:
    held = heldout_indices(len(samples), cfg)
    rest = np.ones(len(samples), dtype=bool)
    rest[held] = False
    return take(samples, np.flatnonzero(rest)), take(samples, held)


def train_samples(cfg: DataConfig, report: LoadReport | None = None, holdout: bool = True) -> RecordStore[Sample]:
    """Training pairs of `data.train_file` (default the layout's train.jsonl); without an
    eval file the held-out split (`heldout_indices`) is left out unless `holdout=False`."""
    root = ensure_data(cfg)
    path = _resolve(root, cfg.train_file or "train.jsonl")
    samples = load_captions_jsonl(path, caption_field=cfg.caption_field, report=report,
                                  allow_outside_root=cfg.allow_outside_root)
    if holdout and holds_out(cfg):
        samples, held = _split_heldout(samples, cfg)
        log.info("held out %d of %d records of %s for evaluation", len(held), len(samples) + len(held), path)
    return samples


def iter_all_train_samples(cfg: DataConfig, report: LoadReport | None = None) -> Iterator[Sample]:
    """Every record of the training captions file, one at a time, held-out ones included
    (`vlmalign data check` reads files of any size)."""
    root = ensure_data(cfg)
    yield from iter_captions_jsonl(_resolve(root, cfg.train_file or "train.jsonl"), caption_field=cfg.caption_field,
                                   report=report, allow_outside_root=cfg.allow_outside_root)


def eval_samples(cfg: DataConfig, report: LoadReport | None = None) -> Sequence[Sample]:
    """Held-out pairs: `data.eval_file`, else the held-out split of the user's training
    file (`holds_out`), else the shapes layout's test.jsonl; at most
    `data.eval_max_samples`. Empty for a user's data with neither."""
    root = ensure_data(cfg, training=False)
    if holds_out(cfg):
        path = _resolve(root, cfg.train_file)
        _, samples = _split_heldout(load_captions_jsonl(path, caption_field=cfg.caption_field, report=report,
                                                        allow_outside_root=cfg.allow_outside_root), cfg)
    elif cfg.eval_file.strip() or uses_shapes_layout(cfg):
        path = _resolve(root, cfg.eval_file or "test.jsonl")
        samples = load_captions_jsonl(path, caption_field=cfg.caption_field, report=report,
                                      allow_outside_root=cfg.allow_outside_root)
    else:
        samples = []
    return samples[: cfg.eval_max_samples] if cfg.eval_max_samples else samples


def compositional_path(cfg: DataConfig) -> Path | None:
    """`data.compositional_file`, or the shapes layout's sugarcrepe/ folder; None when the
    run has neither."""
    root = Path(cfg.root)
    if cfg.compositional_file.strip():
        return _resolve(root, cfg.compositional_file)
    path = root / "sugarcrepe"
    return path if uses_shapes_layout(cfg) and path.exists() else None


def compositional_items(cfg: DataConfig, report: LoadReport | None = None) -> list[CompositionalItem]:
    """SugarCrepe-style items (`compositional_path`; empty when there is none), restricted
    to the evaluated images when `data.eval_max_samples` caps them."""
    root = ensure_data(cfg, training=False)
    path = compositional_path(cfg)
    if path is None:
        return []
    items = load_sugarcrepe(path, image_root=root, report=report, allow_outside_root=cfg.allow_outside_root)
    if cfg.eval_max_samples:
        keep = {str(s.image) for s in eval_samples(cfg)}
        items = [it for it in items if str(it.image) in keep]
    return items


def subsample(records: Sequence[T], fraction: float, seed: int) -> Sequence[T]:
    """A seeded random subset of round(fraction * N) records (at least 1), in their
    original order: the same (records, fraction, seed) always gives the same subset, and
    a smaller fraction's subset is contained in a larger one's. A `RecordStore` gives a
    store over the same bytes, a list a list."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.data_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or not records:
        return records[:]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return take(records, sorted(order[: max(1, round(fraction * len(records)))]))


def train_conversations(cfg: DataConfig, report: LoadReport | None = None) -> RecordStore[Conversation]:
    """Instruction conversations from `data.train_file` (comma-separated files, relative
    to the root) or, by default, the shapes layout's instruct files, in one compact
    `RecordStore` (data/records.py); text-only records are skipped (every row of a VLM
    batch needs its image)."""
    return RecordStore.build(iter_train_conversations(cfg, report), CONVERSATION_CODEC)


def iter_train_conversations(cfg: DataConfig, report: LoadReport | None = None) -> Iterator[Conversation]:
    """`train_conversations` one at a time (`vlmalign data check` reads files of any size)."""
    root = ensure_data(cfg)
    names = [n.strip() for n in (cfg.train_file or INSTRUCT_TRAIN).split(",") if n.strip()]
    for name in names:
        path = _resolve(root, name)
        if (not path.exists() and name == "mcq_train_conversations.json" and (root / "mcq_train.json").exists()
                and is_shapes_folder(root)):  # vlmalign's own folder: a derived file may be cached there
            from vlmalign.data.scienceqa import load_mcq_json, write_mcq_conversations

            write_mcq_conversations(load_mcq_json(root / "mcq_train.json", image_root=root), path)
        yield from iter_conversations(path, image_root=root, report=report, allow_text_only=False,
                                      allow_outside_root=cfg.allow_outside_root)


def mcq_path(cfg: DataConfig) -> Path | None:
    """`data.mcq_file`, or the shapes layout's mcq_test.json; None when the run has neither."""
    root = Path(cfg.root)
    if cfg.mcq_file.strip():
        return _resolve(root, cfg.mcq_file)
    return root / "mcq_test.json" if uses_shapes_layout(cfg) else None


def mcq_items(cfg: DataConfig, report: LoadReport | None = None) -> list:
    """Held-out multiple-choice items (`mcq_path`; empty when there is none), at most
    `data.eval_max_samples` of them."""
    from vlmalign.data.scienceqa import load_mcq_json

    root = ensure_data(cfg, training=False)
    path = mcq_path(cfg)
    if path is None:
        return []
    items = load_mcq_json(path, image_root=root, report=report, allow_outside_root=cfg.allow_outside_root)
    return items[: cfg.eval_max_samples] if cfg.eval_max_samples else items


def benchmark_paths(cfg: DataConfig) -> tuple[Path | None, Path | None]:
    """(Karpathy-split JSON, zero-shot image folder) of the run, None when absent:
    `data.karpathy_file` / `data.zeroshot_dir` (any name, relative to the root), else, on
    the shapes layout, its `karpathy_shapes.json` / `zeroshot/`. A user's own data gets
    only the files it names: nothing found lying in its folder is evaluated unasked."""
    root = Path(cfg.root)
    karpathy = _resolve(root, cfg.karpathy_file) if cfg.karpathy_file.strip() else None
    zeroshot = _resolve(root, cfg.zeroshot_dir) if cfg.zeroshot_dir.strip() else None
    if uses_shapes_layout(cfg):
        if karpathy is None and (root / "karpathy_shapes.json").is_file():
            karpathy = root / "karpathy_shapes.json"
        if zeroshot is None and (root / "zeroshot").is_dir():
            zeroshot = root / "zeroshot"
    return karpathy, zeroshot
