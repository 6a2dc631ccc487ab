"""The sample types every loader yields, and the report of what a loader skipped.

All file formats (JSONL captions, SugarCrepe JSON, the built-in `shapes` dataset) end
up as the same small dataclasses, so the collator and the evaluators never see a format.
"""

from __future__ import annotations

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


class LoadReport:
    """Counts skipped records by reason, keeping a few examples (`file:line: detail`) each.

    Loaders call `skip(...)` for each bad record and increment `loaded` for each good one,
    so bad input is never lost silently and never crashes a run mid-file.
    """

    max_examples: int = 3  # examples kept per reason

    def __init__(self) -> None:
        self.loaded: int = 0
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record one skipped record: `reason` (a short key), `where` (`file:line`), `detail`."""
        self._counts[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def total_skipped(self) -> int:
        """Number of records skipped, all reasons together."""
        return sum(self._counts.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason (a copy)."""
        return dict(self._counts)

    def as_dict(self) -> dict:
        """`{"loaded": n, "skipped": {reason: count}, "examples": {reason: [...]}}`."""
        return {
            "loaded": self.loaded,
            "skipped": dict(self._counts),
            "examples": {k: list(v) for k, v in self._examples.items()},
        }

    def summary(self) -> str:
        """One human-readable paragraph; the empty string when nothing was skipped."""
        total = self.total_skipped()
        if total == 0:
            return ""
        parts = []
        for reason, count in self._counts.most_common():
            first = self._examples.get(reason, [""])[0]
            parts.append(f"{count} {reason} (e.g. {first})")
        return (
            f"Loaded {self.loaded} records, skipped {total}: " + "; ".join(parts) + "."
        )

    def __repr__(self) -> str:
        return f"LoadReport(loaded={self.loaded}, skipped={dict(self._counts)})"
