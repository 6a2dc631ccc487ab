"""One loader per file format, all yielding the types in `sample.py`.

Every loader reads the whole file, keeps the good records, and counts each bad record
in a `LoadReport` under a short reason with its `file:line` (or `file:key`), so a bad
line never crashes a run and never disappears silently. Reasons used:

- `malformed_json`: a line (or a file inside a directory) that is not valid JSON
- `bad_encoding`: a line that is not UTF-8
- `not_an_object`: a record that is not a JSON object
- `missing_key` / `wrong_type`: a required key absent, or a value of the wrong type
- `empty_caption`: a caption (or negative caption) that is empty after stripping
- `identical_negative`: a SugarCrepe negative equal to its positive
- `missing_image`: the image file does not exist
- `bad_image`: the image cannot be decoded (only with `check_images=True`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .images import BadImageError, load_image
from .sample import CompositionalItem, LoadReport, Sample

CAPTION_KEYS = ("caption", "short_caption", "long_caption")
_BOM = b"\xef\xbb\xbf"


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} file {path} does not exist; check the path (relative paths are "
            f"resolved from {Path.cwd()})"
        )


def _resolve_image(image: str, root: Path) -> Path:
    p = Path(image).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def require_strings(rec: dict, keys: tuple[str, ...], where: str, report: LoadReport, what: str = "") -> bool:
    """True if `rec` holds every key as a string; otherwise records a `missing_key` or
    `wrong_type` skip (prefixed by `what`, e.g. "turn 2: ") and returns False."""
    for key in keys:
        if key not in rec:
            report.skip("missing_key", where, f"{what}no {key!r} key")
            return False
        if not isinstance(rec[key], str):
            report.skip("wrong_type", where, f"{what}{key!r} must be a string, got {type(rec[key]).__name__}")
            return False
    return True


def check_image(
    image_path: Path, where: str, report: LoadReport, check_images: bool
) -> bool:
    """True if the image is usable; otherwise records the skip and returns False."""
    if not image_path.is_file():
        report.skip("missing_image", where, f"image file {image_path} not found")
        return False
    if check_images:
        try:
            load_image(image_path)
        except BadImageError as err:
            report.skip("bad_image", where, err.reason)
            return False
    return True


def load_captions_jsonl(
    path: str | Path,
    image_root: str | Path | None = None,
    caption_field: str = "caption",
    report: LoadReport | None = None,
    check_images: bool = False,
) -> list[Sample]:
    """Load image-caption pairs from a JSONL file, one JSON object per line.

    A line is `{"image": path, "caption": str}`, optionally with `short_caption`,
    `long_caption` and `id` (VladVA-style data); any other keys go to `Sample.meta`.
    `Sample.caption` is the value of `caption_field`, or `short_caption` when that key is
    absent. Relative image paths resolve against `image_root` (default: the JSONL's
    folder). Bad lines are skipped and counted in `report` (see the module docstring);
    blank lines are ignored. With `check_images=True` every image is decoded once.
    Raises FileNotFoundError if `path` does not exist.
    """
    path = Path(path)
    _require_file(path, "captions JSONL")
    report = report if report is not None else LoadReport()
    root = Path(image_root) if image_root is not None else path.parent
    samples: list[Sample] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                report.skip("bad_encoding", where, f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line:
                continue
            sample = _parse_caption_record(line, where, root, caption_field, report, check_images)
            if sample is not None:
                if not sample.id:
                    sample.id = f"{path.stem}:{lineno}"
                samples.append(sample)
                report.loaded += 1
    return samples


def _parse_caption_record(
    line: str,
    where: str,
    root: Path,
    caption_field: str,
    report: LoadReport,
    check_images: bool,
) -> Sample | None:
    try:
        rec: Any = json.loads(line)
    except json.JSONDecodeError as err:
        report.skip("malformed_json", where, f"{err.msg} at column {err.colno}")
        return None
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
        return None
    if "image" not in rec:
        report.skip("missing_key", where, "no 'image' key")
        return None
    if not isinstance(rec["image"], str) or not rec["image"].strip():
        report.skip("wrong_type", where, f"'image' must be a non-empty string, got {rec['image']!r}")
        return None
    for key in dict.fromkeys((caption_field, *CAPTION_KEYS)):
        if key in rec and not isinstance(rec[key], str):
            report.skip("wrong_type", where, f"{key!r} must be a string, got {type(rec[key]).__name__}")
            return None
    key = caption_field if caption_field in rec else "short_caption"
    if key not in rec:
        report.skip(
            "missing_key", where,
            f"no {caption_field!r} or 'short_caption' key (pass caption_field= to use another key)",
        )
        return None
    caption = rec[key].strip()
    if not caption:
        report.skip("empty_caption", where, f"{key!r} is empty")
        return None
    image_path = _resolve_image(rec["image"], root)
    if not check_image(image_path, where, report, check_images):
        return None
    known = {"id", "image", caption_field, *CAPTION_KEYS}
    return Sample(
        id=str(rec["id"]) if rec.get("id") is not None else "",
        image=image_path,
        caption=caption,
        short_caption=rec.get("short_caption", "").strip(),
        long_caption=rec.get("long_caption", "").strip(),
        meta={k: v for k, v in rec.items() if k not in known},
    )


def load_sugarcrepe(
    path: str | Path,
    image_root: str | Path | None = None,
    report: LoadReport | None = None,
    check_images: bool = False,
) -> list[CompositionalItem]:
    """Load SugarCrepe-style compositionality tests (Hsieh et al., 2023).

    SugarCrepe ships one JSON file per category (e.g. `replace_att.json`) holding
    `{id: {"filename", "caption", "negative_caption"}}`; the category is the file stem.
    `path` is such a file or a directory of them (every `*.json`, sorted). A file may also
    hold a list of records, each with its own `"category"` (default: the file stem) and
    optional `"id"`. Relative filenames resolve against `image_root`; by default the
    JSON's folder is tried first, then its parent (the `shapes` layout:
    `out/sugarcrepe/*.json` with filenames relative to `out/`). Bad records are counted
    in `report`; in a directory an unparsable file is counted as one `malformed_json`
    skip, while a single unparsable file given as `path` raises ValueError.
    """
    path = Path(path)
    _require_file(path, "SugarCrepe")
    report = report if report is not None else LoadReport()
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no *.json files in SugarCrepe directory {path}")
    else:
        files = [path]
    items: list[CompositionalItem] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if not path.is_dir():
                raise ValueError(f"{file} is not valid UTF-8 JSON ({err}); fix or re-download it") from err
            report.skip("malformed_json", str(file), f"whole file skipped: {err}")
            continue
        if isinstance(data, dict):
            records = [(f"{file}:{key}", str(key), rec) for key, rec in data.items()]
        elif isinstance(data, list):
            records = [(f"{file}:[{i}]", f"{file.stem}-{i}", rec) for i, rec in enumerate(data)]
        else:
            msg = f"{file} holds a JSON {type(data).__name__}; expected a dict id -> record or a list"
            if not path.is_dir():
                raise ValueError(msg)
            report.skip("not_an_object", str(file), msg)
            continue
        roots = [Path(image_root)] if image_root is not None else [file.parent, file.parent.parent]
        for where, default_id, rec in records:
            item = _parse_sugarcrepe_record(rec, where, default_id, file.stem, roots, report, check_images)
            if item is not None:
                items.append(item)
                report.loaded += 1
    return items


def _parse_sugarcrepe_record(
    rec: Any,
    where: str,
    default_id: str,
    default_category: str,
    roots: list[Path],
    report: LoadReport,
    check_images: bool,
) -> CompositionalItem | None:
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
        return None
    image_key = "filename" if "filename" in rec else "image"
    if not require_strings(rec, (image_key, "caption", "negative_caption"), where, report):
        return None
    caption, negative = rec["caption"].strip(), rec["negative_caption"].strip()
    if not caption or not negative:
        report.skip("empty_caption", where, "caption or negative_caption is empty")
        return None
    if caption == negative:
        report.skip("identical_negative", where, "negative_caption equals caption")
        return None
    candidates = [_resolve_image(rec[image_key], root) for root in roots]
    image_path = next((p for p in candidates if p.is_file()), None)
    if image_path is None:
        looked = " or ".join(str(p) for p in dict.fromkeys(candidates))
        report.skip("missing_image", where, f"image file not found at {looked} (set image_root)")
        return None
    if not check_image(image_path, where, report, check_images):
        return None
    category = rec.get("category", default_category)
    return CompositionalItem(
        id=str(rec.get("id", default_id)),
        image=image_path,
        caption=caption,
        negative_caption=negative,
        category=str(category),
    )
