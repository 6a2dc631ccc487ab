"""Checkpoints under sharding engines (train/sharded.py): FSDP2 for real on 2 CPU ranks
(gloo), DeepSpeed only through its guards (DeepSpeed is not installed here).

Accelerate turns an FSDP config into plain MULTI_CPU when there is no CUDA, so each rank
builds a real `Accelerator` (gloo) and switches its state to FSDP2 by hand; from there on
Accelerate's own FSDP2 code runs (`prepare` -> `fully_shard`, `get_state_dict`).

- Trainer runs: `train()` of `instruct` with the whole LLM trainable on 2 ranks, the FSDP2
  plugin built from configs/accelerate/fsdp.yaml (one unit per decoder layer), stopped at
  step 2 and resumed in fresh processes.
- Hand-made runs: the tiny VLM put through torch's `fully_shard` directly and trained with
  the CLIP objective, whose learnable temperature is saved too, and resumed with everything
  built anew in the same processes; its optimizer.pt is also continued in one process
  without FSDP.

Not covered: GPUs / NCCL, bf16 mixed precision, multi-node (see docs/scale.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from vlmalign.config import load_config
from vlmalign.data.collate import CaptionCollator, CaptionDataset
from vlmalign.data.formats import load_captions_jsonl
from vlmalign.models.vlm import VLM, WEIGHTS_NAME
from vlmalign.objective import Objective
from vlmalign.paths import recipe_config
from vlmalign.train import checkpoint, sharded
from vlmalign.train.checkpoint import OBJECTIVE_NAME, OPTIMIZER_NAME, TrainingState
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.sharded import ShardedCheckpointError

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK = 4
STEPS = 4
STOP_AT = 2  # the interrupted run saves here; the resumed run continues from it
RECIPE = "align-clip"  # NTP + CLIP: the objective has a learnable temperature to save too
LR = 3e-3
ONE_PROCESS_TOL = 1e-4  # 2 ranks vs 1 process: float summation order differs (see test_launch)


# ----------------------------------------------------------------------- shared set-up
def _config(root: str | Path):
    return load_config(recipe_config(RECIPE), [*TINY, f"data.root={root}"])


def _model_and_objective(root: str | Path, mean_states: torch.Tensor, gather: bool) -> tuple[VLM, Objective]:
    """The tiny VLM, same seed everywhere, with the LLM trainable (the case FSDP is for)."""
    torch.manual_seed(0)
    cfg = _config(root)
    model = VLM.build(cfg)
    apply_recipe(model, RECIPES.get(RECIPE))
    model.unfreeze("llm")
    model.set_embedding_mean(mean_states)
    model.train()
    model.llm.eval()  # no dropout
    model.vision.eval()
    objective = Objective(cfg.objective, gather=gather)
    assert objective.log_logit_scale.shape == (1,)  # fully_shard refuses 0-dim parameters
    return model, objective


def _optimizer(module: torch.nn.Module):
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, 1, STEPS + 2)  # lr still > 0 at STEPS


def _make_payload(root: Path) -> dict:
    """Per step: each rank's batch of PER_RANK samples and the global batch of both."""
    torch.manual_seed(0)
    model = VLM.build(_config(root))
    samples = load_captions_jsonl(root / "train.jsonl")[: STEPS * WORLD * PER_RANK]
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(len(samples), model.vision.num_patches, model.vision.hidden_size, generator=gen)  # [N, P, Dv]
    with torch.no_grad():
        mean_states = model.text_states([s.caption for s in samples])  # [N, D]
    dataset = CaptionDataset(samples, features)  # no cached text states: the LLM trains
    collate = CaptionCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, model.cfg.data.max_caption_tokens)
    items = [dataset[i] for i in range(len(dataset))]
    per_step = WORLD * PER_RANK
    ranks, whole = [], []
    for s in range(STEPS):
        step_items = items[s * per_step : (s + 1) * per_step]
        ranks.append([collate(step_items[r * PER_RANK : (r + 1) * PER_RANK]) for r in range(WORLD)])
        whole.append(collate(step_items))
    return {"root": str(root), "mean_states": mean_states, "ranks": ranks, "global": whole}


