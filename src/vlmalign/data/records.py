"""The records a training file holds, kept compact: a read-only sequence that builds each
`Sample` or `Conversation` when it is read.

As Python objects (a dataclass and its dict, a `Path` and its parts, one `str` per text)
a loaded record costs 0.9-1.1 KB, 4-7x its JSON text, so a 558K-record LLaVA file grew
the process by 4.3x its size and a 600K-line captions file by 6.7x
(docs/troubleshooting.md, "Large files"). A `RecordStore` keeps each record as a pickled
tuple of plain values in one `bytearray`, with an int64 offset per record (numpy). Image
folders and short texts that recur (LLaVA's dozen pretraining prompts over 558K records)
are written once in a table and referred to by number. On the synthetic files of
tests/test_large_input.py that is about 0.5x the file's size for conversations and 1.1x for
captions (a short record is mostly its caption, file name and id); the whole load, the
duplicate check's digests included, peaks at 1.6x and 2.2x.

It replaces the lists the loaders returned: `len`, `store[i]`, iteration, `store[a:b]`
and `store[[i, j, ...]]` (both a store over the same buffer), equality with a list of
records, and `+` with a list (a list). A record read is a new object each time, equal to the one the loader parsed
(the same field values, `image` the same `Path`); changing it does not change the store.
"""

from __future__ import annotations

import operator
import pickle
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from vlmalign.data.sample import Sample

T = TypeVar("T")

# Texts up to this length are looked up in the shared table (prompts, empty captions);
# longer ones are rarely repeated. The table holds at most SHARED_TEXTS entries, the bound
# of the conversation loader's own sharing of recurring turn texts.
SHARED_TEXT_MAX_LEN = 200
SHARED_TEXTS = 4096
# Distinct image folders named by number; a file with more (one folder per image) keeps
# the rest of its paths whole.
SHARED_FOLDERS = 1 << 16


class _Table:
    """Strings kept once, referred to by their position (at most `limit` of them)."""

    def __init__(self, limit: int, max_len: int | None = None) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}
        self.limit, self.max_len = limit, max_len

    def ref(self, text: str) -> int | str:
        """The position of `text` in the table (added while there is room), else `text`."""
        if self.max_len is not None and len(text) > self.max_len:
            return text
        k = self._index.get(text)
        if k is None:
            if len(self.items) >= self.limit:
                return text
            k = self._index[text] = len(self.items)
            self.items.append(text)
        return k

    def get(self, ref: int | str) -> str:
        return self.items[ref] if type(ref) is int else ref

    def freeze(self) -> None:
        """Drop the lookup dict once the store is built (reading needs only `items`)."""
        self._index = {}


class Tables:
    """What the records of one store share: image folders and short recurring texts."""

    def __init__(self) -> None:
        self.folders = _Table(SHARED_FOLDERS)
        self.texts = _Table(SHARED_TEXTS, SHARED_TEXT_MAX_LEN)

    def image_ref(self, path: Path | None) -> tuple[int | str, str] | None:
        """(folder, file name) of an image path, the folder by number."""
        return None if path is None else (self.folders.ref(str(path.parent)), path.name)

    def image(self, ref: tuple[int | str, str] | None) -> Path | None:
        return None if ref is None else Path(self.folders.get(ref[0]), ref[1])

    def text_ref(self, text: str) -> int | str:
        return self.texts.ref(text)

    def text(self, ref: int | str) -> str:
        return self.texts.get(ref)

    def freeze(self) -> None:
        self.folders.freeze()
        self.texts.freeze()


@dataclass(frozen=True)
class RecordCodec(Generic[T]):
    """How records of type `kind` become a tuple of plain values (picklable, the shared
    parts as `Tables` references) and back; the record read back equals the one written."""

    kind: type
    encode: Callable[[Any, Tables], tuple]
    decode: Callable[[tuple, Tables], Any]


def _encode_sample(s: Sample, tables: Tables) -> tuple:
    t = tables.text_ref
    return (s.id, tables.image_ref(s.image), t(s.caption), t(s.short_caption), t(s.long_caption), s.meta or None)


def _decode_sample(t: tuple, tables: Tables) -> Sample:
    rec_id, image, caption, short, long, meta = t
    return Sample(id=rec_id, image=tables.image(image), caption=tables.text(caption),
                  short_caption=tables.text(short), long_caption=tables.text(long), meta=meta or {})


SAMPLE_CODEC = RecordCodec(Sample, _encode_sample, _decode_sample)


