"""Verifiable checkpoints and safe loading: the manifest is checked on load and by
`find_latest`, a full disk leaves the previous checkpoint intact, nothing is unpickled
but tensors, and no code shipped with a model runs without `llm.trust_remote_code`."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from vlmalign.errors import DiskFullError
from vlmalign.objective import Objective
from vlmalign.train import checkpoint
from vlmalign.train.checkpoint import (
    MANIFEST_NAME,
    OPTIMIZER_NAME,
    STATE_NAME,
    CheckpointError,
    TrainingState,
    find_latest,
    load_training_state,
    load_weights,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmalign"


@pytest.fixture()
def parts(tiny_model):
    """(model, objective, optimizer, scheduler) with one optimizer step taken, so the
    optimizer state holds tensors."""
    model = tiny_model
    objective = Objective(model.cfg.objective)
    params = list(model.projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    return model, objective, optimizer, scheduler


def _save(parts, out: Path, step: int) -> Path:
    return save_checkpoint(out, TrainingState(step=step), *parts)


def test_manifest_lists_every_file_with_size_and_sha256(parts, tmp_path):
    path = _save(parts, tmp_path, 3)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == files and OPTIMIZER_NAME in files
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    model, objective, optimizer, scheduler = parts
    load_weights(path, model, objective)
    assert load_training_state(path, optimizer, scheduler).step == 3
    # files written after the save (the evaluation's metrics.json) are not the manifest's business
    (path / "metrics.json").write_text("{}")
    checkpoint._verified.clear()
    verify_checkpoint(path)


def _flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,name,message", [
    ("flip", "model.safetensors", "does not match the sha256"),
    ("truncate", OPTIMIZER_NAME, "bytes but manifest.json says"),
    ("delete", "rng_state.safetensors", "is missing"),
    ("no-manifest", MANIFEST_NAME, "has no manifest.json"),
    ("bad-manifest", MANIFEST_NAME, "manifest.json is unreadable"),
])
def test_loading_names_the_file_that_does_not_match(parts, tmp_path, damage, name, message):
    path = _save(parts, tmp_path, 2)
    target = path / name
    if damage == "flip":
        _flip_byte(target, len(target.read_bytes()) // 2)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage in ("delete", "no-manifest"):
        target.unlink()
    else:
        target.write_text('{"format": "vlmalign-checkpoint-manifest/1", "files": {"model.safe')
    model, objective, optimizer, scheduler = parts
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(path, model, objective)
    assert str(target if damage != "no-manifest" else path) in str(info.value)
    assert "train.resume" in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        load_training_state(path, optimizer, scheduler)
    assert find_latest(tmp_path) is None


def test_verification_is_redone_when_a_file_changes(parts, tmp_path):
    path = _save(parts, tmp_path, 2)
    verify_checkpoint(path)  # remembered as good
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(path)


def test_find_latest_passes_over_checkpoints_cut_off_or_corrupt(parts, tmp_path, caplog):
    good = _save(parts, tmp_path, 4)
    for step in (5, 6, 7):
        shutil.copytree(good, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-5" / MANIFEST_NAME).unlink()  # a copy cut off before the manifest
    _flip_byte(tmp_path / "checkpoint-6" / OPTIMIZER_NAME)  # bit rot in the newest but one
    (tmp_path / "checkpoint-7" / STATE_NAME).write_text("{}")  # rewritten after the save
    shutil.copytree(good, tmp_path / "checkpoint-9.tmp")  # a save in progress
    assert find_latest(tmp_path) == good
    assert "checkpoint-7" in caplog.text and "checkpoint-6" in caplog.text
    assert resolve_resume("latest", tmp_path) == good
    with pytest.raises(CheckpointError, match="optimizer.pt does not match"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_keeps_the_previous_checkpoint(parts, tmp_path, monkeypatch, code):
    previous = _save(parts, tmp_path, 1)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def full(*args, **kwargs):
        raise OSError(code, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        _save(parts, tmp_path, 2)
    message = str(info.value)
    assert (f"disk full while saving checkpoint-2 to {tmp_path}; the previous checkpoint checkpoint-1 is intact; "
            "free space or set train.out_dir") in message
    assert info.value.errno == code and isinstance(info.value, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # the .tmp is gone
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert find_latest(tmp_path) == previous
    # a full disk while replacing a checkpoint of the same step leaves the old one
    with pytest.raises(DiskFullError, match="the previous checkpoint checkpoint-1 is intact"):
        _save(parts, tmp_path, 1)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


def test_disk_full_with_no_earlier_checkpoint_and_other_errors(parts, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(DiskFullError, match="no earlier checkpoint exists there"):
        _save(parts, tmp_path / "run", 1)

    def broken(*args, **kwargs):
        raise RuntimeError("serialiser bug")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(RuntimeError, match="serialiser bug"):  # not disguised as a full disk
        _save(parts, tmp_path / "run", 1)
    assert list((tmp_path / "run").iterdir()) == []


# ---------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this runs `Path.touch(marker)`: what a hostile optimizer.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_in_a_checkpoint_is_refused(parts, tmp_path):
    path = _save(parts, tmp_path, 1)
    marker = tmp_path / "pwned"
    with open(path / OPTIMIZER_NAME, "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "x": _Payload(marker)}, f, protocol=2)
    write_manifest(path)  # the attacker rewrites the manifest too: it must still not run
    _, _, optimizer, scheduler = parts
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_training_state(path, optimizer, scheduler)
    assert not marker.exists()


def test_every_torch_load_in_src_is_weights_only_and_no_remote_code_is_hard_coded():
    loads, trusts = [], []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
                    loads.append((file.name, kw.get("weights_only")))
                if kw.get("trust_remote_code") == "True":
                    trusts.append(file.name)
    assert loads and all(w == "True" for _, w in loads), loads
    assert trusts == []


def _remote_code_llm(folder: Path, model_type: str, marker: Path) -> Path:
    """A local LLM folder whose config asks for Python code shipped with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmalign.models.language import tiny_tokenizer

    config = LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    return folder


@pytest.mark.parametrize("model_type", ["evil-llm", "llama"])
def test_code_shipped_with_an_llm_never_runs_without_the_flag(tmp_path, model_type):
    from vlmalign.config import LLMConfig
    from vlmalign.models.language import load_llm

    marker = tmp_path / "ran"
    folder = _remote_code_llm(tmp_path / "llm", model_type, marker)
    if model_type == "llama":  # transformers has its own class: that one is used
        model, _ = load_llm(LLMConfig(name=str(folder)))
        assert type(model).__module__.startswith("transformers.")
    else:
        with pytest.raises(ValueError, match="llm.trust_remote_code=true"):
            load_llm(LLMConfig(name=str(folder)))
    assert not marker.exists()


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_objective_loads_a_zero_dim_temperature_from_an_older_checkpoint(contrastive):
    from vlmalign.config import ObjectiveConfig

    objective = Objective(ObjectiveConfig(contrastive=contrastive))
    assert objective.log_logit_scale.shape == (1,)  # FSDP2 shards no 0-dim parameter
    old = {k: v.detach().reshape(()) + 0.25 for k, v in objective.state_dict().items()}
    objective.load_state_dict(old)
    for k, v in objective.state_dict().items():
        assert v.shape == (1,) and v.item() == pytest.approx(old[k].item())
    assert objective.logit_scale().dim() == 0