def _step(module, optimizer, scheduler, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = module(batch)
    loss.backward()
    optimizer.step()
    scheduler.step()


# ----------------------------------------------------------------------- the ranks
def _fsdp_plugin_from_our_yaml():
    """The FSDP plugin `accelerate launch --config_file configs/accelerate/fsdp.yaml` builds."""
    from unittest import mock

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
                                               "--num_processes", str(WORLD), "train.py"])
    args, _, _ = _validate_launch_command(args)
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        return FullyShardedDataParallelPlugin()


def _switch_to_fsdp2(accelerator, plugin) -> None:
    """Make a CPU (MULTI_CPU, gloo) Accelerator behave as an FSDP2 one. Both shared states
    change: AcceleratorState copies PartialState's fields whenever it is constructed."""
    from accelerate.state import PartialState

    assert accelerator.distributed_type == DistributedType.MULTI_CPU  # what Accelerate picks on CPU
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2


def _fsdp2_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    _switch_to_fsdp2(accelerator, FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT"))
    return accelerator


def _rank_env(rank: int, world: int, port: int) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")


def _train_rank(rank: int, world: int, port: int, overrides: list[str], report: str) -> None:
    """One rank of `vlmalign.train.trainer.train` under Accelerate's FSDP2 (see module doc)."""
    _rank_env(rank, world, port)
    from accelerate import Accelerator

    import vlmalign.train.trainer as trainer

    plugin = _fsdp_plugin_from_our_yaml()

    class FSDP2OnCPU(Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            _switch_to_fsdp2(self, plugin)

    trainer.Accelerator = FSDP2OnCPU
    try:
        result = trainer.train(load_config(recipe_config("instruct"), overrides))
        q_proj = result.model.llm.model.layers[0].self_attn.q_proj.weight
        torch.save({"param_type": type(q_proj).__name__, "local_shape": tuple(q_proj.to_local().shape),
                    "history": result.history}, f"{report}-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _hand_made_run(accelerator, payload: dict, rank: int, out: str, save_at: tuple[int, ...], resume: str = "") -> dict:
    """Build the model anew (from `resume` if given), shard it with `fully_shard`, train to
    STEPS saving at `save_at`; returns what the tests check."""
    from torch.distributed.fsdp import fully_shard

    from vlmalign.train.trainer import TrainStep

    model, objective = _model_and_objective(payload["root"], payload["mean_states"], gather=True)
    if resume:
        checkpoint.load_weights(resume, model, objective)  # whole tensors, before sharding
    module = TrainStep(model, objective)
    for layer in model.llm.model.layers:
        fully_shard(layer)
    fully_shard(module)
    optimizer, scheduler = _optimizer(module)
    state = TrainingState()
    if resume:
        state = checkpoint.load_training_state(resume, optimizer, scheduler, accelerator=accelerator, module=module)
    q_proj = model.llm.model.layers[0].self_attn.q_proj.weight
    report = {"param_type": type(q_proj).__name__, "local_shape": tuple(q_proj.to_local().shape), "start_step": state.step}
    while state.step < STEPS:
        _step(module, optimizer, scheduler, payload["ranks"][state.step][rank])
        state.step += 1
        if state.step in save_at:
            checkpoint.save_checkpoint_sharded(accelerator, out, state, module, model, objective, optimizer, scheduler)
    report["lr"] = scheduler.get_last_lr()[0]
    return report


def _rank_main(rank: int, world: int, port: int, payload_path: str, work: str) -> None:
    """One rank of the hand-made FSDP2 runs: uninterrupted (saving at STOP_AT and STEPS),
    then resumed from its STOP_AT checkpoint with a model, optimizer and scheduler built
    anew (the trainer test resumes in fresh processes); reports to work/rank{r}.pt."""
    _rank_env(rank, world, port)
    accelerator = _fsdp2_accelerator()
    try:
        payload = torch.load(payload_path, weights_only=False)
        full = _hand_made_run(accelerator, payload, rank, f"{work}/full", (STOP_AT, STEPS))
        resumed = _hand_made_run(accelerator, payload, rank, f"{work}/resumed", (STEPS,),
                                 resume=f"{work}/full/checkpoint-{STOP_AT}")
        torch.save({"full": full, "resumed": resumed}, f"{work}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model and objective weights, as float64 (the centring flag is bool)."""
    weights = load_file(str(path / WEIGHTS_NAME))
    weights |= {f"objective.{k}": v for k, v in load_file(str(path / OBJECTIVE_NAME)).items()}
    return {k: v.double() for k, v in weights.items()}


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def payload(shapes_root, tmp_path_factory) -> tuple[dict, Path]:
    data = _make_payload(shapes_root)
    path = tmp_path_factory.mktemp("sharded") / "payload.pt"
    torch.save(data, path)
    return data, path


@pytest.fixture(scope="module")
def fsdp_runs(payload, tmp_path_factory) -> dict:
    """The hand-made FSDP2 runs on 2 ranks: uninterrupted, and resumed from STOP_AT."""
    _, path = payload
    work = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_rank_main, args=(WORLD, _free_port(), str(path), str(work)), nprocs=WORLD, join=True)
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"full": [r["full"] for r in ranks], "resumed": [r["resumed"] for r in ranks],
            "stopped": work / "full" / f"checkpoint-{STOP_AT}", "full_final": work / "full" / f"checkpoint-{STEPS}",
            "resumed_final": work / "resumed" / f"checkpoint-{STEPS}"}


@pytest.fixture(scope="module")
def trainer_runs(shapes_root, tmp_path_factory) -> dict:
    """`train()` under FSDP2 on 2 ranks: STEPS steps saving every STOP_AT, then a resume
    from checkpoint-STOP_AT in fresh processes into another folder."""
    work = tmp_path_factory.mktemp("fsdp-trainer")
    base = [*TINY, f"data.root={shapes_root}", "llm.frozen=false", "lora.enabled=false", f"train.max_steps={STEPS}",
            f"train.save_every={STOP_AT}", "train.warmup_steps=1", "train.lr=1e-3", "train.log_every=1",
            "train.eval_at_end=false"]
    full = base + [f"train.out_dir={work / 'full'}"]
    stopped = work / "full" / f"checkpoint-{STOP_AT}"
    resumed = base + [f"train.out_dir={work / 'resumed'}", f"train.resume={stopped}"]
    reports = {}
    for name, overrides in (("full", full), ("resumed", resumed)):
        mp.spawn(_train_rank, args=(WORLD, _free_port(), overrides, str(work / name)), nprocs=WORLD, join=True)
        reports[name] = [torch.load(f"{work / name}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"reports": reports, "stopped": stopped, "full": work / "full" / f"checkpoint-{STEPS}",
            "resumed": work / "resumed" / f"checkpoint-{STEPS}"}


# ----------------------------------------------------------------------- FSDP2 tests
def test_trainer_under_fsdp2_saves_whole_llm_weights_and_resumes_exactly(trainer_runs, tiny_cfg):
    for rank in trainer_runs["reports"]["full"]:  # Accelerate's prepare really sharded the LLM
        assert rank["param_type"] == "DTensor" and rank["local_shape"] == (32, 64)
    model = VLM.build(tiny_cfg("instruct", "llm.frozen=false", "lora.enabled=false"))
    apply_recipe(model, RECIPES.get("instruct"))
    want_shapes = {k: v.shape for k, v in model.trainable_state_dict().items()}
    assert "llm.model.layers.0.self_attn.q_proj.weight" in want_shapes
    for path in (trainer_runs["stopped"], trainer_runs["full"], trainer_runs["resumed"]):
        checkpoint.verify_checkpoint(path)
        saved = load_file(str(path / WEIGHTS_NAME))
        assert {k: v.shape for k, v in saved.items()} == want_shapes, path
        state = json.loads((path / checkpoint.STATE_NAME).read_text())
        assert state["batches_done"] == WORLD * state["step"]  # both ranks took part
    full = load_file(str(trainer_runs["full"] / WEIGHTS_NAME))
    resumed = load_file(str(trainer_runs["resumed"] / WEIGHTS_NAME))
    at_stop = load_file(str(trainer_runs["stopped"] / WEIGHTS_NAME))
    moved = max(float((full[k].double() - at_stop[k].double()).abs().max()) for k in full)
    assert moved > 1e-3, moved  # the steps after the checkpoint change the weights
    for name in full:  # bit for bit (same ops, same gloo reductions on CPU)
        assert torch.equal(resumed[name], full[name]), (name, float((resumed[name].double() - full[name].double()).abs().max()))
    # The resumed run's logged losses of steps STOP_AT+1.. are the uninterrupted run's.
    losses = [[e["loss"] for e in run[0]["history"]] for run in (trainer_runs["reports"]["full"], trainer_runs["reports"]["resumed"])]
    assert losses[1] == losses[0]


def test_fsdp2_really_shards_and_saves_whole_tensors(fsdp_runs, payload):
    data, _ = payload
    for rank in fsdp_runs["full"]:  # q_proj [64, 64] split over 2 ranks on dim 0
        assert rank["param_type"] == "DTensor" and rank["local_shape"] == (32, 64)
    model, objective = _model_and_objective(data["root"], data["mean_states"], gather=False)
    want = model.trainable_state_dict()
    assert any(k.startswith("llm.model.layers.") for k in want)  # the LLM is among the trained weights
    for path in (fsdp_runs["stopped"], fsdp_runs["full_final"]):
        checkpoint.verify_checkpoint(path)  # manifest written last and matching
        assert not path.with_name(path.name + ".tmp").exists()
        saved = load_file(str(path / WEIGHTS_NAME))
        assert saved.keys() == want.keys()  # the same layout as a one-process checkpoint
        for name, tensor in want.items():
            assert saved[name].shape == tensor.shape and saved[name].dtype == tensor.dtype, name
        assert load_file(str(path / OBJECTIVE_NAME)).keys() == objective.state_dict().keys()
    optim = torch.load(fsdp_runs["stopped"] / OPTIMIZER_NAME, weights_only=True)
    trainable = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    trainable |= {f"objective.{n}": p for n, p in objective.named_parameters() if p.requires_grad}
    assert optim["param_groups"][0]["params"] == list(trainable)  # named, in the optimizer's order
    for name, p in trainable.items():  # whole Adam moments, not one rank's shard
        assert optim["state"][name]["exp_avg"].shape == p.shape, name
        assert float(optim["state"][name]["step"]) == STOP_AT


def test_fsdp2_resume_matches_the_uninterrupted_run(fsdp_runs):
    assert [r["start_step"] for r in fsdp_runs["resumed"]] == [STOP_AT] * WORLD
    assert fsdp_runs["resumed"][0]["lr"] == fsdp_runs["full"][0]["lr"] > 0  # the scheduler came back too
    want, got = _weights(fsdp_runs["full_final"]), _weights(fsdp_runs["resumed_final"])
    at_stop = _weights(fsdp_runs["stopped"])
    assert got.keys() == want.keys()
    moved = max(float((want[k] - at_stop[k]).abs().max()) for k in want)
    assert moved > 1e-3  # the steps after the checkpoint change the weights: equality means something
    for name in want:  # bit for bit (same ops, same gloo reductions on CPU)
        assert torch.equal(got[name], want[name]), (name, float((got[name] - want[name]).abs().max()))
    state = json.loads((fsdp_runs["resumed_final"] / checkpoint.STATE_NAME).read_text())
    assert state["step"] == STEPS


def _one_process_from(stopped: Path, data: dict, restore_optimizer: bool) -> dict[str, torch.Tensor]:
    """Continue an FSDP2 checkpoint in this one process (no FSDP, global batches)."""
    from vlmalign.train.trainer import TrainStep

    model, objective = _model_and_objective(data["root"], data["mean_states"], gather=False)
    checkpoint.load_weights(stopped, model, objective)
    module = TrainStep(model, objective)
    optimizer, scheduler = _optimizer(module)
    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, is_fsdp2=False, is_main_process=True, num_processes=1)
    if restore_optimizer:
        state = checkpoint.load_training_state(stopped, optimizer, scheduler, accelerator=accelerator, module=module)
    else:
        state = TrainingState(step=STOP_AT)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(STOP_AT):
                scheduler.step()
    for s in range(state.step, STEPS):
        _step(module, optimizer, scheduler, data["global"][s])
    weights = model.trainable_state_dict() | {f"objective.{k}": v for k, v in objective.state_dict().items()}
    return {k: v.detach().double() for k, v in weights.items()}


def test_fsdp2_optimizer_state_resumes_with_another_world_size(fsdp_runs, payload):
    """optimizer.pt written by 2 FSDP2 ranks continues in one plain process (same global
    batches) to the 2-rank result; dropping the Adam moments would not."""
    data, _ = payload
    want = _weights(fsdp_runs["full_final"])
    got = _one_process_from(fsdp_runs["stopped"], data, restore_optimizer=True)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff < ONE_PROCESS_TOL, diff
    fresh = _one_process_from(fsdp_runs["stopped"], data, restore_optimizer=False)
    assert max(float((fresh[k] - want[k]).abs().max()) for k in want) > 10 * ONE_PROCESS_TOL


# ----------------------------------------------------------------------- guards (no spawn)
def _fake_accelerator(kind: DistributedType, *, fsdp2: bool = False, stage: int = 2, world: int = 2, gather16: bool = True):
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather16}
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, is_main_process=True, num_processes=world,
                           deepspeed_config={"zero_optimization": zero}, wait_for_everyone=lambda: None)


