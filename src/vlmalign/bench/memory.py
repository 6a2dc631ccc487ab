"""Memory of a training step, measured the same way on CPU and CUDA (benchmarks/README.md):

- `peak_alloc_mb`: peak tensor memory of a step, weights, gradients, optimizer state and
  batch included: CUDA's max_memory_allocated over the step; on CPU the bytes of the
  tensors live before a step plus the peak of what the step allocates, from the CPU
  allocator's records (`step_alloc_peak_bytes`). Free of the process's libraries and of
  malloc's caching: the same quantity on both devices.
- `step_mem_mb` / `peak_rss_mb` (CPU): the process's resident set (`MemoryProbe`): the
  kernel's high-water mark (VmHWM) reset before the step (`/proc/self/clear_refs`, after
  `malloc_trim`); where the reset is impossible the figures fall back to `ru_maxrss` and
  the probe's `method` says so.
- `saved_mb`: bytes autograd keeps for backward (`saved_activation_bytes`), weights
  excluded: activation memory free of allocator noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor


class MemoryProbe:
    """Peak memory of a stretch of code (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda" if device.type == "cuda" else "vmhwm-reset"

    @staticmethod
    def _status(key: str) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return float("nan")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "process-maxrss"
        self.base = self._status("VmRSS")

    def stop(self) -> tuple[float, float]:
        """(peak in MB, peak above the start in MB)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            return peak, peak - self.base
        if self.method == "process-maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            peak = self._status("VmHWM")
        return peak, peak - self.base


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors of an optimizer's state (AdamW: step, exp_avg, exp_avg_sq per parameter)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared weights once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints start/stop lines
    (and a GPU-count error on CPU-only machines) that would interleave with the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_alloc_peak_bytes(step) -> int:
    """Peak bytes of CPU tensor memory `step()` allocates above what was allocated before
    it, from the allocation records of torch's CPU allocator (`torch.profiler` with
    `profile_memory`): what CUDA's max_memory_allocated adds during a step, free of the
    process's libraries and of malloc's caching, which the resident set includes."""
    from torch._C._profiler import _EventType

    with _stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as prof:
        step()
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocs.append((event.start_time_ns, event.extra_fields))
    if not allocs:
        return 0
    allocs.sort(key=lambda a: a[0])
    first = allocs[0][1]
    base = first.total_allocated - first.alloc_size  # the allocator's running total before the step
    return max(0, max(a.total_allocated for _, a in allocs) - base)


def saved_activation_bytes(loss_fn, exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `loss_fn()` builds
    its graph: the activation memory of a step, free of allocator effects. Storages of
    `exclude` (the weights, which layers keep for their input gradient) are not counted.
    Backward then runs once to free the graph: the caller zeroes the gradients."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    if loss.requires_grad:
        loss.backward()  # frees the graph (dropping it unused left ~0.5 GB a call resident)
    return sum(storages.values())
