"""What every benchmark script does with its figures: the JSON record (with the machine's
load before and after, since timings here share the CPU) and the closing line."""

from __future__ import annotations

import json
from pathlib import Path


def write_record(path: str | None, record: dict, load_before) -> None:
    """Write `record` as JSON to `path` (when given) and print the load averages."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    print(f"load average before {load_before}, after {record['load_avg_after']}")
