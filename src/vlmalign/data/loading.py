"""DataLoader settings that follow from the device: workers, pinned memory, prefetch.

`DataConfig.num_workers` / `pin_memory` / `prefetch_factor` are what the user asks for;
`loader_kwargs` turns them into `torch.utils.data.DataLoader` keyword arguments for the
machine at hand:

- workers (`num_workers=-1`, automatic): 0 on a machine without CUDA, where the cores that
  would decode images are the ones that run the step; on CUDA `CUDA_WORKERS` per GPU
  process, at most the CPU cores per process minus one (the process's own). Batches that
  are slices of cached tower features decode nothing and get no workers (0), whatever
  the setting: a worker would only copy them through shared memory.
- pinned memory: on CUDA only (page-locked batches copy to the GPU asynchronously).
- prefetch: batches each worker prepares ahead, with workers only.

Where `CUDA_WORKERS` comes from: one H100 running `align` with a frozen CLIP ViT-L/14-336
tower and the default pooled projector is bound by the tower's forward (382 GFLOP per
image; SmolLM2-135M adds 15 GFLOP per sample): ~1,000 images/s at 40 % MFU of 989 bf16
TFLOPS. One worker decodes a COCO-size JPEG (640 x 480), resizes it to 336 px and
normalises it in 6.5 ms of CPU time, ~155 images/s on a core of its own
(benchmarks/data_pipeline.py). 7 workers feed that rate; 8 leave ~25 % headroom and fit
the 12-16 cores per GPU of a typical 8-GPU node. Map-style data for a frozen tower is
served from the feature cache and decodes nothing per step (docs/scale.md, "Feeding a GPU").
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vlmalign.config import DataConfig

# Workers per GPU process on CUDA when data.num_workers is -1 (see the module docstring).
CUDA_WORKERS = 8


def local_processes() -> int:
    """Processes sharing this machine (the launcher's LOCAL_WORLD_SIZE; 1 without one)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def auto_workers(cuda: bool, cpu_count: int | None = None, processes: int | None = None) -> int:
    """Workers per process for `num_workers=-1`: 0 without CUDA, else `CUDA_WORKERS`
    capped at the cores per process minus one."""
    if not cuda:
        return 0
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    per_process = cpus // (processes if processes is not None else local_processes())
    return max(0, min(CUDA_WORKERS, per_process - 1))


def loader_kwargs(data: DataConfig, device: torch.device | str, decodes_images: bool = True) -> dict[str, Any]:
    """`DataLoader` keyword arguments (num_workers, pin_memory, prefetch_factor) for
    `data`'s settings on `device`.

    `decodes_images=False` (batches of cached features) always gives 0 workers. Workers are
    not persistent: a streamed dataset's `set_epoch` in the main process must reach the
    workers' copies, which are made when an epoch's iteration starts.
    """
    if data.num_workers < -1:
        raise ValueError(f"data.num_workers must be -1 (automatic) or >= 0, got {data.num_workers}")
    if data.prefetch_factor < 1:
        raise ValueError(f"data.prefetch_factor must be >= 1, got {data.prefetch_factor}")
    cuda = torch.device(device).type == "cuda"
    workers = auto_workers(cuda) if data.num_workers == -1 else data.num_workers
    if not decodes_images:
        workers = 0
    out: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(data.pin_memory and cuda)}
    if workers > 0:
        out["prefetch_factor"] = data.prefetch_factor
    return out
