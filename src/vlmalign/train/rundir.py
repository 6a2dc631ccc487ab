"""A run folder's lock and a checkpoint's provenance.

Lock: two runs started into the same `train.out_dir` at once would interleave their
checkpoints, logs and `latest` pointer. `RunLock(out_dir)` takes an exclusive
`fcntl.flock` on `out_dir/.vlmalign.lock` (the holder's pid, host and start time are
written into it for the message); a second run gets `RunLockedError` naming the holder.
The kernel releases a flock when its process ends, however it ends (a killed or crashed
run never leaves the folder stuck), so a run that resumes the first after it ended takes
the lock as usual. Within one process the lock is re-entrant (the command line and the
trainer may both take it). Only the main process of a distributed run takes it.

Provenance: `provenance(cfg)` records what made a checkpoint: vlmalign's version and git
commit, the versions of the packages that change results, the hardware, and the sha256 of
every training data file. `write_provenance` puts it into a folder as `provenance.json`;
`provenance_differences` compares a saved record with the running environment, for
`vlmalign eval` to warn when a checkpoint was made with other versions.

Skips: `write_skipped` lists every record a run skipped (reason and place) in
`out_dir/skipped.jsonl`; the evaluation appends its own below them.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from vlmalign.config import Config
from vlmalign.data.sample import LoadReport

LOCK_NAME = ".vlmalign.lock"
PROVENANCE_NAME = "provenance.json"
SKIPPED_NAME = "skipped.jsonl"
# Packages whose version changes numbers or loading (reported and compared by `vlmalign eval`).
PACKAGES = ("torch", "transformers", "accelerate", "peft", "safetensors", "timm", "tokenizers", "numpy")
# Files hashed for the record; larger ones are hashed too (streamed), only their time grows.
_HASH_CHUNK = 1 << 20


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


# Locks held by this process: resolved lock path -> (open file, depth).
_HELD: dict[str, list] = {}


def is_main_process() -> bool:
    """Rank 0 of a launched run (or a single process), from the launcher's RANK."""
    return int(os.environ.get("RANK", "0")) == 0


class RunLock:
    """Exclusive lock on a run folder for the life of a `with` block (or `acquire` ..
    `release`). `RunLockedError` when another live process holds it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._key = ""
        self.active = False

    def acquire(self) -> RunLock:
        if not is_main_process():
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in _HELD:  # re-entrant within this process
            _HELD[self._key][1] += 1
            self.active = True
            return self
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.out_dir} is in use by a run that is still going ({holder}). Wait for it to end, "
                f"then resume it with train.resume=latest, or give this run another train.out_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _HELD[self._key] = [f, 1]
        self.active = True
        return self

    def release(self) -> None:
        if not self.active:
            return
        self.active = False
        entry = _HELD.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            f = entry[0]
            f.seek(0)
            f.truncate()  # the file stays (removing it would race a starting run); the lock goes
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- provenance


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_commit(start: str | Path | None = None) -> str:
    """The commit of the git checkout vlmalign runs from ("+dirty" when it has local
    changes), or "" when it is not run from a checkout."""
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of `names` ("" for a package that is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def hardware() -> dict[str, Any]:
    """The machine: OS, CPU, core count and the accelerators torch sees."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda or ""
    return info


def training_files(cfg: Config) -> list[Path]:
    """The data files a run trains on: `data.train_file` (each of a comma list), the
    shapes layout's training files, or the shard index."""
    from vlmalign.data.splits import INSTRUCT_TRAIN
    from vlmalign.train.recipes import RECIPES

    root = Path(cfg.data.root)
    if cfg.data.shards:
        shards = Path(cfg.data.shards)
        index = shards / "index.json" if shards.is_dir() else shards
        return [index] if index.is_file() else []
    names = cfg.data.train_file
    if not names.strip():
        names = INSTRUCT_TRAIN if RECIPES.get(cfg.recipe).data == "conversations" else "train.jsonl"
    paths = [Path(n.strip()) if Path(n.strip()).is_absolute() else root / n.strip() for n in names.split(",") if n.strip()]
    return [p for p in paths if p.is_file()]


def provenance(cfg: Config) -> dict[str, Any]:
    """What made a run: vlmalign version and git commit, package versions, hardware, and
    the sha256 and size of each training data file."""
    from vlmalign import __version__

    return {
        "vlmalign": {"version": __version__, "git_commit": git_commit()},
        "packages": package_versions(),
        "hardware": hardware(),
        "data": {str(p): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in training_files(cfg)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_provenance(directory: str | Path, record: dict[str, Any]) -> Path:
    """`record` as `directory/provenance.json`."""
    path = Path(directory) / PROVENANCE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_provenance(checkpoint: str | Path) -> dict[str, Any] | None:
    """The provenance of a checkpoint: its own `provenance.json`, else its run folder's;
    None when neither exists or it cannot be read."""
    checkpoint = Path(checkpoint)
    for path in (checkpoint / PROVENANCE_NAME, checkpoint.parent / PROVENANCE_NAME):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                return None
    return None


def provenance_differences(record: dict[str, Any]) -> list[str]:
    """How the environment now differs from `record`: "torch 2.14.1 (checkpoint: 2.13.0)",
    for vlmalign's version and commit and each package in `PACKAGES`."""
    from vlmalign import __version__

    out = []
    made = record.get("vlmalign", {})
    if made.get("version") and made["version"] != __version__:
        out.append(f"vlmalign {__version__} (checkpoint: {made['version']})")
    commit = git_commit()
    if made.get("git_commit") and commit and made["git_commit"] != commit:
        out.append(f"vlmalign commit {commit[:12]} (checkpoint: {made['git_commit'][:12]})")
    now = package_versions()
    for name, version in (record.get("packages") or {}).items():
        if name in now and version != now[name]:
            out.append(f"{name} {now[name] or 'not installed'} (checkpoint: {version or 'not installed'})")
    return out


def copy_provenance(run_dir: str | Path, checkpoint_dir: str | Path) -> Path | None:
    """Copy the run's `provenance.json` into a checkpoint folder being written (before its
    manifest, so the manifest covers it); None when the run has none."""
    src = Path(run_dir) / PROVENANCE_NAME
    if not src.is_file():
        return None
    dst = Path(checkpoint_dir) / PROVENANCE_NAME
    dst.write_bytes(src.read_bytes())
    return dst


def write_skipped(out_dir: str | Path, report: LoadReport, task: str = "train") -> Path:
    """Every record `report` skipped or repaired, one JSON object per line (`task`,
    `action`, `reason`, `where`, `detail`), as `out_dir/skipped.jsonl` (replaced)."""
    path = Path(out_dir) / SKIPPED_NAME
    path.unlink(missing_ok=True)
    return report.write_jsonl(path, task=task)
