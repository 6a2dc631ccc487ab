"""Launching on existing engines: the accelerate / DeepSpeed config files are valid for
Accelerate's own parsers, and `accelerate launch` and `torchrun` run the CLI with 2 CPU
processes (gloo) to a final checkpoint.

No GPU here: FSDP and DeepSpeed are checked as configuration (Accelerate builds its FSDP /
DeepSpeed plugin from the files and resolves the wrap class in our model), not run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import load_file

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configs" / "accelerate"
DEEPSPEED = REPO / "configs" / "deepspeed"
ENGINES = {
    "ddp": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed-zero2": "DEEPSPEED",
    "deepspeed-zero3": "DEEPSPEED",
}
# DeepSpeed keys Accelerate fills from the run. Keys it would derive from
# `model.config.hidden_size` must NOT be "auto": the prepared module (model + objective)
# has no `.config`, so Accelerate would raise.
FILLED_BY_ACCELERATE = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16.enabled", "fp16.enabled"}
STEPS = 2
# A real update from the first step (no warmup: lr would be 0 on step 1) and a large one
# (Adam moves each weight by ~lr = 1e-2 a step), so the launchers' agreement below (1e-3)
# is a tenth of one update, not the size of one.
TRAIN = ("train.warmup_steps=0", "train.lr=1e-2")
TOLERANCE = 1e-3
LAUNCH_TIMEOUT_S = 300  # normally ~25 s each; generous for a loaded shared machine


def _launcher_args(name: str, *extra: str):
    """What `accelerate launch --config_file configs/accelerate/NAME.yaml` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / f"{name}.yaml"), *extra, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def _auto_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in config.items():
        if isinstance(v, dict):
            keys |= _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            keys.add(prefix + k)
    return keys


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_accelerate_config_files_load_with_accelerates_own_classes(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == ENGINES[name]
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    args = _launcher_args(name)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        name == "ddp", name == "fsdp", name.startswith("deepspeed")
    )
    if name.startswith("deepspeed"):
        assert (REPO / args.deepspeed_config_file).is_file()  # relative to the repo root
        assert args.zero3_init_flag is False


def test_fsdp_plugin_wraps_the_llm_decoder_layers_of_our_model(tiny_model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(_launcher_args("fsdp", "--num_processes", "2"))
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    plugin.set_auto_wrap_policy(tiny_model)  # raises when the class is not in the model
    layers = [m for m in tiny_model.modules() if type(m).__name__ in plugin.transformer_cls_names_to_wrap]
    assert len(layers) == tiny_model.llm.config.num_hidden_layers


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_sets_its_stage_and_leaves_only_run_values_to_accelerate(stage):
    from accelerate.utils import DeepSpeedPlugin

    path = DEEPSPEED / f"zero{stage}.json"
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert _auto_keys(config) == FILLED_BY_ACCELERATE
    assert "optimizer" not in config and "scheduler" not in config  # vlmalign builds its own
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
    assert plugin.zero_stage == stage
    assert _launcher_args(f"deepspeed-zero{stage}").deepspeed_config_file == f"configs/deepspeed/zero{stage}.json"


# ---------------------------------------------------------------------------- launches
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _train_args(shapes_root: Path, out_dir: Path) -> list[str]:
    return [
        "-m", "vlmalign.cli", "train", "align", *TINY,
        f"data.root={shapes_root}", f"train.max_steps={STEPS}", f"train.out_dir={out_dir}",
        "train.eval_at_end=false", *TRAIN,
    ]


def _check_two_rank_run(out_dir: Path) -> dict:
    """The run ended with a final checkpoint named by `latest`, made by 2 ranks."""
    final = out_dir / f"checkpoint-{STEPS}"
    assert (out_dir / "latest").read_text().strip() == final.name
    state = json.loads((final / "trainer_state.json").read_text())
    # Each optimizer step consumed one batch per rank: 2 ranks -> 2 batches a step.
    assert state["step"] == STEPS and state["batches_done"] == 2 * STEPS
    return load_file(final / "model.safetensors")


@pytest.fixture(scope="module")
def launched(shapes_root, tmp_path_factory) -> dict[str, Path]:
    """One 2-process run per launcher (module-scoped: ~25 s each on 2 cores)."""
    runs = {}
    out = tmp_path_factory.mktemp("accelerate")
    _run([
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE / "ddp.yaml"), "--num_processes", "2",
        "--main_process_port", str(_free_port()), *_train_args(shapes_root, out),
    ])
    runs["accelerate"] = out
    out = tmp_path_factory.mktemp("torchrun")
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), *_train_args(shapes_root, out),
    ])
    runs["torchrun"] = out
    return runs


def test_accelerate_launch_with_the_ddp_config_trains_two_ranks_to_a_checkpoint(launched):
    weights = _check_two_rank_run(launched["accelerate"])
    assert "projector.mlp.0.weight" in weights


def test_torchrun_trains_two_ranks_and_matches_accelerate_launch(launched):
    by_torchrun = _check_two_rank_run(launched["torchrun"])
    by_accelerate = _check_two_rank_run(launched["accelerate"])
    assert by_torchrun.keys() == by_accelerate.keys()
    for k in by_torchrun:  # same seed, same data, same gloo all-reduce: the same weights
        diff = (by_torchrun[k].double() - by_accelerate[k].double()).abs()
        # The launchers may pick different intra-op thread counts, which changes the float
        # summation order. Adam's first update is ~lr * sign(gradient), so a weight whose
        # gradient is at rounding level may step the other way (a full 2 * lr apart): seen
        # for a handful of elements. Every other weight must agree to a tenth of an update;
        # a different data split or a single rank moves most of them by ~lr instead.
        off = float((diff > TOLERANCE).double().mean())
        assert off < 0.01, (k, off, float(diff.max()))


def test_launched_runs_moved_the_weights_by_far_more_than_the_tolerance(launched, shapes_root):
    """The parity above can fail: the two steps moved most projector weights by over 10x
    the tolerance from their initial values (the same seed builds the same initial model)."""
    from accelerate.utils import set_seed

    from vlmalign.config import load_config
    from vlmalign.models.vlm import VLM
    from vlmalign.paths import recipe_config

    set_seed(0)
    cfg = load_config(recipe_config("align"), [*TINY, f"data.root={shapes_root}"])
    init = {f"projector.{k}": v for k, v in VLM.build(cfg).projector.state_dict().items()}
    final = _check_two_rank_run(launched["accelerate"])
    for k in init:
        moved = float(((final[k] - init[k]).abs() > 10 * TOLERANCE).double().mean())
        assert moved > 0.5, (k, moved)  # most weights moved by over 10x the tolerance


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_accepts_the_json_once_accelerate_fills_the_auto_values(stage):
    """Runs where DeepSpeed is installed (GPU machines); skipped in the CPU venv."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads((DEEPSPEED / f"zero{stage}.json").read_text())
    config |= {
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2, "train_batch_size": 32,
        "gradient_clipping": 1.0, "bf16": {"enabled": True}, "fp16": {"enabled": False},
    }
    parsed = DeepSpeedConfig(config, mpu=None)
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 32
