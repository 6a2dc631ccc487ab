"""Writing the `shapes` dataset to disk: the scenes and captions of `shapes.py` and the
instruction questions of `instruct.py`, in the file formats the loaders read.

`shapes.py` is the scene library (scenes, captions, negatives) that `instruct.py` builds
its questions on; this module sits above both, so neither imports the other's writer.
Same arguments -> byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .instruct import HELDOUT_MCQ_PER_IMAGE, INSTRUCT_FILES, write_instruct_files
from .shapes import (
    BACKGROUNDS,
    BASE_SIZE,
    COLOURS,
    KARPATHY_FILE,
    NEGATIVE_CATEGORIES,
    RELATIONS,
    SHAPES,
    SIZES,
    ZEROSHOT_DIR,
    ShapesExample,
    generate_shapes,
    karpathy_captions,
    render_scene,
    zeroshot_scenes,
)


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def _split_indices(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Example indices per split (sorted), drawn from their own seeded shuffle."""
    _, n_val, n_test = _split_counts(n, val_fraction, test_fraction)
    order = list(range(n))
    random.Random(f"{seed}-split").shuffle(order)
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def _jsonl_line(ex: ShapesExample, image_rel: str) -> str:
    record = {
        "id": ex.id,
        "image": image_rel,
        "caption": ex.short_caption,
        "short_caption": ex.short_caption,
        "long_caption": ex.long_caption,
        "objects": [o.to_dict() for o in ex.scene.objects],
        "negatives": ex.negatives,
    }
    return json.dumps(record, ensure_ascii=False)


