"""Crash and resume with real processes: a training run killed with SIGKILL at a random
step (preferably while it writes a checkpoint) and resumed with `train.resume=latest`
ends with the same weights, bit for bit, as a run that was never interrupted; SIGTERM
makes the run save the step it is on and exit.

Each test starts `python -m vlmalign.cli train` subprocesses (a few seconds of imports
each), hence the `slow` mark."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.train.checkpoint import find_latest, verify_checkpoint

from .conftest import TINY

pytestmark = pytest.mark.slow

MAX_STEPS = 12
TIMEOUT_S = 300  # per process; only reached when something hangs


def _command(shapes_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vlmalign.cli", "train", "align", *TINY,
        f"data.root={shapes_root}", f"train.out_dir={out_dir}", f"train.max_steps={MAX_STEPS}",
        "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1", "train.eval_at_end=false",
        "train.keep_checkpoints=0", *extra,
    ]


def _env() -> dict[str, str]:
    return os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                         "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    final = out_dir / f"checkpoint-{MAX_STEPS}"
    verify_checkpoint(final)
    weights = {f"model.{k}": v for k, v in load_file(str(final / "model.safetensors")).items()}
    if (final / "objective.safetensors").is_file():
        weights |= {f"objective.{k}": v for k, v in load_file(str(final / "objective.safetensors")).items()}
    return weights


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def reference(shapes_root, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted run (periodic saves on, as in the killed run)."""
    out = tmp_path_factory.mktemp("reference")
    _run(_command(shapes_root, out / "run", "train.save_every=1"), out)
    return _final_weights(out / "run")


def _wait_for(predicate, proc: subprocess.Popen, what: str, poll_s: float, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll_s)


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A training subprocess writing stdout and stderr to `log` (a pipe nobody reads
    could fill up and block it)."""
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_sigkill_at_a_random_step_then_resume_latest_matches(shapes_root, tmp_path, reference):
    kill_after = random.randint(2, MAX_STEPS - 4)  # shown in the failure message below
    out, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _start(_command(shapes_root, out, "train.save_every=1"), tmp_path, log)
    _wait_for(lambda: (out / f"checkpoint-{kill_after}").is_dir(), proc, f"checkpoint-{kill_after}", 0.05, log)
    # Kill at the first sign of the next save: with luck in the middle of writing it.
    nxt = out / f"checkpoint-{kill_after + 1}"
    _wait_for(lambda: nxt.with_name(nxt.name + ".tmp").exists() or nxt.exists(), proc, "the next save", 0.002, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    state = f"killed after checkpoint-{kill_after}; left {sorted(p.name for p in out.iterdir())}"
    latest = find_latest(out)
    assert latest is not None and int(latest.name.split("-")[1]) >= kill_after, state
    assert not (out / f"checkpoint-{MAX_STEPS}").exists(), state
    kept = _identity(latest / "manifest.json")

    _run(_command(shapes_root, out, "train.save_every=1", "train.resume=latest"), tmp_path)
    assert _identity(latest / "manifest.json") == kept, f"{state}: the resumed run rewrote {latest.name}"
    _assert_same(_final_weights(out), reference)


def test_sigterm_saves_the_current_step_and_exits(shapes_root, tmp_path, reference):
    out, log = tmp_path / "run", tmp_path / "terminated.log"
    proc = _start(_command(shapes_root, out, "train.save_every=2"), tmp_path, log)
    _wait_for(lambda: (out / "checkpoint-2").is_dir(), proc, "checkpoint-2", 0.02, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=TIMEOUT_S)
    text = log.read_text()[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, "SIGTERM did not end the run through its save:\n" + text
    latest = find_latest(out)
    assert latest is not None, text
    step = int(latest.name.split("-")[1])
    assert 2 <= step < MAX_STEPS, text  # the step it was on, not the end of the run
    saved = json.loads((latest / "trainer_state.json").read_text())
    assert saved["step"] == step
    _run(_command(shapes_root, out, "train.save_every=2", "train.resume=latest"), tmp_path)
    _assert_same(_final_weights(out), reference)
