"""Shared fixtures: tiny random models (built in code, no download) and a small shapes set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "llm.name=tiny",
    "vision.tower=tiny",
    "projector.pool_size=2",
    "objective.patch_pool=2",
    "train.batch_size=8",
    "train.log_every=2",
]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A 96-sample shapes dataset written once per test session."""
    from vlmalign.data.shapes_writer import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, 96, seed=0)
    return root


@pytest.fixture()
def tiny_cfg(shapes_root, tmp_path):
    """A config with tiny models on the session's shapes data, writing into tmp_path."""
    from vlmalign.config import load_config

    def make(recipe: str = "align", *overrides: str):
        from vlmalign.paths import recipe_config

        return load_config(
            recipe_config(recipe),
            TINY + [f"data.root={shapes_root}", f"train.out_dir={tmp_path / recipe}", *overrides],
        )

    return make


@pytest.fixture()
def tiny_model(tiny_cfg):
    from vlmalign.models.vlm import VLM

    return VLM.build(tiny_cfg("align"))