def test_engine_names_and_fsdp1_is_refused():
    assert sharded.engine(_fake_accelerator(DistributedType.MULTI_CPU)) == "replicated"
    assert sharded.engine(_fake_accelerator(DistributedType.MULTI_GPU)) == "replicated"
    assert sharded.engine(_fake_accelerator(DistributedType.FSDP, fsdp2=True)) == "fsdp"
    assert sharded.is_sharded(_fake_accelerator(DistributedType.DEEPSPEED))
    with pytest.raises(ShardedCheckpointError, match="fsdp_version: 2"):
        sharded.engine(_fake_accelerator(DistributedType.FSDP, fsdp2=False))


def test_zero3_without_16bit_gather_names_the_json_key(tiny_model):
    objective = Objective(tiny_model.cfg.objective)
    acc = _fake_accelerator(DistributedType.DEEPSPEED, stage=3, gather16=False)
    with pytest.raises(ShardedCheckpointError, match="stage3_gather_16bit_weights_on_model_save"):
        sharded.gather_trainable_state(acc, torch.nn.Module(), tiny_model, objective)


def _write_optimizer(directory: Path, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / OPTIMIZER_NAME)
    return directory


def test_deepspeed_checkpoints_resume_only_under_deepspeed_with_their_world_size(tmp_path):
    ds = _fake_accelerator(DistributedType.DEEPSPEED, stage=2, world=2)
    record = sharded.optimizer_state_for_save(ds, torch.nn.Module(), None)
    assert record["world_size"] == 2 and record["zero_stage"] == 2
    folder = _write_optimizer(tmp_path / "ds", record)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ShardedCheckpointError, match="--num_processes 2"):  # DDP / no DeepSpeed installed
        sharded.load_optimizer_state(_fake_accelerator(DistributedType.MULTI_CPU), torch.nn.Module(), opt, folder)
    with pytest.raises(ShardedCheckpointError, match="partitioned over 2 processes, this run is ZeRO-2 on 4"):
        sharded.load_optimizer_state(_fake_accelerator(DistributedType.DEEPSPEED, world=4), torch.nn.Module(), opt, folder)
    with pytest.raises(ShardedCheckpointError, match="ZeRO-3 on 2"):
        sharded.load_optimizer_state(_fake_accelerator(DistributedType.DEEPSPEED, stage=3), torch.nn.Module(), opt, folder)
    numbered = _write_optimizer(tmp_path / "ddp", opt.state_dict())
    with pytest.raises(ShardedCheckpointError, match="not written under DeepSpeed"):
        sharded.load_optimizer_state(ds, torch.nn.Module(), opt, numbered)


