"""The sample types every loader yields, and the report of what a loader skipped.

All file formats (JSONL captions, SugarCrepe JSON, the built-in `shapes` dataset) end
up as the same small dataclasses, so the collator and the evaluators never see a format.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sample:
    """One image with its captions.

    `caption` is the text used by caption losses (NTP, contrastive); for `shapes` it is
    the short caption. `short_caption` / `long_caption` are kept when the source has them
    (VladVA trains contrastive on short and NTP on long captions). `meta` carries
    anything else the source knows, e.g. the scene's objects for `shapes`.
    """

    id: str
    image: Path  # absolute path to the image file
    caption: str = ""
    short_caption: str = ""
    long_caption: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class CompositionalItem:
    """One SugarCrepe-style test: an image, a true caption and a hard negative."""

    id: str
    image: Path
    caption: str  # the positive
    negative_caption: str
    category: str  # e.g. "replace_att"


class DataPathError(FileNotFoundError):
    """A file the config names does not exist; the message gives the config key, the value
    and the path it resolved to."""


class DataQualityError(ValueError):
    """Too much of a dataset was skipped as bad input (see `LoadReport.check_skip_fraction`)."""


class LoadReport:
    """Counts skipped records by reason, keeping every one (`records`) and a few examples
    (`file:line: detail`) per reason for the summary.

    Loaders call `skip(...)` for each bad record and increment `loaded` for each good one,
    so bad input is never lost silently and never crashes a run mid-file. Records kept
    after a fix or with a warning (an inserted `<image>` marker, a renamed duplicate id)
    are counted apart with `repair(...)`; they are loaded, not skipped. `write_jsonl`
    writes all of them, one JSON object per line (`skipped.jsonl` in a run folder).
    """

    max_examples: int = 3  # examples kept per reason in the summary (all are in `records`)

    def __init__(self) -> None:
        self.loaded: int = 0
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}
        self._repairs: Counter[str] = Counter()
        self._repair_examples: dict[str, list[str]] = {}
        # Every skip and repair: {"action": "skipped" | "repaired", "reason", "where", "detail"}.
        self.records: list[dict[str, str]] = []

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record one skipped record: `reason` (a short key), `where` (`file:line`), `detail`."""
        self._counts[reason] += 1
        self.records.append({"action": "skipped", "reason": reason, "where": where, "detail": detail})
        examples = self._examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def repair(self, reason: str, where: str, detail: str = "") -> None:
        """Record one record kept after a fix or with a warning: `reason`, `where`, `detail`."""
        self._repairs[reason] += 1
        self.records.append({"action": "repaired", "reason": reason, "where": where, "detail": detail})
        examples = self._repair_examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def absorb(self, other: LoadReport) -> None:
        """Add `other`'s counts, examples and records to this report."""
        self.loaded += other.loaded
        for rec in other.records:
            (self.skip if rec["action"] == "skipped" else self.repair)(rec["reason"], rec["where"], rec["detail"])

    def write_jsonl(self, path: str | Path, task: str = "") -> Path:
        """Every skipped and repaired record, one JSON object per line (`action`, `reason`,
        `where`, `detail`, and `task` when given), appended to `path`; returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps({**({"task": task} if task else {}), **rec}, ensure_ascii=False) + "\n")
        return path

    def total_skipped(self) -> int:
        """Number of records skipped, all reasons together."""
        return sum(self._counts.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason (a copy)."""
        return dict(self._counts)

    @property
    def repaired(self) -> dict[str, int]:
        """Repair / warning counts by reason (a copy)."""
        return dict(self._repairs)

    def skip_fraction(self) -> float:
        """skipped / (loaded + skipped); 0.0 when nothing was read."""
        total = self.loaded + self.total_skipped()
        return self.total_skipped() / total if total else 0.0

    def check_skip_fraction(self, max_fraction: float, what: str = "data") -> float:
        """Raise `DataQualityError` when more than `max_fraction` of the records read were
        skipped, i.e. skipped / (loaded + skipped) > max_fraction; else return that
        fraction. `what` names the data in the message (e.g. "training data
        /data/train.jsonl"). `max_fraction` >= 1 never raises. Call it once loading (and
        image checking or feature caching) is done, before training starts.
        """
        if not 0.0 <= max_fraction:
            raise ValueError(f"max_fraction must be >= 0, got {max_fraction}")
        fraction = self.skip_fraction()
        if fraction > max_fraction:
            total = self.loaded + self.total_skipped()
            raise DataQualityError(
                f"{what}: {self.total_skipped()} of {total} records ({fraction:.1%}) were skipped as bad "
                f"input, more than data.max_skip_fraction={max_fraction:g}. {self.summary()} "
                "Fix the data at the lines named above (most skips share a cause: a wrong image_root, "
                "a wrong caption_field, a file in another encoding), or raise data.max_skip_fraction "
                "(--max-skip-fraction) to train on what is left."
            )
        return fraction

    def as_dict(self) -> dict:
        """`{"loaded": n, "skipped": {reason: count}, "examples": {reason: [...]},
        "repaired": {reason: count}}`."""
        return {
            "loaded": self.loaded,
            "skipped": dict(self._counts),
            "examples": {k: list(v) for k, v in self._examples.items()},
            "repaired": dict(self._repairs),
        }

    def summary(self) -> str:
        """One human-readable paragraph; the empty string when nothing was skipped or
        repaired."""
        out = []
        total = self.total_skipped()
        if total:
            parts = []
            for reason, count in self._counts.most_common():
                first = self._examples.get(reason, [""])[0]
                parts.append(f"{count} {reason} (e.g. {first})")
            out.append(f"Loaded {self.loaded} records, skipped {total}: " + "; ".join(parts) + ".")
        if self._repairs:
            out.append("Repaired: " + "; ".join(
                f"{count} {reason} (e.g. {self._repair_examples[reason][0]})"
                for reason, count in self._repairs.most_common()) + ".")
        return " ".join(out)

    def __repr__(self) -> str:
        return f"LoadReport(loaded={self.loaded}, skipped={dict(self._counts)}, repaired={dict(self._repairs)})"
