"""Guards of a long run: non-finite steps skipped and counted, SIGTERM/SIGINT turned into a
stop request, and environment failures (out of memory, a missing extra) explained."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from torch import nn

from vlmalign.errors import (
    TrainingOOMError,
    explain_oom,
    friendly_oom,
    is_out_of_memory,
    require_extra,
)
from vlmalign.train.guard import NonFiniteError, NonFiniteGuard, StopSignal

# ---------------------------------------------------------------- NonFiniteGuard


def _param(grad: list[float] | None) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(len(grad) if grad else 2))
    p.grad = torch.tensor(grad) if grad is not None else None
    return p


FINITE = torch.tensor(1.5)


def test_guard_flags_loss_and_gradients_and_counts():
    guard = NonFiniteGuard(max_in_a_row=3)
    ok = [_param([0.1, -2.0]), _param(None)]  # a parameter without a gradient is ignored
    assert guard.should_skip(FINITE, ok, step=0) is False
    assert guard.should_skip(torch.tensor(float("nan")), ok, step=1) is True
    assert guard.should_skip(FINITE, [_param([1.0, float("inf")])], step=2) is True
    assert (guard.skipped_total, guard.in_a_row) == (2, 2)
    assert guard.should_skip(FINITE, ok, step=3) is False  # a good step resets the streak only
    assert (guard.skipped_total, guard.in_a_row, guard.skipped_steps) == (2, 0, [1, 2])
    # a total norm computed by clipping is trusted instead of scanning the gradients
    assert guard.should_skip(FINITE, [_param([float("nan")])], step=4, grad_norm=torch.tensor(0.5)) is False
    assert guard.should_skip(FINITE, ok, step=5, grad_norm=float("inf")) is True


def test_guard_aborts_after_max_in_a_row_with_step_and_batch_ids():
    guard = NonFiniteGuard(max_in_a_row=2)
    nan = torch.tensor(float("nan"))
    assert guard.should_skip(nan, [], step=10, batch_ids=["a:1", "a:2"]) is True
    with pytest.raises(NonFiniteError, match=r"step 11; batch ids \['b:7', 'b:9'\]: 2 steps in a row") as info:
        guard.should_skip(nan, [], step=11, batch_ids=["b:7", "b:9"])
    assert info.value.step == 11 and info.value.batch_ids == ["b:7", "b:9"]
    assert "train.max_nonfinite_steps" in str(info.value) and isinstance(info.value, FloatingPointError)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


def test_guard_state_round_trips():
    guard = NonFiniteGuard(5)
    guard.should_skip(torch.tensor(float("inf")), [], step=3)
    other = NonFiniteGuard(5)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {"skipped_total": 1, "in_a_row": 1, "skipped_steps": [3]}


def test_a_poisoned_batch_leaves_weights_and_optimizer_state_untouched():
    """The intended use: backward, check, and on True zero the grads and skip the step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(max_in_a_row=2)
    batches = [torch.randn(4, 3), torch.tensor([[1.0, float("nan"), 0.0]] * 4), torch.randn(4, 3)]
    skipped, snapshots = [], []
    for step, x in enumerate(batches):
        loss = model(x).pow(2).mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        if guard.should_skip(loss, model.parameters(), step, batch_ids=[f"row{step}"]):
            optimizer.zero_grad(set_to_none=True)
            skipped.append(step)
            snapshots.append((before, [p.detach().clone() for p in model.parameters()]))
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert skipped == [1] and guard.skipped_total == 1 and guard.in_a_row == 0
    before, after = snapshots[0]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(s["exp_avg_sq"]).all() for s in optimizer.state.values())


# ---------------------------------------------------------------- StopSignal


def _wait(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_sets_requested_and_restores_handlers(sig):
    before = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}
    with StopSignal() as stop:
        assert stop.requested is False
        os.kill(os.getpid(), sig)
        assert _wait(lambda: stop.requested)
        assert stop.signum == sig
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is ignored: still alive here
        time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in StopSignal.SIGNALS} == before


def test_second_sigint_raises_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait(lambda: stop.requested)
        os.kill(os.getpid(), signal.SIGINT)
        _wait(lambda: False, 2.0)  # the handler raises in here
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_signal_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def body() -> None:
        with StopSignal() as stop:
            result["requested"] = stop.requested
            result["handler"] = signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert result == {"requested": False, "handler": before}


# ---------------------------------------------------------------- environment errors


def test_a_real_cpu_allocation_failure_is_recognised_and_explained():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: the allocator refuses at once
    assert is_out_of_memory(info.value)
    msg = friendly_oom(info.value, batch_size=16)
    assert msg.startswith("out of memory at batch size 16; try train.batch_size=8 with train.grad_accum_steps=2 "
                          "(the same effective batch of 16)")
    assert "can't allocate memory" in msg


@pytest.mark.parametrize("err,oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                  "you tried to allocate 1000 bytes."), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
    (ValueError("out of memory"), False),
])
def test_is_out_of_memory(err, oom):
    assert is_out_of_memory(err) is oom


def test_friendly_oom_keeps_the_effective_batch_and_handles_batch_one():
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    msg = friendly_oom(err, batch_size=6, grad_accum_steps=4)
    assert "try train.batch_size=3 with train.grad_accum_steps=8 (the same effective batch of 24)" in msg
    assert msg.endswith("(OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)")
    odd = friendly_oom(err, batch_size=5)
    assert "train.batch_size=2 with train.grad_accum_steps=2 (the same effective batch of 4 instead of 5)" in odd
    one = friendly_oom(err, batch_size=1)
    assert "batch size is already 1" in one and "gradient_checkpointing" in one


def test_explain_oom_converts_only_out_of_memory():
    with pytest.raises(TrainingOOMError, match="out of memory at batch size 32; try train.batch_size=16") as info:
        with explain_oom(32):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    with pytest.raises(KeyError), explain_oom(32):
        raise KeyError("unrelated")


def test_require_extra():
    assert require_extra("math", "test") is math
    with pytest.raises(ImportError, match=r"CIDEr scores needs the optional package 'pycocoevalcap_not_here'.*"
                                          r"pip install 'vlmalign\[caption\]'"):
        require_extra("pycocoevalcap_not_here", "caption", "CIDEr scores")


def test_trainer_skips_a_nan_step_counts_it_and_aborts_on_a_run_of_them(tiny_cfg):
    """End to end: a NaN loss at one step is skipped (weights unchanged by it) and counted in
    the checkpoint; `train.max_nonfinite_steps` NaN steps in a row stop the run."""
    import json
    from unittest import mock

    from vlmalign.objective import Objective
    from vlmalign.train.trainer import train

    original = Objective.forward
    calls = {"n": 0}

    def poisoned(self, model, batch, replay=None):
        loss, parts = original(self, model, batch, replay)
        calls["n"] += 1
        if calls["n"] in poison:
            loss = loss * float("nan")
        return loss, parts

    poison = {2}
    with mock.patch.object(Objective, "forward", poisoned):
        result = train(tiny_cfg("align", "train.max_steps=4"))
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["nonfinite"]["skipped_total"] == 1 and state["nonfinite"]["skipped_steps"] == [1]
    assert all(torch.isfinite(p).all() for p in result.model.projector.parameters())

    calls["n"], poison = 0, {2, 3, 4}
    with mock.patch.object(Objective, "forward", poisoned), pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(tiny_cfg("align", "train.max_steps=6", "train.max_nonfinite_steps=3"))
