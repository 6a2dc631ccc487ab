"""DataLoader settings from data.num_workers / pin_memory / prefetch_factor and the device."""

from __future__ import annotations

import pytest

from vlmalign.config import DataConfig
from vlmalign.data import loading
from vlmalign.data.loading import CUDA_WORKERS, auto_workers, loader_kwargs


def test_cpu_defaults_decode_in_the_main_process():
    assert loader_kwargs(DataConfig(), "cpu") == {"num_workers": 0, "pin_memory": False}


def test_cuda_defaults_follow_the_measured_worker_count(monkeypatch):
    monkeypatch.setattr(loading.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_kwargs(DataConfig(), "cuda") == {
        "num_workers": CUDA_WORKERS, "pin_memory": True, "prefetch_factor": 4,
    }
    # 8 GPU processes on a 64-core node: 8 cores each, one of them the process's own
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_kwargs(DataConfig(), "cuda:0")["num_workers"] == 7


def test_auto_workers_capped_by_cores():
    assert auto_workers(cuda=False, cpu_count=128) == 0
    assert auto_workers(cuda=True, cpu_count=128, processes=1) == CUDA_WORKERS
    assert auto_workers(cuda=True, cpu_count=4, processes=1) == 3
    assert auto_workers(cuda=True, cpu_count=8, processes=8) == 0  # one core per process


def test_explicit_settings_win_and_cached_features_get_no_workers():
    cfg = DataConfig(num_workers=3, pin_memory=False, prefetch_factor=2)
    assert loader_kwargs(cfg, "cuda") == {"num_workers": 3, "pin_memory": False, "prefetch_factor": 2}
    assert loader_kwargs(cfg, "cpu")["num_workers"] == 3
    assert loader_kwargs(cfg, "cuda", decodes_images=False) == {"num_workers": 0, "pin_memory": False}
    assert loader_kwargs(DataConfig(), "cuda", decodes_images=False) == {"num_workers": 0, "pin_memory": True}


@pytest.mark.parametrize("field,value", [("num_workers", -2), ("prefetch_factor", 0)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        loader_kwargs(DataConfig(**{field: value}), "cpu")


def test_the_config_parser_reads_the_fields():
    from vlmalign.config import load_config
    from vlmalign.paths import recipe_config

    cfg = load_config(recipe_config("align"), ["data.num_workers=5", "data.pin_memory=false", "data.prefetch_factor=8"])
    assert (cfg.data.num_workers, cfg.data.pin_memory, cfg.data.prefetch_factor) == (5, False, 8)


def test_the_arguments_build_a_working_loader():
    import torch
    from torch.utils.data import DataLoader

    kwargs = loader_kwargs(DataConfig(num_workers=1, prefetch_factor=3), "cpu")
    batches = list(DataLoader(list(range(10)), batch_size=4, **kwargs))
    assert torch.cat(batches).tolist() == list(range(10))
