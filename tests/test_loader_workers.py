"""data.num_workers reaches the training loader: decoding in 2 worker processes trains
exactly as decoding in the main process (same batches in the same order)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from vlmalign.train.trainer import train


def test_workers_decode_the_same_batches_as_the_main_process(tiny_cfg, tmp_path):
    common = ["train.max_steps=2", "train.eval_at_end=false", "train.cache_vision_features=false",
              "train.warmup_steps=0"]
    runs = {}
    for workers in (0, 2):
        cfg = tiny_cfg("align", *common, f"data.num_workers={workers}", f"train.out_dir={tmp_path / str(workers)}")
        torch.manual_seed(0)
        result = train(cfg)
        assert result.history  # trained
        runs[workers] = load_file(str(result.checkpoint / "model.safetensors"))
    assert runs[0].keys() == runs[2].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]), k
