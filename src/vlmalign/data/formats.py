"""One loader per file format, all yielding the types in `sample.py`.

Every loader reads the whole file, keeps the good records, and counts each bad record
in a `LoadReport` under a short reason with its `file:line` (or `file:key`), so a bad
line never crashes a run and never disappears silently. Reasons used:

- `malformed_json`: a line (or a file inside a directory) that is not valid JSON
- `bad_encoding`: a JSONL line that is not UTF-8 (the detail gives its byte offset in the
  file); the line is skipped, never decoded with replacement characters, which would
  train on garbled text. A whole-file JSON that is not UTF-8 raises ValueError naming
  the byte offset, line and column.
- `not_an_object`: a record that is not a JSON object
- `missing_key` / `wrong_type`: a required key absent, or a value of the wrong type
- `empty_caption`: a caption (or negative caption) that is empty after stripping
- `identical_negative`: a SugarCrepe negative equal to its positive
- `duplicate_record`: a record identical to an earlier one (every field equal); the later
  copy is skipped, as it would only double that sample's weight
- `outside_root`: an image path that leaves the data root (`../../etc/passwd`, an
  absolute path elsewhere); allowed with `allow_outside_root=True`
  (`data.allow_outside_root`). The check is on the path as written, so a symlink placed
  inside the root by its owner is followed.
- `missing_image`: the image file does not exist
- `bad_image`: the image cannot be decoded (only with `check_images=True`)

Duplicate ids with different content are kept (the data is real, the id is only a label;
LLaVA's files reuse the image id for several conversations) and the later ones are
renamed `id#2`, `id#3`, ... so ids stay unique downstream; they are counted in
`LoadReport.repaired` as `duplicate_id`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .images import BadImageError, load_image
from .records import SAMPLE_CODEC, RecordStore
from .sample import CompositionalItem, LoadReport, Sample

CAPTION_KEYS = ("caption", "short_caption", "long_caption")
_BOM = codecs.BOM_UTF8
_OTHER_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",  # before UTF-16: same prefix
    codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16",
}
_REENCODE = "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`, or save as UTF-8 in your editor)"


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} file {path} does not exist; check the path (relative paths are "
            f"resolved from {Path.cwd()})"
        )


def _reject_other_bom(path: Path, head: bytes) -> None:
    for bom, name in _OTHER_BOMS.items():
        if head.startswith(bom):
            raise ValueError(f"{path} is {name}-encoded (it starts with a {name} byte-order mark); {_REENCODE}")


def read_text_lines(path: Path, report: LoadReport) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) for each non-blank line of a UTF-8 text file.

    A UTF-8 byte-order mark is dropped; a UTF-16/32 file raises ValueError (every line
    would be garbage). A line that is not UTF-8 is skipped and counted as `bad_encoding`
    with its byte offset in the file.
    """
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1:
                _reject_other_bom(path, raw)
                if raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                report.skip(
                    "bad_encoding", f"{path}:{lineno}",
                    f"not UTF-8: byte 0x{raw[err.start]:02x} at file offset {start + err.start} "
                    f"(column {err.start + 1}, {err.reason}); {_REENCODE}",
                )
                continue
            if line:
                yield lineno, line


class _Pairs(dict):
    """A JSON object that also keeps its (key, value) pairs in order, duplicates included
    (`json` otherwise keeps only the last value of a repeated key, silently)."""

    pairs: list[tuple[str, Any]]


def _keep_pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    obj.pairs = pairs
    return obj


def read_records(path: Path, report: LoadReport, expected: str) -> list[tuple[str, Any]]:
    """[(where, record)] from a `.json` list (malformed or not UTF-8: ValueError naming the
    position) or a `.jsonl` file (bad lines skipped and counted). `expected` describes the
    list the file should hold, for the error when it holds something else."""
    return list(iter_records(path, report, expected))


def iter_records(path: Path, report: LoadReport, expected: str) -> Iterator[tuple[str, Any]]:
    """`read_records`, one record at a time: a `.json` list is parsed element by element
    (`iter_json_array`), so memory holds one record, not the whole file's objects."""
    if path.suffix == ".jsonl":
        for lineno, line in read_text_lines(path, report):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip("malformed_json", f"{path}:{lineno}", f"{err.msg} (column {err.colno})")
                continue
            yield f"{path}:{lineno}", rec
        return
    for i, rec in enumerate(iter_json_array(path, expected)):
        yield f"{path}:[{i}]", rec


