"""Checkpoint contents under engines that shard the model or the optimizer: FSDP2
(`fully_shard`) and DeepSpeed ZeRO. The only module that knows about them; the trainer and
train/checkpoint.py call these functions and never branch on the engine themselves.

| engine | model.safetensors | optimizer.pt |
| --- | --- | --- |
| one process, DDP, MULTI_CPU ("replicated") | `VLM.trainable_state_dict()` on rank 0 | `optimizer.state_dict()` on rank 0 (parameters by number) |
| FSDP2 | `accelerator.get_state_dict` (full tensors gathered on rank 0), trainable keys kept | torch.distributed.checkpoint `get_optimizer_state_dict(full_state_dict=True)`: whole tensors by parameter name, independent of the world size |
| DeepSpeed ZeRO-1/2/3 | `accelerator.get_state_dict` (ZeRO-3: 16-bit weights gathered on rank 0) | a small record (stage, world size); the state itself is DeepSpeed's per-rank files in `deepspeed/` (`engine.save_checkpoint`) |

Every function here is called on every rank: the gathers are collective. Only rank 0
receives the gathered tensors (the others get None), and only rank 0 writes shared files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from vlmalign.models.vlm import VLM

OPTIMIZER_NAME = "optimizer.pt"  # same name as checkpoint.OPTIMIZER_NAME (that module imports this one)
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint tag (sub-folder) inside checkpoint-N/
_DEEPSPEED_FORMAT = "vlmalign-deepspeed-optimizer/1"


class TrainableState(NamedTuple):
    """What model.safetensors and objective.safetensors hold: names as in
    `VLM.trainable_state_dict()` / `Objective.state_dict()`, whole CPU tensors."""

    model: dict[str, Tensor]
    objective: dict[str, Tensor]


class ShardedCheckpointError(ValueError):
    """A checkpoint written by one engine / world size that this run cannot resume."""


def engine(accelerator: Accelerator) -> str:
    """'fsdp', 'deepspeed', or 'replicated' (one process, DDP, MULTI_CPU: every rank holds
    the whole model and optimizer, rank 0 saves them as they are)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ShardedCheckpointError(
                "vlmalign saves FSDP checkpoints with FSDP2 only (torch fully_shard); set fsdp_version: 2 "
                "in your accelerate config (configs/accelerate/fsdp.yaml does) or pass --fsdp_version 2"
            )
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "replicated"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether checkpoints need every rank (FSDP2, DeepSpeed); otherwise rank 0 saves alone."""
    return engine(accelerator) != "replicated"


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's `AcceleratedOptimizer` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _zero_config(accelerator: Accelerator) -> dict[str, Any]:
    """The "zero_optimization" section of the DeepSpeed config in use (Accelerate sets
    `accelerator.deepspeed_config` in `prepare`; before that it lives on the plugin)."""
    config = getattr(accelerator, "deepspeed_config", None) or accelerator.state.deepspeed_plugin.deepspeed_config
    return config.get("zero_optimization", {})


def _zero_stage(accelerator: Accelerator) -> int:
    return int(_zero_config(accelerator).get("stage", 0))


def gather_trainable_state(
    accelerator: Accelerator, module: nn.Module, model: VLM, objective: nn.Module
) -> TrainableState | None:
    """Whole trainable weights for saving. Call on EVERY rank (collective under FSDP2 /
    ZeRO-3); returns them on the main process, None on the others.

    `module` is what `accelerator.prepare` returned for the trainer's `TrainStep` (its
    parameter names start with `model.` / `objective.`). Replicated engines: the model's
    own `trainable_state_dict()` (no communication). Sharded ones:
    `accelerator.get_state_dict(module)` gathers full tensors on rank 0, which keeps the
    keys `VLM.trainable_state_dict` keeps, so model.safetensors has the same layout for
    every engine."""
    kind = engine(accelerator)
    if kind == "replicated":
        if not accelerator.is_main_process:
            return None
        return TrainableState(
            model.trainable_state_dict(),
            {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()},
        )
    if kind == "deepspeed" and _zero_stage(accelerator) == 3:
        if not _zero_config(accelerator).get("stage3_gather_16bit_weights_on_model_save", False):
            raise ShardedCheckpointError(
                "DeepSpeed ZeRO-3 cannot gather the weights for model.safetensors: set "
                '"stage3_gather_16bit_weights_on_model_save": true under "zero_optimization" in your '
                "DeepSpeed JSON (configs/deepspeed/zero3.json has it)"
            )
    # The names to keep, taken from the model's own rule (shard-local tensors, so cheap).
    keep = list(model.trainable_state_dict())
    objective_keys = list(objective.state_dict())
    full = accelerator.get_state_dict(module)  # collective; {} or None off rank 0
    if not accelerator.is_main_process:
        return None
    full = full or {}
    wanted = {f"model.{k}": k for k in keep} | {f"objective.{k}": k for k in objective_keys}
    missing = sorted(set(wanted) - set(full))
    if missing:
        raise ShardedCheckpointError(
            f"the gathered state dict of the prepared module lacks {missing[:5]} (it has e.g. "
            f"{sorted(full)[:3]}): pass the module accelerator.prepare returned for TrainStep(model, objective)"
        )
    weights: dict[str, Tensor] = {}
    objective_weights: dict[str, Tensor] = {}
    for name, short in wanted.items():
        tensor = full[name].detach().cpu().contiguous()
        (weights if name.startswith("model.") else objective_weights)[short] = tensor
    return TrainableState(weights, objective_weights)


def optimizer_state_for_save(
    accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """What optimizer.pt holds. Call on EVERY rank; returns it on the main process, None
    elsewhere.

    - replicated: `optimizer.state_dict()` (state by parameter number), as always;
    - FSDP2: `get_optimizer_state_dict(module, optimizer, StateDictOptions(full_state_dict=True,
      cpu_offload=True))`, whole tensors keyed by parameter name (`model.projector.mlp.0.weight`),
      gathered on rank 0: resumable with any number of processes;
    - DeepSpeed: a record {format, zero_stage, world_size, folder}; the state itself is
      written per rank by `save_engine_state`."""
    kind = engine(accelerator)
    if kind == "replicated":
        return optimizer.state_dict() if accelerator.is_main_process else None
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(module, _inner(optimizer), options=options)  # collective
        return state if accelerator.is_main_process else None
    record = {"format": _DEEPSPEED_FORMAT, "zero_stage": _zero_stage(accelerator),
              "world_size": accelerator.num_processes, "folder": DEEPSPEED_DIR}
    return record if accelerator.is_main_process else None


def save_engine_state(accelerator: Accelerator, module: nn.Module, directory: str | Path) -> None:
    """Files the engine writes itself, on every rank, into `directory` (which must exist and
    be on a filesystem all ranks share): DeepSpeed's `engine.save_checkpoint` (ZeRO
    partitions of the fp32 weights and Adam state, one file per rank, frozen parameters
    left out) into `directory/deepspeed/`. Nothing for the other engines."""
    if engine(accelerator) != "deepspeed":
        return
    module.save_checkpoint(str(directory), tag=DEEPSPEED_DIR, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)


def _by_name(state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict names its parameters (FSDP2 full state) rather than
    numbering them (`optimizer.state_dict()`)."""
    groups = state.get("param_groups") or [{"params": []}]
    params = [p for g in groups for p in g.get("params", [])]
    return bool(params) and all(isinstance(p, str) for p in params)


