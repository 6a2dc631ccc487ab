"""Guards for long runs: skip steps with a non-finite loss or gradient, stop on a signal.

`NonFiniteGuard.should_skip` is called after backward and clipping, before
`optimizer.step()` (train/step.py `optimizer_step`):

    parts = accumulate_gradients(...)                     # backward
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    if not guard.should_skip(loss, params, step, batch_ids, grad_norm=grad_norm):
        optimizer.step()                                  # a poisoned step changes nothing
    optimizer.zero_grad(set_to_none=True)

Clipping a non-finite gradient leaves it non-finite (its norm is NaN/inf), so checking
the clip's total norm is the check of every gradient, without a second pass over them.

`StopSignal` turns SIGTERM / SIGINT into a flag the loop polls between steps, so the run
can save a checkpoint of the step it is on and exit cleanly (a cluster's pre-emption
notice, Ctrl-C); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Too many steps in a row had a non-finite loss or gradient."""

    def __init__(self, message: str, step: int, batch_ids: list | None) -> None:
        super().__init__(message)
        self.step = step
        self.batch_ids = batch_ids


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync for all)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients hold NaN/inf, counts them, and aborts
    after `max_in_a_row` consecutive ones (`train.max_nonfinite_steps`).

    One poisoned batch (an fp16 overflow, a degenerate sample) then costs one step, not
    the run, while a diverged run stops with the step and the batch ids to inspect
    instead of training on NaN weights for hours. With several processes, gradients are
    identical on every rank after the all-reduce, so every rank takes the same decision
    (a NaN loss on one rank makes every rank's gradients NaN).
    """

    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row} (train.max_nonfinite_steps)")
        self.max_in_a_row = max_in_a_row
        self.skipped_total = 0
        self.in_a_row = 0
        self.skipped_steps: list[int] = []  # the last few, for the log and the metrics

    def should_skip(
        self,
        loss: Tensor,
        params: Iterable[Tensor],
        step: int,
        batch_ids: list | None = None,
        grad_norm: Tensor | float | None = None,
    ) -> bool:
        """True when this step must be skipped: `loss` or a gradient of `params` is not
        finite. Call it after backward and clipping, before `optimizer.step()`.

        `params`: the trained parameters (their `.grad`; None grads are ignored).
        `grad_norm`: a total gradient norm already computed (e.g. returned by clipping);
        when given it is checked instead of scanning every gradient. `batch_ids` name the
        samples of the batch in the log and in the error. Raises `NonFiniteError` on the
        `max_in_a_row`-th consecutive skip.
        """
        loss_ok = bool(torch.isfinite(loss.detach()).all())
        if grad_norm is not None:
            grads_ok = bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        else:
            grads_ok = _all_finite([p.grad.detach() for p in params if p.grad is not None])
        if loss_ok and grads_ok:
            self.in_a_row = 0
            return False
        self.skipped_total += 1
        self.in_a_row += 1
        self.skipped_steps = (self.skipped_steps + [step])[-10:]
        what = f"loss {float(loss.detach().float().mean()):g}" if not loss_ok else "gradient"
        ids = f"; batch ids {batch_ids}" if batch_ids is not None else ""
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"non-finite {what} at step {step}{ids}: {self.in_a_row} steps in a row had a non-finite loss "
                f"or gradient ({self.skipped_total} skipped in all), so the run is stopped. Lower train.lr, "
                "raise train.warmup_steps, use train.mixed_precision=bf16 or no instead of fp16, check the "
                "samples named above, or raise train.max_nonfinite_steps.",
                step=step, batch_ids=batch_ids,
            )
        log.warning("step %d skipped: non-finite %s%s (%d in a row, %d in all)",
                    step, what, ids, self.in_a_row, self.skipped_total)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The counters, plain numbers (for the trainer state and the metrics JSON)."""
        return {"skipped_total": self.skipped_total, "in_a_row": self.in_a_row, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a resumed run keeps counting)."""
        self.skipped_total = int(state.get("skipped_total", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
        self.skipped_steps = list(state.get("skipped_steps", []))


class StopSignal:
    """Context manager: SIGTERM and SIGINT set `.requested` (and `.signum`) instead of
    killing the process, so the loop can finish its step, save and exit. A second SIGINT
    raises KeyboardInterrupt as usual (Ctrl-C twice stops at once); a second SIGTERM is
    ignored (the scheduler's SIGKILL follows its grace period). The previous handlers are
    restored on exit. Outside the main thread (where Python cannot install handlers) it
    installs nothing and `.requested` stays False.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            log.warning("received %s: stopping after this step (a checkpoint will be saved)", signal.Signals(signum).name)
        self.requested = True
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            log.warning("StopSignal outside the main thread: SIGTERM/SIGINT are not intercepted")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
