"""Exact resume: a run stopped at step k and resumed from its checkpoint ends with the same
weights, bit for bit on CPU, as a run that was never stopped; checkpoints are written
atomically and `find_latest` only counts complete ones."""

from __future__ import annotations

import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from vlmalign.config import replace
from vlmalign.objective import Objective
from vlmalign.train import checkpoint
from vlmalign.train.checkpoint import REQUIRED, TrainingState, find_latest, resolve_resume
from vlmalign.train.trainer import train


def _trained(result) -> dict[str, torch.Tensor]:
    """Projector weights (named as in model.safetensors) and the objective's learnable
    temperature, if any, of a finished run."""
    weights = {f"projector.{k}": v.clone() for k, v in result.model.projector.state_dict().items()}
    weights |= {f"objective.{k}": v.detach().clone() for k, v in result.objective.state_dict().items()}
    return weights


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _losses(history: list[dict]) -> list[dict]:
    """Logged entries without the wall-clock timing."""
    return [{k: v for k, v in e.items() if k != "s_per_step"} for e in history]


# (group_by_length, grad_accum_steps, batch_size, resume_step). The train split has 76
# samples: batch 16 gives 4 batches an epoch, so 6 steps cross an epoch boundary, and a
# resume at step 4 starts exactly at one (the sampler's epoch must come from the
# checkpoint, not from Accelerate's loader, which restarts its count at 0). Batch 8 x
# accum 2 gives 9 batches an epoch: step 5 is the epoch's last batch alone (Accelerate
# syncs at the loader's end), so the resumed run must skip 6 batches, not 3 steps' worth
# of anything else, and re-align its accumulation with the epoch's end.
CASES = {
    "grouped": (True, 1, 16, 3),
    "grouped-at-epoch-end": (True, 1, 16, 4),
    "plain-shuffle-accum2": (False, 2, 8, 3),
}


def _count_steps(monkeypatch) -> list[int]:
    """A list that gets one entry per optimizer step the trainer takes from now on."""
    from vlmalign.train import trainer

    taken: list[int] = []
    real = trainer.optimizer_step

    def counted(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", counted)
    return taken


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tiny_cfg, tmp_path, case, monkeypatch):
    group, accum, batch, k = CASES[case]
    cfg = tiny_cfg(
        "align-clip",
        "train.max_steps=6", f"train.save_every={k}", "train.warmup_steps=2", "train.lr=3e-3",
        f"train.group_by_length={group}", f"train.grad_accum_steps={accum}", f"train.batch_size={batch}",
        "train.log_every=1", f"train.out_dir={tmp_path / 'full'}",
    )
    full = train(cfg)
    stopped = tmp_path / "full" / f"checkpoint-{k}"
    assert checkpoint.is_complete(stopped)
    saved = json.loads((stopped / checkpoint.STATE_NAME).read_text())
    assert (saved["step"], saved["epoch"], saved["batches_done"]) == (k, 0, k * accum)

    # A model built from scratch and a new out_dir: only the checkpoint carries state.
    steps = _count_steps(monkeypatch)
    resumed = train(replace(cfg, [f"train.out_dir={tmp_path / 'resumed'}", f"train.resume={stopped}"]))
    # Only the steps after the checkpoint ran (a run that ignored train.resume and trained
    # all 6 from the same seed would reach the same weights).
    assert steps == [1] * (6 - k)
    want = _trained(full)
    _assert_same_weights(_trained(resumed), want)
    at_k = load_file(str(stopped / "model.safetensors"))
    assert any(not torch.equal(at_k[n], want[n]) for n in want if n.startswith("projector.")), (
        "the steps after the checkpoint must move the weights, or equality proves nothing"
    )
    # Step by step the same losses (same batches, same weights), and the first k entries
    # come back from the checkpoint.
    assert _losses(resumed.history) == _losses(full.history)
    assert [e["step"] for e in resumed.history] == [1, 2, 3, 4, 5, 6]


