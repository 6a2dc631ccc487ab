"""Failures of the environment, explained: out of memory, disk full, a missing extra.

Each helper turns a low-level error into a message that says what to change: the batch
size to try after an out-of-memory error, the checkpoint that is still intact after a
full disk, the `pip install` line for a missing optional dependency.
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

# Substrings of the messages torch and its allocators raise when memory runs out.
_OOM_MESSAGES = (
    "out of memory",  # CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory"), XPU
    "not enough memory",  # CPU: "DefaultCPUAllocator: not enough memory: you tried to allocate"
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory"
    "cannot allocate memory",  # ENOMEM from the OS
    "failed to allocate",
)
# errno values that mean the disk (or the user's quota) is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class TrainingOOMError(RuntimeError):
    """Training ran out of memory; the message names the settings to try."""


class DiskFullError(OSError):
    """The disk filled up while writing; the message says what is still intact."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error: `torch.cuda.OutOfMemoryError` (and
    `torch.OutOfMemoryError`), `MemoryError`, or a `RuntimeError` whose message is a CPU /
    CUDA / MPS allocator's out-of-memory message."""
    oom_types: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
    if hasattr(torch, "OutOfMemoryError"):
        oom_types += (torch.OutOfMemoryError,)
    if isinstance(err, oom_types):
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(m in text for m in _OOM_MESSAGES)
    return False


def friendly_oom(err: BaseException, batch_size: int, grad_accum_steps: int = 1) -> str:
    """A message for an out-of-memory error at `batch_size` (per device) that names the
    settings to try: half the batch with twice the accumulation (the same effective
    batch, so the same optimisation), then the other memory savers. The first line of
    torch's own message is kept at the end (how much it tried to allocate)."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    effective = batch_size * grad_accum_steps
    savers = ("llm.gradient_checkpointing=true (when the LLM trains), train.mixed_precision=bf16 "
              "(on GPUs that support it), a shorter data.max_caption_tokens / "
              "data.max_conversation_tokens, or a smaller vision.image_size")
    if batch_size > 1:
        half = batch_size // 2
        accum = grad_accum_steps * 2
        advice = (
            f"try train.batch_size={half} with train.grad_accum_steps={accum} (the same effective batch "
            f"of {half * accum}{'' if half * accum == effective else f' instead of {effective}'}), or "
            + savers
        )
    else:
        advice = f"the batch size is already 1; try {savers}, or a smaller model"
    return f"out of memory at batch size {batch_size}; {advice}. ({type(err).__name__}: {first_line})"


@contextmanager
def explain_oom(batch_size: int, grad_accum_steps: int = 1) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as `TrainingOOMError` carrying
    `friendly_oom`'s message (the original stays as `__cause__`); other errors pass."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise TrainingOOMError(friendly_oom(err, batch_size, grad_accum_steps)) from err


def require_extra(module: str, extra: str, feature: str = "") -> ModuleType:
    """Import and return the optional dependency `module`; when it is missing raise an
    ImportError that names the extra to install: `pip install 'vlmalign[extra]'`.
    `feature` says what needs it (e.g. "CIDEr scores")."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what = f"{feature} needs" if feature else "this feature needs"
        raise ImportError(
            f"{what} the optional package {module!r}, which is not installed ({err}); install it "
            f"with: pip install 'vlmalign[{extra}]'"
        ) from err


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` is an OSError for a full disk or an exceeded quota (ENOSPC, EDQUOT)."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS
