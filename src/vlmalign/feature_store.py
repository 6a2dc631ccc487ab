"""Frozen vision-tower features on disk, reused across runs and epochs.

A frozen tower maps the same image bytes to the same features, so they are computed once
per (tower, image content) and kept in a memory-mapped file. Layout of a store folder:

    <root>/<tower key>/features.f32   rows of float32 [P, Dv], appended, read by np.memmap
    <root>/<tower key>/index.json     {"version", "shape": [P, Dv], "rows": {sha256: [row, crc32]}}

- The tower key is `VisionTower.cache_key()`: registry id, name, image size and a hash of
  every weight, so other weights or preprocessing never read stale rows.
- The image key is the sha256 of the file's bytes (`image_digest`): an edited image gets a
  new key (its old row is simply no longer used); a renamed one keeps its row.
- Writes append the rows, fsync, then replace the index atomically (`os.replace`): a crash
  leaves either the old index (extra bytes at the end are cut off on the next open) or the
  new one. An unreadable index, a data file shorter than the index says, or a row whose
  crc32 no longer matches is treated as missing and recomputed (`rebuilt` counts them).

One writer at a time per tower folder (no file lock): run one training process per store,
or give concurrent runs different `root`s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

VERSION = 1
DATA_NAME = "features.f32"
INDEX_NAME = "index.json"


def image_digest(image: str | Path | Image.Image) -> str:
    """sha256 hex digest of an image file's bytes, or of a PIL image's mode, size and
    pixels. Raises FileNotFoundError for a missing path."""
    if isinstance(image, Image.Image):
        h = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
        h.update(image.tobytes())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(image, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureStore:
    """Features [P, Dv] (float32) of one tower, keyed by image digest.

    `FeatureStore(root, tower_key, shape=(P, Dv))`; `get(digests)` -> the rows found
    ([N_found, P, Dv] and their digests), `put(digests, features)` appends new rows.
    """

    def __init__(self, root: str | Path, tower_key: str, shape: tuple[int, int]) -> None:
        self.folder = Path(root) / tower_key
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_bytes = self.shape[0] * self.shape[1] * 4
        self.rebuilt = 0  # rows or whole files found damaged and dropped
        self._rows: dict[str, tuple[int, int]] = {}  # digest -> (row, crc32)
        self._n = 0
        self._map: np.memmap | None = None
        self._open()

    # ------------------------------------------------------------------ files
    @property
    def data_path(self) -> Path:
        return self.folder / DATA_NAME

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, digest: str) -> bool:
        return digest in self._rows

    def _reset(self, why: str) -> None:
        log.warning("feature store %s: %s; rebuilding it", self.folder, why)
        self.rebuilt += 1
        for path in (self.data_path, self.index_path):
            path.unlink(missing_ok=True)
        self._rows, self._n, self._map = {}, 0, None

    def _open(self) -> None:
        """Read the index and check it against the data file (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.index_path.exists():
            if self.data_path.exists():
                self._reset("data file without an index")
            return
        try:
            index = json.loads(self.index_path.read_text())
            if index.get("version") != VERSION or tuple(index["shape"]) != self.shape:
                self._reset(f"index of version {index.get('version')} / shape {index.get('shape')}, expected {VERSION} / {list(self.shape)}")
                return
            rows = {str(k): (int(v[0]), int(v[1])) for k, v in index["rows"].items()}
            n = int(index["n"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self._reset(f"unreadable index ({type(e).__name__}: {e})")
            return
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        if size < n * self.row_bytes:
            self._reset(f"data file holds {size} bytes, the index needs {n * self.row_bytes} (partial write)")
            return
        if size > n * self.row_bytes:  # an append whose index never landed: drop its bytes
            with open(self.data_path, "r+b") as f:
                f.truncate(n * self.row_bytes)
        self._rows, self._n = rows, n

    def _memmap(self) -> np.memmap | None:
        if self._map is None and self._n:
            self._map = np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(self._n, *self.shape))
        return self._map

    def _write_index(self) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        index = {"version": VERSION, "shape": list(self.shape), "n": self._n,
                 "rows": {k: [r, c] for k, (r, c) in self._rows.items()}}
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.index_path)

    # ------------------------------------------------------------------ access
    def get(self, digests: list[str]) -> dict[str, Tensor]:
        """Features [P, Dv] of each digest found (a dict; missing or damaged rows are left
        out, damaged ones also dropped from the index and counted in `rebuilt`)."""
        mm = self._memmap()
        out: dict[str, Tensor] = {}
        damaged = []
        for d in dict.fromkeys(digests):
            entry = self._rows.get(d)
            if entry is None or mm is None:
                continue
            row = np.array(mm[entry[0]])  # [P, Dv], a copy off the mapping
            if zlib.crc32(row.tobytes()) != entry[1]:
                damaged.append(d)
                continue
            out[d] = torch.from_numpy(row)
        if damaged:
            log.warning("feature store %s: %d rows failed their checksum; recomputing them", self.folder, len(damaged))
            self.rebuilt += len(damaged)
            for d in damaged:
                del self._rows[d]
            self._write_index()
        return out

    def put(self, digests: list[str], features: Tensor) -> None:
        """Append features [N, P, Dv] under `digests` (N of them); already stored ones are
        skipped."""
        if features.dim() != 3 or tuple(features.shape[1:]) != self.shape or len(digests) != features.shape[0]:
            raise ValueError(
                f"FeatureStore.put expects {len(digests)} rows of shape {list(self.shape)}; got {tuple(features.shape)}"
            )
        new = [(d, i) for i, d in enumerate(digests) if d not in self._rows]
        new = list({d: i for d, i in new}.items())  # one row per digest
        if not new:
            return
        arr = features.detach().to("cpu", torch.float32).contiguous().numpy()
        self._map = None  # the file grows: map it again on the next read
        with open(self.data_path, "ab") as f:
            for k, (d, i) in enumerate(new):
                row = np.ascontiguousarray(arr[i])
                f.write(row.tobytes())
                self._rows[d] = (self._n + k, zlib.crc32(row.tobytes()))
            f.flush()
            os.fsync(f.fileno())
        self._n += len(new)
        self._write_index()