class RecordStore(Sequence[T], Generic[T]):
    """A read-only sequence of records held as bytes (module docstring). Build one with
    `RecordStore.build(records, codec)`: `SAMPLE_CODEC` here, `CONVERSATION_CODEC` in
    data/conversations.py."""

    def __init__(self, codec: RecordCodec[T], blob: bytearray, starts: np.ndarray, ends: np.ndarray,
                 tables: Tables) -> None:
        self.codec = codec
        self._blob, self._starts, self._ends = blob, starts, ends  # record i: blob[starts[i]:ends[i]]
        self._tables = tables

    @classmethod
    def build(cls, records: Iterable[T], codec: RecordCodec[T]) -> RecordStore[T]:
        """A store of `records` (each a `codec.kind`), consumed one at a time: memory holds
        the bytes of those read so far and the one being read."""
        tables, blob, offsets = Tables(), bytearray(), array("q", [0])
        for rec in records:
            if type(rec) is not codec.kind:
                raise TypeError(f"record {len(offsets) - 1} is a {type(rec).__name__}; "
                                f"this store holds {codec.kind.__name__} records")
            blob += pickle.dumps(codec.encode(rec, tables), protocol=pickle.HIGHEST_PROTOCOL)
            offsets.append(len(blob))
        tables.freeze()
        bounds = np.frombuffer(offsets, dtype=np.int64)  # [N + 1]
        return cls(codec, blob, bounds[:-1], bounds[1:], tables)

    def __len__(self) -> int:
        return len(self._starts)

    def _record(self, i: int) -> T:
        return self.codec.decode(pickle.loads(self._blob[self._starts[i]:self._ends[i]]), self._tables)

    def __getitem__(self, index):  # a position -> its record; a slice or positions -> a RecordStore
        if isinstance(index, slice):
            rows = index
        else:
            try:
                i = operator.index(index)
            except TypeError:
                rows = np.asarray(index)
                if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
                    raise IndexError(f"records are indexed by a position, a slice or a 1-D sequence of "
                                     f"positions, got {type(index).__name__} {rows.dtype} of shape {rows.shape}") from None
                rows = rows.astype(np.int64)
                if rows.size and not (-len(self) <= rows.min() and rows.max() < len(self)):
                    raise IndexError(f"record positions {rows.min()}..{rows.max()} out of range for {len(self)} "
                                     "records") from None
            else:
                if not -len(self) <= i < len(self):
                    raise IndexError(f"record index {i} out of range for {len(self)} records")
                return self._record(i % len(self))
        return RecordStore(self.codec, self._blob, self._starts[rows], self._ends[rows], self._tables)

    def take(self, rows: Sequence[int] | np.ndarray) -> RecordStore[T]:
        """The records at positions `rows`, in that order (a store over the same bytes)."""
        return self[rows]

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self._record(i)

    def __add__(self, other: object) -> list[T]:
        """Records of both, in a list (as `list + list`)."""
        if not isinstance(other, (RecordStore, list)):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: object) -> list[T]:
        if not isinstance(other, list):
            return NotImplemented
        return [*other, *self]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (RecordStore, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """Bytes of this store's records and offsets (the shared tables not counted)."""
        return int((self._ends - self._starts).sum()) + self._starts.nbytes + self._ends.nbytes

    def __repr__(self) -> str:
        return f"RecordStore({len(self)} {self.codec.kind.__name__} records, {self.nbytes} bytes)"


def take(records: Sequence[T], rows: Sequence[int] | np.ndarray) -> Sequence[T]:
    """`records` at positions `rows`: a store over the same bytes for a `RecordStore`,
    else a list."""
    if isinstance(records, RecordStore):
        return records.take(rows)
    return [records[int(i)] for i in rows]


class Column(Sequence):
    """One field of some records (`records[rows[k]].<field>`), read when it is asked for:
    what a dataset needs of every record without a list of it for the whole file."""

    def __init__(self, records: Sequence, field: str, rows: Sequence[int] | None = None) -> None:
        self.records, self.field, self.rows = records, field, rows

    def __len__(self) -> int:
        return len(self.records if self.rows is None else self.rows)

    def __getitem__(self, k):  # int -> the value; slice -> a list of values
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return getattr(self.records[k if self.rows is None else self.rows[k]], self.field)

    def __iter__(self) -> Iterator:
        records = self.records if self.rows is None else (self.records[i] for i in self.rows)
        return (getattr(r, self.field) for r in records)


class ImageProbe:
    """Record `index` as `cache.tower_features` sees it: `.image` read from the records
    when asked, `.id` the position (an object of a few dozen bytes, not a `Sample`)."""

    __slots__ = ("records", "index")

    def __init__(self, records: Sequence, index: int) -> None:
        self.records, self.index = records, index

    @property
    def id(self) -> str:
        return str(self.index)

    @property
    def image(self) -> Path:
        return self.records[self.index].image


class ImageProbes(Sequence):
    """An `ImageProbe` per record, made when read."""

    def __init__(self, records: Sequence) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageProbe:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record index {i} out of range for {len(self)} records")
        return ImageProbe(self.records, i % len(self))

    def __iter__(self) -> Iterator[ImageProbe]:
        return (ImageProbe(self.records, i) for i in range(len(self)))