def write_shapes(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    image_size: int = BASE_SIZE,
) -> dict:
    """Render `n` samples to `out_dir` in the formats the loaders read; return meta.

    Writes `images/{id}.png`, `train.jsonl` / `val.jsonl` / `test.jsonl` (one object per
    line: id, image (relative to out_dir), caption (= short caption), short_caption,
    long_caption, objects, negatives), SugarCrepe files `sugarcrepe/{category}.json` for
    the test split and `sugarcrepe_val/{category}.json` for val (dict id -> {filename,
    caption, negative_caption}, filename relative to out_dir), instruction data
    `instruct_{split}.json` (LLaVA conversations) and `mcq_{split}.json` (ScienceQA-style
    multiple choice; see `instruct.py`), the COCO-style Karpathy-split JSON
    `karpathy_shapes.json` (every split, 5 captions per image: `karpathy_captions`), the
    zero-shot folder `zeroshot/<colour>_<shape>/*.png` (`zeroshot_scenes`: 48 extra
    single-object images, not in any split), and `meta.json`.
    Splits share no scene or short caption. Same arguments -> byte-identical files.
    Existing files of those names are overwritten; other files are left alone.
    """
    n_train, n_val, n_test = _split_counts(n, val_fraction, test_fraction)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    examples = generate_shapes(n, seed, image_size)
    splits = _split_indices(n, seed, val_fraction, test_fraction)
    for ex in examples:
        render_scene(ex.scene).save(out / "images" / f"{ex.id}.png", format="PNG", compress_level=1)
    sugarcrepe_counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        lines = [_jsonl_line(examples[i], f"images/{examples[i].id}.png") for i in splits[split]]
        (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for split, folder in (("test", "sugarcrepe"), ("val", "sugarcrepe_val")):
        (out / folder).mkdir(exist_ok=True)
        counts = {}
        for category in NEGATIVE_CATEGORIES:
            entries = {
                examples[i].id: {
                    "filename": f"images/{examples[i].id}.png",
                    "caption": examples[i].short_caption,
                    "negative_caption": examples[i].negatives[category],
                }
                for i in splits[split] if category in examples[i].negatives
            }
            counts[category] = len(entries)
            (out / folder / f"{category}.json").write_text(
                json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        sugarcrepe_counts[folder] = counts
    _write_instruct(out, examples, splits, seed)
    benchmarks = _write_benchmarks(out, examples, splits, seed, image_size)
    objects_per_scene = {str(k): 0 for k in (1, 2, 3)}
    for ex in examples:
        objects_per_scene[str(len(ex.scene.objects))] += 1
    meta = {
        "dataset": "shapes",
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "counts": {"train": n_train, "val": n_val, "test": n_test},
        "objects_per_scene": objects_per_scene,
        "heldout_mcq_per_image": HELDOUT_MCQ_PER_IMAGE,
        "sugarcrepe": sugarcrepe_counts,
        **benchmarks,
        "vocabulary": {
            "colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
            "relations": list(RELATIONS), "backgrounds": list(BACKGROUNDS),
            "negative_categories": list(NEGATIVE_CATEGORIES),
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _write_instruct(out: Path, examples: list[ShapesExample], splits: dict[str, list[int]], seed: int) -> None:
    write_instruct_files(
        out, {split: [(examples[i].id, examples[i].scene) for i in idx] for split, idx in splits.items()}, seed
    )


def _write_karpathy(out: Path, examples: list[ShapesExample], splits: dict[str, list[int]]) -> None:
    """`karpathy_shapes.json` in the COCO Karpathy-split format (see data/karpathy.py)."""
    split_of = {i: split for split, idx in splits.items() for i in idx}
    images, sentid = [], 0
    for imgid, ex in enumerate(examples):
        sentences = []
        for raw in karpathy_captions(ex):
            tokens = re.findall(r"[a-z0-9]+", raw.lower())
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({
            "filepath": "images", "filename": f"{ex.id}.png", "imgid": imgid, "id": ex.id,
            "split": split_of[imgid], "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })
    text = json.dumps({"images": images, "dataset": "shapes"}, ensure_ascii=False)
    (out / KARPATHY_FILE).write_text(text + "\n", encoding="utf-8")


def _write_zeroshot(out: Path, seed: int, image_size: int) -> int:
    """The zero-shot folder; returns the number of classes."""
    folders = set()
    for folder, name, scene in zeroshot_scenes(seed, image_size):
        (out / ZEROSHOT_DIR / folder).mkdir(parents=True, exist_ok=True)
        render_scene(scene).save(out / ZEROSHOT_DIR / folder / name, format="PNG", compress_level=1)
        folders.add(folder)
    return len(folders)


def _write_benchmarks(out: Path, examples: list[ShapesExample], splits: dict[str, list[int]],
                      seed: int, image_size: int) -> dict:
    """The Karpathy-format file and the zero-shot folder; returns their `meta.json` entries."""
    _write_karpathy(out, examples, splits)
    n_classes = _write_zeroshot(out, seed, image_size)
    return {
        "karpathy": {"file": KARPATHY_FILE, "captions_per_image": 5},
        "zeroshot": {
            "folder": ZEROSHOT_DIR, "classes": n_classes, "images_per_class": len(SIZES),
            "class": "colour and shape of a single-object scene, one small and one large per class",
        },
    }


def ensure_shapes(out_dir: str | Path, n: int, seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, image_size: int = BASE_SIZE) -> dict:
    """`write_shapes` unless `out_dir/meta.json` already records the same arguments (then
    only the instruction, Karpathy and zero-shot files are written, if absent: data from
    before they existed)."""
    meta_path = Path(out_dir) / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
        wanted = {"n": n, "seed": seed, "image_size": image_size,
                  "val_fraction": val_fraction, "test_fraction": test_fraction}
        if all(meta.get(k) == v for k, v in wanted.items()):
            out = Path(out_dir)
            need_instruct = (not all((out / name).is_file() for name in INSTRUCT_FILES)
                             or meta.get("heldout_mcq_per_image") != HELDOUT_MCQ_PER_IMAGE)
            need_benchmarks = not (out / KARPATHY_FILE).is_file() or not (out / ZEROSHOT_DIR).is_dir()
            if need_instruct or need_benchmarks:
                # written before these files existed: add them, leave the rest alone
                examples = generate_shapes(n, seed, image_size)
                splits = _split_indices(n, seed, val_fraction, test_fraction)
                if need_instruct:
                    _write_instruct(out, examples, splits, seed)
                    meta["heldout_mcq_per_image"] = HELDOUT_MCQ_PER_IMAGE
                    meta_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
                if need_benchmarks:
                    _write_benchmarks(out, examples, splits, seed, image_size)
            return meta
    return write_shapes(out_dir, n, seed, val_fraction, test_fraction, image_size)
