"""The model card every export writes: the evaluation table from whichever metrics.json
the checkpoint has, and a reproducing command made of the values that differ from the
recipe's YAML."""

from __future__ import annotations

import json

from vlmalign.config import load_config
from vlmalign.eval.report import write_metrics
from vlmalign.model_card import reproduce_overrides, write_model_card
from vlmalign.paths import recipe_config


def _card(tmp_path, ckpt, cfg) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return write_model_card(out, cfg, ckpt, export_format="llava", export_command="vlmalign export X").read_text()


def test_card_reads_the_evaluation_inside_or_beside_the_checkpoint(tmp_path):
    cfg = load_config(recipe_config("align-clip"), ["train.lr=5e-4"])
    ckpt = tmp_path / "run" / "checkpoint-90"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 90}))
    assert "No evaluation was recorded." in _card(tmp_path, ckpt, cfg)

    write_metrics(tmp_path / "run" / "eval-checkpoint-90" / "metrics.json", {"emb_i2t_R@1": 41.25})
    assert "| emb_i2t_R@1 | 41.25 |" in _card(tmp_path, ckpt, cfg)  # vlmalign eval's default folder
    write_metrics(ckpt / "metrics.json", {"emb_i2t_R@1": 37.5, "eval_pairs": 64})
    card = _card(tmp_path, ckpt, cfg)
    assert "| emb_i2t_R@1 | 37.5 |" in card and "| eval_pairs | 64 |" in card  # the run's own wins
    assert "Steps: 90 of" in card and "vlmalign export X" in card


def test_reproducing_command_lists_only_what_differs_from_the_recipe():
    cfg = load_config(recipe_config("align-clip"), ["train.lr=5e-4", "train.out_dir=/somewhere",
                                                    "embedding.image_prompt=<image> in one word:"])
    overrides = reproduce_overrides(cfg)
    assert "train.lr=0.0005" in overrides
    assert 'embedding.image_prompt="<image> in one word:"' in overrides
    assert not any(o.startswith(("train.out_dir", "recipe=", "objective.contrastive")) for o in overrides)
    assert reproduce_overrides(load_config(recipe_config("align-clip"))) == []