def load_optimizer_state(
    accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path
) -> None:
    """Load `directory/optimizer.pt` (and, for DeepSpeed, its per-rank files) into the
    prepared `optimizer`. Call on EVERY rank, after `accelerator.prepare`.

    - numbered state (written by a replicated run): `optimizer.load_state_dict`, as always;
      under FSDP2 this is refused (resume with the engine that wrote it);
    - named full state (written under FSDP2): `set_optimizer_state_dict(full_state_dict=True)`,
      each rank keeping its own shard; works for any number of processes, and also
      without FSDP (one process, DDP);
    - DeepSpeed: `engine.load_checkpoint` of `directory/deepspeed`, only with the ZeRO
      stage and the number of processes that wrote it.
    Files are read with `torch.load(weights_only=True)`: tensors and plain data only."""
    directory = Path(directory)
    path = directory / OPTIMIZER_NAME
    kind = engine(accelerator)
    if kind == "replicated":
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:  # memory-mapped: tensors are read as they are distributed, not all into RAM at once
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    written_by_deepspeed = state.get("format") == _DEEPSPEED_FORMAT
    if kind == "deepspeed":
        _load_deepspeed(accelerator, module, directory, state, written_by_deepspeed)
        return
    if written_by_deepspeed:
        raise ShardedCheckpointError(
            f"{path} points to DeepSpeed ZeRO-{state['zero_stage']} state saved by {state['world_size']} processes "
            f"(in {directory / state['folder']}); resume it under DeepSpeed with the same config and "
            f"--num_processes {state['world_size']}, or start a new run from its weights with "
            f"train.init_from={directory}"
        )
    if _by_name(state):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(module, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
        return
    if kind == "fsdp":
        raise ShardedCheckpointError(
            f"{path} numbers its parameters (written by a run without FSDP), which an FSDP2 run cannot map to "
            f"its shards; resume it with the engine that wrote it, or start a new run from its weights with "
            f"train.init_from={directory}"
        )
    optimizer.load_state_dict(state)


def _load_deepspeed(accelerator: Accelerator, module: nn.Module, directory: Path, state: dict, ours: bool) -> None:
    if not ours:
        raise ShardedCheckpointError(
            f"{directory / OPTIMIZER_NAME} was not written under DeepSpeed; a DeepSpeed run resumes only its own "
            f"checkpoints. Resume with the engine that wrote it, or start from its weights with "
            f"train.init_from={directory}"
        )
    stage, world = _zero_stage(accelerator), accelerator.num_processes
    if (state["zero_stage"], state["world_size"]) != (stage, world):
        raise ShardedCheckpointError(
            f"{directory} holds DeepSpeed ZeRO-{state['zero_stage']} state partitioned over {state['world_size']} "
            f"processes, this run is ZeRO-{stage} on {world}: DeepSpeed reloads its partitions only as they were "
            f"written. Relaunch with --num_processes {state['world_size']} and the same DeepSpeed JSON, or start "
            f"a new run from its weights with train.init_from={directory}"
        )
    load_path, _ = module.load_checkpoint(
        str(directory), tag=state["folder"], load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise ShardedCheckpointError(f"DeepSpeed found no checkpoint in {directory / state['folder']}; is the folder complete?")