def test_numbered_optimizer_state_loads_as_before_but_not_under_fsdp2(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    folder = _write_optimizer(tmp_path, opt.state_dict())
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    sharded.load_optimizer_state(_fake_accelerator(DistributedType.MULTI_CPU), torch.nn.Module(), fresh, folder)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ShardedCheckpointError, match="train.init_from"):
        sharded.load_optimizer_state(_fake_accelerator(DistributedType.FSDP, fsdp2=True), torch.nn.Module(), fresh, folder)


class _FakeDeepSpeedEngine(torch.nn.Module):
    """Records the calls vlmalign makes to a DeepSpeed engine and writes a stand-in file
    where `engine.save_checkpoint` writes its per-rank partitions."""

    def __init__(self, step_module: torch.nn.Module) -> None:
        super().__init__()
        self.module = step_module
        self.calls: list[tuple[str, dict]] = []

    def save_checkpoint(self, save_dir, tag=None, **kwargs):
        self.calls.append(("save", {"save_dir": save_dir, "tag": tag, **kwargs}))
        (Path(save_dir) / tag).mkdir()
        torch.save({"partition": torch.arange(4)}, Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        self.calls.append(("load", {"load_dir": load_dir, "tag": tag, **kwargs}))
        return str(Path(load_dir) / tag), {}


def test_deepspeed_save_puts_the_engine_files_under_the_manifest_and_reloads_them(tiny_model, tmp_path):
    """The wiring around DeepSpeed's engine (which is not installed): its files land in the
    atomic folder and the manifest, frozen weights are left out of them, and resume hands
    the same folder back to `engine.load_checkpoint` with the optimizer state."""
    from vlmalign.train.trainer import TrainStep

    objective = Objective(tiny_model.cfg.objective)
    engine = _FakeDeepSpeedEngine(TrainStep(tiny_model, objective))
    acc = _fake_accelerator(DistributedType.DEEPSPEED, stage=2, world=2)
    acc.get_state_dict = lambda module: module.module.state_dict()  # ZeRO-1/2: the module's own weights
    optimizer = torch.optim.AdamW(tiny_model.projector.parameters(), lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    path = checkpoint.save_checkpoint_sharded(acc, tmp_path, TrainingState(step=3), engine, tiny_model, objective,
                                              optimizer, scheduler)
    assert path == tmp_path / "checkpoint-3" and not (tmp_path / "checkpoint-3.tmp").exists()
    (kind, args), = engine.calls
    assert kind == "save" and args["tag"] == sharded.DEEPSPEED_DIR and args["exclude_frozen_parameters"] is True
    manifest = json.loads((path / checkpoint.MANIFEST_NAME).read_text())
    assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in manifest["files"]
    saved = load_file(str(path / WEIGHTS_NAME))
    assert saved.keys() == tiny_model.trainable_state_dict().keys()  # the frozen backbones are not in it
    state = checkpoint.load_training_state(path, optimizer, scheduler, accelerator=acc, module=engine)
    assert state.step == 3
    kind, args = engine.calls[-1]
    assert kind == "load" and args["load_dir"] == str(path) and args["tag"] == sharded.DEEPSPEED_DIR
    assert args["load_optimizer_states"] is True and args["load_module_strict"] is False
    (path / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"bit rot")
    with pytest.raises(checkpoint.CheckpointError, match="zero_pp_rank_0"):
        checkpoint.verify_checkpoint(path)
