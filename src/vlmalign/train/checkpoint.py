"""Checkpoints that resume exactly: one folder per step, written atomically.

```
checkpoint-{step}/
  model.safetensors      trainable weights + centring buffers (VLM.save_pretrained)
  config.yaml            the resolved config (VLM.from_pretrained rebuilds the model)
  objective.safetensors  the objective's learnable temperature / bias, when it has any
  optimizer.pt           optimizer.state_dict(): tensors and numbers only, read back with
                         torch.load(weights_only=True), so loading runs no pickled code
                         (FSDP2: the full state by parameter name; DeepSpeed: a record of
                         its ZeRO stage and world size, see train/sharded.py)
  deepspeed/             DeepSpeed only: its per-rank ZeRO files (engine.save_checkpoint)
  rng_state.safetensors  torch CPU (and CUDA) generator states
  trainer_state.json     step, data position, scheduler, python/numpy RNG, history
  manifest.json          size and sha256 of every file above; written last
```

A checkpoint is written into `checkpoint-{step}.tmp`, its manifest last, every file
fsynced, then renamed, so an interrupted save never leaves a folder that looks complete.
Loading (`load_weights`, `load_training_state`) first checks every file against the
manifest and names the one that does not match; `find_latest` (`train.resume=latest`)
skips, with a warning, any checkpoint whose manifest is missing or does not verify (a
save cut off mid-write, a truncated copy, bit rot). A disk that fills up during a save
raises `DiskFullError` after removing the partial folder; earlier checkpoints are never
touched before the new one is complete. A resumed run reloads all of it (weights,
optimizer, scheduler, RNG states, sampler epoch and position) and ends with the same
weights, bit for bit on CPU, as a run that was never stopped (tests/test_resume.py,
tests/test_crash.py). Nothing is unpickled except through `torch.load(weights_only=True)`.

Under FSDP2 and DeepSpeed ZeRO the weights and optimizer state are sharded over the
ranks: `save_checkpoint_sharded` is then called on every rank, gathers what rank 0 writes
through train/sharded.py, and keeps the same layout, manifest and atomic rename
(tests/test_sharded_checkpoint.py). One process and DDP keep `save_checkpoint`, rank 0 alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from vlmalign.config import Config, ConfigError, load_config
from vlmalign.errors import DiskFullError, is_disk_full
from vlmalign.models.vlm import CONFIG_NAME, VLM, WEIGHTS_NAME
from vlmalign.train import rundir, sharded
from vlmalign.train.sharded import OPTIMIZER_NAME, TrainableState

log = logging.getLogger(__name__)

OBJECTIVE_NAME = "objective.safetensors"
RNG_NAME = "rng_state.safetensors"
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vlmalign-checkpoint-manifest/1"
# Every file a resumable checkpoint holds (objective.safetensors only when the objective
# has parameters). MANIFEST_NAME is written last.
REQUIRED = (WEIGHTS_NAME, CONFIG_NAME, OPTIMIZER_NAME, RNG_NAME, STATE_NAME, MANIFEST_NAME)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Config keys that may change between the interrupted run and its resumption without
# changing the trajectory (where to write, how long, how often to log or save).
# (max_steps is not among them: the cosine schedule depends on it.)
_RESUME_FREE_KEYS = {
    "train.resume", "train.out_dir", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.eval_at_end",
    "train.report_to",
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be trusted: no manifest, or a file that does not
    match it (missing, truncated, changed)."""


@dataclass
class TrainingState:
    """Where the loop stands, besides tensors: what a resumed run needs to continue."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # sampler epoch in progress
    batches_done: int = 0  # sampler batches of `epoch` consumed, all processes together
    micro_step: int = 0  # Accelerate's accumulation counter (`accelerator.step`)
    history: list[dict] = field(default_factory=list)  # logged entries so far
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. skipped/truncated counts


# ----------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The python, numpy, torch CPU and CUDA generator states: (JSON part, tensor part)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return as_json, tensors


def set_rng_state(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned."""
    py = as_json["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = as_json["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: restoring the first ones", len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------- writing
def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (POSIX; elsewhere a no-op for folders)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[tuple[str, Path]]:
    """(relative POSIX name, path) of every file under `directory`, subfolders included."""
    return sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file())


