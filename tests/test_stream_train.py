"""Training from webdataset shards: the trainer streams them, and a run stopped and resumed
mid-epoch ends with the same weights as an uninterrupted one."""

import pytest
import torch

from vlmalign.data.shards import shard_command
from vlmalign.train.trainer import train


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shard_command(shapes_root, out, shard_size=20)
    return out


def _projector(result):
    return {k: v.clone() for k, v in result.model.projector.state_dict().items()}


def test_streamed_training_lowers_the_loss(tiny_cfg, shards):
    cfg = tiny_cfg("align-clip", f"data.shards={shards}", "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=1",
                   "train.log_every=4")
    result = train(cfg)
    assert result.history[-1]["clip_loss"] < result.history[0]["clip_loss"]
    assert (result.checkpoint / "model.safetensors").exists()


def test_stream_resume_matches_an_uninterrupted_run(tiny_cfg, shards, tmp_path):
    common = [f"data.shards={shards}", "train.warmup_steps=1", "train.log_every=1", "train.batch_size=4"]
    full = _projector(train(tiny_cfg("align", *common, "train.max_steps=6", f"train.out_dir={tmp_path / 'full'}")))
    train(tiny_cfg("align", *common, "train.max_steps=6", "train.save_every=3", f"train.out_dir={tmp_path / 'cut'}"))
    import shutil

    for name in ("checkpoint-6", "latest"):  # keep only the step-3 checkpoint: as if stopped there
        target = tmp_path / "cut" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = _projector(train(tiny_cfg("align", *common, "train.max_steps=6", "train.resume=latest",
                                        f"train.out_dir={tmp_path / 'cut'}")))
    for k, v in full.items():
        assert torch.equal(resumed[k], v), k


def test_streaming_rejects_shards_of_another_kind(tiny_cfg, shards):
    with pytest.raises(ValueError, match="holds captions"):
        train(tiny_cfg("instruct", f"data.shards={shards}", "train.max_steps=1"))