_WS = " \t\n\r"
_CHUNK = 1 << 20  # bytes read at a time by iter_json_array


def iter_json_array(path: Path, expected: str = "", chunk_size: int = _CHUNK) -> Iterator[Any]:
    """The elements of a whole-file JSON array, parsed one at a time from 1 MiB chunks:
    memory holds the current chunk and one element, never the whole document (a LLaVA
    file of 558K records is parsed in the space of one).

    Errors are those of `read_json_file`: on invalid JSON or a byte that is not UTF-8 the
    file is parsed whole once more to name the exact line and column; a document that is
    not an array raises ValueError saying what it holds, then `expected`.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        head = f.read(max(chunk_size, 4))  # at least a byte-order mark's length
        _reject_other_bom(path, head[:4])
        if head.startswith(_BOM):
            head = head[len(_BOM):]
        eof = False

        def more(buf: str) -> str:
            nonlocal eof
            if eof:
                return buf
            raw = f.read(chunk_size)
            eof = not raw
            try:
                return buf + utf8.decode(raw, final=eof)
            except UnicodeDecodeError:
                _raise_exact(path, expected)
                raise

        try:
            buf = utf8.decode(head, final=False)
        except UnicodeDecodeError:
            _raise_exact(path, expected)
            raise
        eof = not head
        i = 0
        while True:  # the opening bracket
            while i < len(buf) and buf[i] in _WS:
                i += 1
            if i < len(buf) or eof:
                break
            buf, i = more(buf[i:]), 0
        if i >= len(buf) or buf[i] != "[":
            _raise_exact(path, expected)  # not an array (or not JSON): the whole-file error
            raise ValueError(f"{path} is not a JSON array; {expected}")
        i += 1
        first = True
        while True:
            while True:  # whitespace, then "]" or (after an element) ","
                while i < len(buf) and buf[i] in _WS:
                    i += 1
                if i < len(buf) or eof:
                    break
                buf, i = more(buf[i:]), 0
            if i >= len(buf):
                _raise_exact(path, expected)
                raise ValueError(f"{path} ends inside its JSON array")
            if buf[i] == "]":
                rest = buf[i + 1:]
                while not eof:
                    rest = more(rest).strip(_WS)
                if rest.strip(_WS):
                    _raise_exact(path, expected)
                    raise ValueError(f"{path} has data after its JSON array")
                return
            if not first:
                if buf[i] != ",":
                    _raise_exact(path, expected)
                    raise ValueError(f"{path}: expected ',' between array elements")
                i += 1
                while True:
                    while i < len(buf) and buf[i] in _WS:
                        i += 1
                    if i < len(buf) or eof:
                        break
                    buf, i = more(buf[i:]), 0
            while True:  # one element; read on while it may be cut off by the chunk's end
                try:
                    value, end = decoder.raw_decode(buf, i)
                    # a number may continue past the chunk ("1." of "1.5"): only a delimiter ends it
                    if eof or (end < len(buf) and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                                   or buf[end] in _WS + ",]")):
                        break
                except json.JSONDecodeError:
                    if eof:
                        _raise_exact(path, expected)
                        raise
                buf, i = more(buf[i:]), 0
            first = False
            yield value
            i = end  # the buffer is compacted only when more is read


def _raise_exact(path: Path, expected: str) -> None:
    """Parse `path` whole with `read_json_file` to raise its exact error (position, encoding);
    if it parses, raise ValueError when it is not a list."""
    data = read_json_file(path)
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {json_type(data)}; {expected}")


def read_json_file(path: Path, keep_duplicate_keys: bool = False) -> Any:
    """Parse a whole-file JSON document, with errors that name the file and position.

    Not UTF-8 -> ValueError with the byte offset, line and column of the first bad byte;
    invalid JSON -> ValueError with line, column and character offset. A UTF-8 BOM is
    dropped. With `keep_duplicate_keys` every object is a `dict` whose `.pairs` holds all
    its (key, value) pairs, repeated keys included.
    """
    data = path.read_bytes()
    _reject_other_bom(path, data[:4])
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        pos = skip + err.start
        line = data.count(b"\n", 0, pos) + 1
        column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        raise ValueError(
            f"{path} is not UTF-8: byte 0x{data[pos]:02x} at offset {pos} (line {line}, column "
            f"{column}, {err.reason}); {_REENCODE}"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_keep_pairs if keep_duplicate_keys else None)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} "
            f"(character {err.pos}); fix the file there or regenerate it"
        ) from None


_JSON_TYPES = {dict: "object", _Pairs: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "array", "null", ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image_path(
    image: str, roots: list[Path], where: str, report: LoadReport, allow_outside_root: bool = False
) -> list[Path] | None:
    """Candidate absolute paths of a record's image, one per root (relative paths resolve
    against each root in turn; an absolute path is itself), keeping only those inside
    the outermost root `roots[-1]` unless `allow_outside_root`. None (after counting an
    `outside_root` skip) when every candidate leaves the root. The check is lexical
    (`..` collapsed, symlinks not followed), so the file is not even looked at."""
    p = Path(image).expanduser()
    candidates = [p] if p.is_absolute() else [root / p for root in roots]
    if not allow_outside_root:
        top = os.path.abspath(roots[-1])
        kept = [c for c in candidates if _inside(os.path.abspath(c), top)]
        if not kept:
            report.skip(
                "outside_root", where,
                f"image path {image!r} resolves to {os.path.abspath(candidates[0])}, outside the data root "
                f"{top}; move the image under the root, or set data.allow_outside_root=true if you "
                "trust this file",
            )
            return None
        candidates = kept
    return [c.resolve() for c in candidates]


# `{file}:{line}` or `{file}:[{index}]`: the number and what surrounds it.
_WHERE_NUMBER = re.compile(r"^(?P<before>.*?[:\[])(?P<n>[1-9]\d{0,17}|0)(?P<after>\]?)$")


class DuplicateTracker:
    """Ids and record contents seen so far in one load: skips exact duplicate records
    (`duplicate_record`) and renames repeated ids (`duplicate_id`, a repair)."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        # What is kept per record is small, so that a file of any size can be checked in a
        # stream: places as a number where they are `{file}:{line}` / `{file}:[{index}]`,
        # record contents as a 16-byte digest of their canonical JSON (not the text).
        self._ids: dict[str, int | str] = {}  # id -> where it was first seen
        self._records: dict[bytes, int | str] = {}  # digest -> where it was first seen
        self._next: dict[str, int] = {}
        self._frame: tuple[str, str] | None = None  # (before, after) the number of a `where`
        # ids made from a line number (`implicit_id`): one bit per line, not a dict entry
        self._implicit_prefix = ""
        self._implicit = bytearray()

    def _pack(self, where: str) -> int | str:
        m = _WHERE_NUMBER.match(where)
        if m is None:
            return where
        if self._frame is None:
            self._frame = (m["before"], m["after"])
        return int(m["n"]) if (m["before"], m["after"]) == self._frame else where

    def _unpack(self, packed: int | str) -> str:
        return packed if isinstance(packed, str) else f"{self._frame[0]}{packed}{self._frame[1]}"

    def is_duplicate_record(self, rec: Any, where: str) -> bool:
        """True (and the skip counted) if `rec` equals an earlier record in every field."""
        text = json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str)
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in self._records:
            self.report.skip("duplicate_record", where,
                             f"identical to the record at {self._unpack(self._records[key])}")
            return True
        self._records[key] = self._pack(where)
        return False

    def implicit_id(self, prefix: str, lineno: int, where: str) -> str:
        """The id `{prefix}{lineno}` of a record that has none (unique by construction, so
        only a bit is kept), renamed like `unique_id` if an explicit id already took it."""
        rec_id = f"{prefix}{lineno}"
        if rec_id in self._ids or (self._implicit_prefix and prefix != self._implicit_prefix):
            return self.unique_id(rec_id, where)
        self._implicit_prefix = prefix
        if lineno >= len(self._implicit):
            self._implicit.extend(bytes(lineno + 1 - len(self._implicit) + len(self._implicit) // 2))
        self._implicit[lineno] = 1
        return rec_id

    def _implicit_place(self, rec_id: str) -> int | None:
        """The line whose implicit id `rec_id` is, or None."""
        if not self._implicit_prefix or not rec_id.startswith(self._implicit_prefix):
            return None
        tail = rec_id[len(self._implicit_prefix):]
        if not tail.isdigit() or int(tail) >= len(self._implicit) or not self._implicit[int(tail)]:
            return None
        return int(tail)

    def unique_id(self, rec_id: str, where: str) -> str:
        """`rec_id`, or `rec_id#k` (k = 2, 3, ...) with a `duplicate_id` repair counted
        when the id was used before."""
        if rec_id not in self._ids and (line := self._implicit_place(rec_id)) is not None:
            self._ids[rec_id] = self._pack(where.rpartition(":")[0] + f":{line}")  # taken by that line
        if rec_id not in self._ids:
            self._ids[rec_id] = self._pack(where)
            return rec_id
        first = self._unpack(self._ids[rec_id])
        k = self._next.get(rec_id, 2)
        while f"{rec_id}#{k}" in self._ids:
            k += 1
        self._next[rec_id] = k + 1
        new = f"{rec_id}#{k}"
        self._ids[new] = self._pack(where)
        self.report.repair("duplicate_id", where, f"id {rec_id!r} already used at {first}; kept as {new!r}")
        return new


def require_strings(rec: dict, keys: tuple[str, ...], where: str, report: LoadReport, what: str = "") -> bool:
    """True if `rec` holds every key as a string; otherwise records a `missing_key` or
    `wrong_type` skip (prefixed by `what`, e.g. "turn 2: ") and returns False."""
    for key in keys:
        if key not in rec:
            report.skip("missing_key", where, f"{what}no {key!r} key")
            return False
        if not isinstance(rec[key], str):
            report.skip("wrong_type", where, f"{what}{key!r} must be a string, got {json_type(rec[key])}")
            return False
    return True


def valid_id(rec: dict, where: str, report: LoadReport) -> bool:
    """True when `rec` has no `id` or a string / integer one; else a `wrong_type` skip."""
    rec_id = rec.get("id")
    if rec_id is None or (isinstance(rec_id, (str, int)) and not isinstance(rec_id, bool)):
        return True
    report.skip("wrong_type", where, f"'id' must be a string or integer, got {rec_id!r}")
    return False


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
    allow_outside_root: bool = False,
) -> RecordStore[Sample]:
    """Load image-caption pairs from a JSONL file, one JSON object per line.

    A line is `{"image": path, "caption": str}`, optionally with `short_caption`,
    `long_caption` and `id` (VladVA-style data); any other keys go to `Sample.meta`.
    `Sample.caption` is the value of `caption_field`, or `short_caption` when that key is
    absent. Relative image paths resolve against `image_root` (default: the JSONL's
    folder), which is also the data root images may not leave unless
    `allow_outside_root`. Bad lines are skipped and counted in `report`, duplicate ids
    renamed (see the module docstring); blank lines are ignored. With
    `check_images=True` every image is decoded once. Raises FileNotFoundError if `path`
    does not exist, ValueError if it is UTF-16/32. The samples are kept in a compact
    `RecordStore` (data/records.py), a read-only sequence.
    """
    samples = iter_captions_jsonl(path, image_root, caption_field, report, check_images, allow_outside_root)
    return RecordStore.build(samples, SAMPLE_CODEC)


def iter_captions_jsonl(
    path: str | Path,
    image_root: str | Path | None = None,
    caption_field: str = "caption",
    report: LoadReport | None = None,
    check_images: bool = False,
    allow_outside_root: bool = False,
) -> Iterator[Sample]:
    """`load_captions_jsonl`, one sample at a time (memory: one line, and a 16-byte
    digest per record for the duplicate check), for checking files of any size."""
    path = Path(path)
    _require_file(path, "captions JSONL")
    report = report if report is not None else LoadReport()
    root = Path(image_root) if image_root is not None else path.parent
    dups = DuplicateTracker(report)
    for lineno, line in read_text_lines(path, report):
        where = f"{path}:{lineno}"
        sample = _parse_caption_record(line, where, root, caption_field, report, check_images,
                                       allow_outside_root, dups)
        if sample is not None:
            sample.id = dups.unique_id(sample.id, where) if sample.id else dups.implicit_id(f"{path.stem}:", lineno, where)
            report.loaded += 1
            yield sample


def _parse_caption_record(
    line: str,
    where: str,
    root: Path,
    caption_field: str,
    report: LoadReport,
    check_images: bool,
    allow_outside_root: bool,
    dups: DuplicateTracker,
) -> Sample | None:
    try:
        rec: Any = json.loads(line)
    except json.JSONDecodeError as err:
        report.skip("malformed_json", where, f"{err.msg} (column {err.colno})")
        return None
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {json_type(rec)}")
        return None
    if "image" not in rec:
        report.skip("missing_key", where, "no 'image' key")
        return None
    if not isinstance(rec["image"], str) or not rec["image"].strip():
        report.skip("wrong_type", where, f"'image' must be a non-empty string, got {rec['image']!r}")
        return None
    if not valid_id(rec, where, report):
        return None
    for key in dict.fromkeys((caption_field, *CAPTION_KEYS)):
        if key in rec and not isinstance(rec[key], str):
            report.skip("wrong_type", where, f"{key!r} must be a string, got {json_type(rec[key])}")
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
    found = resolve_image_path(rec["image"], [root], where, report, allow_outside_root)
    if found is None or dups.is_duplicate_record(rec, where):
        return None
    image_path = found[0]
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
    allow_outside_root: bool = False,
) -> list[CompositionalItem]:
    """Load SugarCrepe-style compositionality tests (Hsieh et al., 2023).

    SugarCrepe ships one JSON file per category (e.g. `replace_att.json`) holding
    `{id: {"filename", "caption", "negative_caption"}}`; the category is the file stem.
    `path` is such a file or a directory of them (every `*.json`, sorted). A file may also
    hold a list of records, each with its own `"category"` (default: the file stem) and
    optional `"id"`. Relative filenames resolve against `image_root`; by default the
    JSON's folder is tried first, then its parent (the `shapes` layout:
    `out/sugarcrepe/*.json` with filenames relative to `out/`). The data root images may
    not leave (unless `allow_outside_root`) is `image_root`, by default that parent.
    Bad records are counted in `report`; ids repeated within a category (a key written
    twice in one object, which `json` would drop silently) are renamed `id#2`. In a
    directory an unparsable file is counted as one `malformed_json` skip, while a
    single unparsable file given as `path` raises ValueError naming the position.
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
    trackers: dict[str, DuplicateTracker] = {}  # per category: ids repeat across categories
    for file in files:
        try:
            data = read_json_file(file, keep_duplicate_keys=True)
        except ValueError as err:
            if not path.is_dir():
                raise
            report.skip("malformed_json", str(file), f"whole file skipped: {err}")
            continue
        if isinstance(data, dict):
            seen: dict[str, int] = {}
            records = []
            for key, rec in data.pairs:
                seen[key] = seen.get(key, 0) + 1
                where = f"{file}:{key}" + (f" (repeat {seen[key]} of key {key!r})" if seen[key] > 1 else "")
                records.append((where, str(key), rec))
        elif isinstance(data, list):
            records = [(f"{file}:[{i}]", f"{file.stem}-{i}", rec) for i, rec in enumerate(data)]
        else:
            msg = f"{file} holds a JSON {json_type(data)}; expected a dict id -> record or a list"
            if not path.is_dir():
                raise ValueError(msg)
            report.skip("not_an_object", str(file), msg)
            continue
        roots = [Path(image_root)] if image_root is not None else [file.parent, file.parent.parent]
        for where, default_id, rec in records:
            item = _parse_sugarcrepe_record(rec, where, default_id, file.stem, roots, report, check_images,
                                            allow_outside_root, trackers)
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
    allow_outside_root: bool,
    trackers: dict[str, DuplicateTracker],
) -> CompositionalItem | None:
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {json_type(rec)}")
        return None
    image_key = "filename" if "filename" in rec else "image"
    if not require_strings(rec, (image_key, "caption", "negative_caption"), where, report):
        return None
    if not valid_id(rec, where, report):
        return None
    category = rec.get("category", default_category)
    if not isinstance(category, str) or not category.strip():
        report.skip("wrong_type", where, f"'category' must be a non-empty string, got {category!r}")
        return None
    caption, negative = rec["caption"].strip(), rec["negative_caption"].strip()
    if not caption or not negative:
        report.skip("empty_caption", where, "caption or negative_caption is empty")
        return None
    if caption == negative:
        report.skip("identical_negative", where, "negative_caption equals caption")
        return None
    candidates = resolve_image_path(rec[image_key], roots, where, report, allow_outside_root)
    if candidates is None:
        return None
    dups = trackers.setdefault(category, DuplicateTracker(report))
    if dups.is_duplicate_record(rec, where):
        return None
    image_path = next((p for p in candidates if p.is_file()), None)
    if image_path is None:
        looked = " or ".join(str(p) for p in dict.fromkeys(candidates))
        report.skip("missing_image", where, f"image file not found at {looked} (set image_root)")
        return None
    if not check_image(image_path, where, report, check_images):
        return None
    return CompositionalItem(
        id=dups.unique_id(str(rec.get("id", default_id)), where),
        image=image_path,
        caption=caption,
        negative_caption=negative,
        category=category,
    )
