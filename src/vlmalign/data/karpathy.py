"""COCO / Flickr30k Karpathy-split JSON (Karpathy & Fei-Fei 2015), the standard image-text
retrieval benchmark files (`dataset_coco.json`, `dataset_flickr30k.json`).

Format::

    {"dataset": "coco" | "flickr30k",
     "images": [{"filepath": "val2014",            # COCO only: sub-folder of the image
                 "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "val" | "test" | "restval",
                 "imgid": 0, "sentids": [...],
                 "sentences": [{"raw": "A man riding ...", "tokens": [...], ...}, ...]},
                ...]}

Protocol (VSE++, CLIP): the test split (COCO 5k, Flickr30k 1k images), every caption of
each image (5, a few COCO images have 6-7: all are kept and the count is logged), R@1/5/10
both ways; image->text counts a hit when ANY of the image's captions is in the top K
(`eval.metrics.retrieval_metrics` with `text_to_image`). COCO training conventionally
uses `split=("train", "restval")`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .formats import check_image
from .sample import LoadReport

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "restval")
CAPTIONS_PER_IMAGE = 5  # what the standard files hold for (almost) every image


def karpathy_image_path(record: dict, image_root: Path) -> Path:
    """`image_root/filepath/filename` (COCO) or `image_root/filename` (Flickr30k); when a
    COCO image is not under its `filepath` folder, `image_root/filename` is tried too
    (all images copied into one folder)."""
    name = record["filename"]
    sub = record.get("filepath") or ""
    if sub:
        nested = image_root / sub / name
        if nested.is_file() or not (image_root / name).is_file():
            return nested
    return image_root / name


def _sentence_text(sentence: object) -> str:
    """The raw caption, or its tokens joined when `raw` is absent; "" when unusable."""
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return raw.strip()
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens).strip()
    return ""


def load_karpathy(
    path: str | Path,
    image_root: str | Path,
    split: str | Sequence[str] = "test",
    report: LoadReport | None = None,
    max_captions: int = 0,
) -> tuple[list[Path], list[str], Tensor]:
    """Load one split of a Karpathy-format JSON for retrieval.

    Args:
        path: `dataset_coco.json`, `dataset_flickr30k.json` or a file in that format.
        image_root: folder holding the images (COCO: the parent of `val2014/` etc.).
        split: a split name or several (e.g. `("train", "restval")`).
        report: counts skipped records: `missing_image`, `no_captions` (an image with no
            usable sentence), `empty_caption` (one sentence dropped), `missing_key` /
            `wrong_type` / `not_an_object` (malformed image records).
        max_captions: keep at most this many captions per image (0: all; 5 reproduces
            the papers that cut COCO's few 6-7-caption images to 5).

    Returns:
        `(images, captions, text_to_image)`: distinct image paths [N_img], captions
        [N_txt] grouped by image, and `text_to_image` [N_txt] (LongTensor), the index in
        `images` of each caption's image.

    Raises:
        FileNotFoundError: no file at `path`; ValueError: not JSON, no `images` list, or
        no image of the requested split (the splits present are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy-split file {path} does not exist; pass the path of dataset_coco.json / dataset_flickr30k.json")
    root = Path(image_root)
    report = report if report is not None else LoadReport()
    wanted = {split} if isinstance(split, str) else set(split)
    unknown = wanted - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; Karpathy splits are {SPLITS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({err}); re-download the Karpathy split file") from err
    records = data.get("images") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f'{path}: expected {{"images": [...], "dataset": ...}} (Karpathy split format) at the top level')

    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    found_splits: Counter[str] = Counter()
    per_image: Counter[int] = Counter()
    for i, rec in enumerate(records):
        where = f"{path}:images[{i}]"
        if not isinstance(rec, dict):
            report.skip("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
            continue
        found_splits[str(rec.get("split"))] += 1
        if rec.get("split") not in wanted:
            continue
        if not isinstance(rec.get("filename"), str) or not rec["filename"]:
            kind = "missing_key" if "filename" not in rec else "wrong_type"
            report.skip(kind, where, "'filename' must be a non-empty string")
            continue
        sentences = rec.get("sentences")
        if not isinstance(sentences, list):
            report.skip("no_captions", where, f"{rec['filename']}: no 'sentences' list")
            continue
        texts = []
        for j, sentence in enumerate(sentences):
            text = _sentence_text(sentence)
            if text:
                texts.append(text)
            else:
                report.skip("empty_caption", f"{where}.sentences[{j}]", "no usable 'raw' or 'tokens'")
        if max_captions:
            texts = texts[:max_captions]
        if not texts:
            report.skip("no_captions", where, f"{rec['filename']}: no usable sentence")
            continue
        image = karpathy_image_path(rec, root)
        if not check_image(image, where, report, check_images=False):
            continue
        index = len(images)
        images.append(image)
        captions += texts
        owner += [index] * len(texts)
        per_image[len(texts)] += 1
        report.loaded += 1
    if not images and report.total_skipped() == 0:
        raise ValueError(
            f"{path} holds no image of split {sorted(wanted)}; splits present: {dict(found_splits)}"
        )
    odd = {n: c for n, c in per_image.items() if n != CAPTIONS_PER_IMAGE}
    if odd:
        log.warning("%s: %d of %d images have other than %d captions (captions: images = %s); all are kept",
                    path.name, sum(odd.values()), len(images), CAPTIONS_PER_IMAGE, dict(sorted(odd.items())))
    return images, captions, torch.tensor(owner, dtype=torch.long)