def test_resume_latest_after_a_crash_continues_in_place(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("align", "train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.warmup_steps=1")
    full = train(cfg)
    out = tmp_path / "align"
    # As if the process died after checkpoint-2 while writing a later one: no final
    # checkpoint, a half-written folder.
    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-3.tmp").mkdir()
    (out / "checkpoint-3.tmp" / "model.safetensors").write_text("partial")
    steps = _count_steps(monkeypatch)
    resumed = train(replace(cfg, ["train.resume=latest"]))
    assert steps == [1, 1]  # steps 3 and 4 only: the run continued from checkpoint-2
    _assert_same_weights(_trained(resumed), _trained(full))
    assert _losses(resumed.history) == _losses(full.history)
    assert find_latest(out) == out / "checkpoint-4"
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_periodic_checkpoints_are_pruned_and_no_tmp_is_left(tiny_cfg, tmp_path):
    cfg = tiny_cfg("align", "train.max_steps=5", "train.save_every=1", "train.keep_checkpoints=2", "train.warmup_steps=1")
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "align").iterdir() if p.is_dir() and p.name != "tb")
    assert names == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]  # 2 periodic + the final
    assert find_latest(tmp_path / "align").name == "checkpoint-5"


def _fake_checkpoint(path, missing: str = ""):
    path.mkdir(parents=True)
    for name in REQUIRED:
        if name != checkpoint.MANIFEST_NAME:
            (path / name).write_text("x")
    checkpoint.write_manifest(path)
    if missing:
        (path / missing).unlink()


def test_find_latest_ignores_tmp_and_incomplete_folders(tmp_path):
    assert find_latest(tmp_path) is None
    assert find_latest(tmp_path / "absent") is None
    _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-10")
    _fake_checkpoint(tmp_path / "checkpoint-30.tmp")  # an interrupted save
    _fake_checkpoint(tmp_path / "checkpoint-20", missing=checkpoint.STATE_NAME)
    _fake_checkpoint(tmp_path / "checkpoint-25", missing=checkpoint.OPTIMIZER_NAME)  # pre-resume format
    _fake_checkpoint(tmp_path / "checkpoint-x")
    assert find_latest(tmp_path) == tmp_path / "checkpoint-10"  # numeric, not lexical, order
    with pytest.raises(FileNotFoundError, match=checkpoint.STATE_NAME):
        resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path)
    assert resolve_resume("", tmp_path) is None


def test_resume_latest_without_a_checkpoint_names_out_dir(tiny_cfg, tmp_path):
    cfg = tiny_cfg("align", "train.resume=latest")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "align"))):
        train(cfg)


def test_failed_save_leaves_no_folder(tiny_model, tmp_path, monkeypatch):
    model = tiny_model
    objective = Objective(model.cfg.objective)
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    state = TrainingState(step=7)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, state, model, objective, optimizer, scheduler)
    assert list(tmp_path.iterdir()) == []  # the partial .tmp folder is removed
    assert find_latest(tmp_path) is None
    monkeypatch.undo()
    path = checkpoint.save_checkpoint(tmp_path, state, model, objective, optimizer, scheduler)
    assert find_latest(tmp_path) == path and not (tmp_path / "checkpoint-7.tmp").exists()


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    as_json, tensors = checkpoint.rng_state()
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    as_json = json.loads(json.dumps(as_json))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(as_json, load_file(str(tmp_path / "rng.safetensors")))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_sampler_skip_drops_the_first_batches_of_one_epoch_only():
    from vlmalign.data.sampler import LengthGroupedBatchSampler

    lengths = [(i * 7) % 23 for i in range(50)]
    s = LengthGroupedBatchSampler(lengths, batch_size=4, seed=1, group=2)
    s.set_epoch(3)
    epoch3, epoch4 = list(s), list(s)
    s.set_epoch(3)
    s.skip_next(5)
    assert list(s) == epoch3[5:]
    assert list(s) == epoch4  # the next epoch is whole again
    with pytest.raises(ValueError, match="negative"):
        s.skip_next(-1)