def write_manifest(directory: str | Path) -> dict[str, Any]:
    """Write `directory/manifest.json`: the size and sha256 of every other file under the
    folder (read back from disk, so it vouches for what was written). Returns it."""
    directory = Path(directory)
    files = {
        name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for name, p in _files(directory)
        if name != MANIFEST_NAME
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


# Folders verified in this process, by a stat signature of their files: loading a
# checkpoint verifies it in find_latest, load_weights and load_training_state, and
# hashing a multi-GB optimizer state three times would be wasted time.
_verified: dict[str, tuple] = {}


def _signature(directory: Path) -> tuple:
    return tuple((name, p.stat().st_size, p.stat().st_mtime_ns) for name, p in _files(directory))


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file listed in `directory/manifest.json` (size, then sha256) and that
    the manifest lists every file a resumable checkpoint needs. Raises `CheckpointError`
    naming the file that does not match and what to do. Files not in the manifest (e.g.
    metrics.json written by the evaluation afterwards) are ignored."""
    directory = Path(directory)
    advice = "resume from another checkpoint-* folder (train.resume=PATH), or train from scratch"
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} has no {MANIFEST_NAME}: its save was cut off before it finished, or it was "
            f"written by an older vlmalign without manifests; {advice}"
        )
    key = str(directory.resolve())
    signature = _signature(directory)
    if _verified.get(key) == signature:
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e}); {advice}") from None
    unlisted = [name for name in REQUIRED if name != MANIFEST_NAME and name not in files]
    if unlisted:
        raise CheckpointError(f"{manifest_path} does not list {', '.join(unlisted)}; {advice}")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_NAME}); {advice}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{path} is {size} bytes but {MANIFEST_NAME} says {entry['size']}: the file was truncated "
                f"or changed after saving; {advice}"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is corrupt or was changed "
                f"after saving; {advice}"
            )
    _verified[key] = signature


def _write_files(
    tmp: Path,
    state: TrainingState,
    model: VLM,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Any,
    gathered: tuple[TrainableState, dict[str, Any]] | None = None,
) -> None:
    """Every file of a checkpoint into `tmp`, the manifest last, all fsynced. `gathered`:
    (weights, optimizer state) already gathered from a sharded engine (train/sharded.py);
    None reads them from `model`, `objective` and `optimizer` as they are."""
    if gathered is None:
        model.save_pretrained(tmp)
        obj = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
        optimizer_state = optimizer.state_dict()
    else:  # the same files as VLM.save_pretrained writes, from the gathered tensors
        weights, optimizer_state = gathered
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(weights.model, str(tmp / WEIGHTS_NAME))
        model.cfg.save(tmp / CONFIG_NAME)
        obj = weights.objective
    if obj:
        save_file(obj, str(tmp / OBJECTIVE_NAME))
    torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
    rng_json, rng_tensors = rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_NAME))
    record = asdict(state)
    record |= record.pop("extra")
    record |= {"scheduler": scheduler.state_dict(), "rng": rng_json}
    if scaler is not None:
        record["scaler"] = scaler.state_dict()
    try:
        text = json.dumps(record, indent=1)
    except TypeError as e:
        raise TypeError(f"trainer state for {tmp.name} is not JSON-serialisable ({e}); keep scheduler and logged values plain numbers") from None
    (tmp / STATE_NAME).write_text(text)
    rundir.copy_provenance(tmp.parent, tmp)  # the run's provenance.json, covered by the manifest
    for _, path in _files(tmp):
        _fsync(path)
    write_manifest(tmp)
    _fsync(tmp / MANIFEST_NAME)
    for folder in sorted({p.parent for _, p in _files(tmp)}, key=lambda d: len(d.parts), reverse=True):
        _fsync(folder)


def save_checkpoint(
    out_dir: str | Path,
    state: TrainingState,
    model: VLM,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Any = None,
) -> Path:
    """Write `out_dir/checkpoint-{state.step}` atomically (into `.tmp`, manifest last,
    fsync, rename) and return it; an existing folder of that step is replaced only once
    the new one is complete. `scaler`: Accelerate's fp16 GradScaler, if any. Called by the
    main process alone, for engines that do not shard (one process, DDP); see
    `save_checkpoint_sharded` for FSDP2 / DeepSpeed.

    If writing fails, the partial `.tmp` folder is removed and the error re-raised; a full
    disk (ENOSPC / EDQUOT) raises `DiskFullError` naming the newest checkpoint that is
    still intact.
    """
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # left by an interrupted save
        shutil.rmtree(tmp)
    return _commit(out_dir, final, tmp, lambda: _write_files(tmp, state, model, objective, optimizer, scheduler, scaler))


def save_checkpoint_sharded(
    accelerator: Accelerator,
    out_dir: str | Path,
    state: TrainingState,
    module: nn.Module,
    model: VLM,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Any = None,
) -> Path:
    """`save_checkpoint` for engines that shard weights or optimizer state (FSDP2,
    DeepSpeed ZeRO). Call on EVERY rank: the weights and optimizer state are gathered to
    rank 0 (train/sharded.py), DeepSpeed writes its per-rank files into the `.tmp` folder,
    then rank 0 writes the rest, the manifest last, and renames; every rank returns the
    final folder once it exists. `module`: what `accelerator.prepare` returned for the
    trainer's TrainStep. `out_dir` must be on a filesystem every rank sees (DeepSpeed)."""
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    weights = sharded.gather_trainable_state(accelerator, module, model, objective)  # collective
    optimizer_state = sharded.optimizer_state_for_save(accelerator, module, optimizer)  # collective
    if accelerator.is_main_process:
        if tmp.exists():  # left by an interrupted save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    sharded.save_engine_state(accelerator, module, tmp)  # DeepSpeed: every rank writes its part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        gathered = (weights, optimizer_state)
        _commit(out_dir, final, tmp, lambda: _write_files(tmp, state, model, objective, optimizer, scheduler, scaler, gathered))
    accelerator.wait_for_everyone()
    return final


def _commit(out_dir: Path, final: Path, tmp: Path, write: Callable[[], None]) -> Path:
    """Run `write()` (fills `tmp`, manifest last), then rename `tmp` to `final`; on failure
    remove `tmp` and re-raise (a full disk as `DiskFullError`)."""
    try:
        write()
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            found = _checkpoints(out_dir)
            intact = f"the previous checkpoint {max(found)[1].name} is intact" if found else "no earlier checkpoint exists there"
            raise DiskFullError(
                err.errno,
                f"disk full while saving {final.name} to {out_dir}; {intact}; free space or set "
                f"train.out_dir to a disk with room (then train.resume=PATH to continue) ({err})",
            ) from err
        raise
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)  # put the previous folder back under its name
            raise
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(out_dir)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int, up_to_step: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints with step <= `up_to_step`
    (checkpoints of a later step, left by an earlier run, are not this run's to delete);
    `keep` <= 0 keeps everything. Returns the deleted folders."""
    if keep <= 0:
        return []
    mine = [(s, p) for s, p in _checkpoints(Path(out_dir)) if s <= up_to_step]
    doomed = [p for _, p in sorted(mine)[:-keep]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# ----------------------------------------------------------------------------- finding
def is_complete(directory: str | Path) -> bool:
    """Whether `directory` holds every file a resumable checkpoint needs."""
    return all((Path(directory) / name).is_file() for name in REQUIRED)


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for each complete `checkpoint-{step}` directly under `out_dir`."""
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        m = _CHECKPOINT_RE.match(path.name)
        if m and path.is_dir() and is_complete(path):
            found.append((int(m.group(1)), path))
    return found


def find_latest(out_dir: str | Path) -> Path | None:
    """The verified `checkpoint-{step}` under `out_dir` with the highest step, or None.
    `.tmp` folders, folders missing a file and folders whose manifest is missing or does
    not match (an interrupted save, a corrupt copy) never count; each one passed over
    newer than the one returned is logged as a warning."""
    for _, path in sorted(_checkpoints(Path(out_dir)), reverse=True):
        try:
            verify_checkpoint(path)
        except (CheckpointError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        return path
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's newest verified checkpoint
    (`find_latest`, the one rule for "latest" everywhere: resume, eval, inference,
    export). A checkpoint with a manifest is verified against it. Raises
    FileNotFoundError naming what was looked for."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        if (path / MANIFEST_NAME).is_file():
            verify_checkpoint(path)
        return path
    if path.is_dir() and (latest := find_latest(path)) is not None:
        return latest
    raise FileNotFoundError(
        f"{path} is not a vlmalign checkpoint (no {WEIGHTS_NAME}) nor a run folder holding a complete "
        "checkpoint-N; give a checkpoint-N folder or the run's train.out_dir"
    )


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """`train.resume` -> the checkpoint folder to continue from: "" -> None, "latest" -> the
    newest complete checkpoint under `out_dir`, anything else -> that folder, checked."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest(out_dir)
        if latest is None:
            raise FileNotFoundError(
                f"train.resume=latest: no complete checkpoint-* folder under {out_dir}. Train from scratch "
                "(leave train.resume empty) or set train.resume to a checkpoint folder."
            )
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume}: no such folder; give a checkpoint-* folder or 'latest'")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"train.resume={resume} is not a resumable checkpoint: it lacks {', '.join(missing)} (an interrupted "
            "save, or a checkpoint from before resume support). Pick another checkpoint-* folder."
        )
    verify_checkpoint(path)
    return path


def config_changes(directory: str | Path, cfg: Config) -> list[str]:
    """Dotted keys whose value in `cfg` differs from the checkpoint's config.yaml, except
    those that do not change the trajectory (out_dir, max_steps, logging, saving)."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    try:
        saved = flat(load_config(Path(directory) / CONFIG_NAME).to_dict())
    except ConfigError as e:  # written by another version of vlmalign
        return [f"(unreadable {CONFIG_NAME}: {e})"]
    now = flat(cfg.to_dict())
    return sorted(k for k in now if k not in _RESUME_FREE_KEYS and saved.get(k) != now[k])


# ----------------------------------------------------------------------------- reading
def load_weights(directory: str | Path, model: VLM, objective: nn.Module) -> None:
    """Load a checkpoint's trainable weights (with the centring mean) into `model` and the
    objective's learnable temperature into `objective`, after `verify_checkpoint`
    (raises `CheckpointError` naming a file that does not match the manifest)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    model.load_trainable(directory)
    path = directory / OBJECTIVE_NAME
    expected = objective.state_dict()
    if path.is_file():
        objective.load_state_dict(load_file(str(path)))
    elif expected:
        raise FileNotFoundError(f"{directory} has no {OBJECTIVE_NAME} but this objective learns {sorted(expected)}; was it saved by another recipe?")


def load_training_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Any = None,
    accelerator: Accelerator | None = None,
    module: nn.Module | None = None,
) -> TrainingState:
    """Load the optimizer, scheduler, (fp16 scaler) and RNG states of a checkpoint and
    return the loop's position. Call it last, right before the loop: it sets the RNGs.
    Verifies the manifest first (`CheckpointError`); the optimizer state is unpickled with
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain data.

    `accelerator` and `module` (the prepared TrainStep): pass them on every rank when the
    run may be sharded (FSDP2, DeepSpeed): the optimizer state is then loaded through
    `sharded.load_optimizer_state` (collective). Without them the optimizer loads its own
    numbered state dict, as a one-process / DDP run always did."""
    directory = Path(directory)
    verify_checkpoint(directory)
    record = json.loads((directory / STATE_NAME).read_text())
    if accelerator is None:
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
    else:
        if module is None:
            raise ValueError("load_training_state(accelerator=...) also needs module=, the prepared TrainStep")
        sharded.load_optimizer_state(accelerator, module, optimizer, directory)
    scheduler.load_state_dict(record.pop("scheduler"))
    scaler_state = record.pop("scaler", None)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    set_rng_state(record.pop("rng"), load_file(str(directory / RNG_NAME)))
    known = {"step", "epoch", "batches_done", "micro_step", "history"}
    state = TrainingState(**{k: record.pop(k) for k in known})
    state.extra = record
    return state
