"""docs/recipes.md's "Adding a loss" and "Adding a recipe" are the project's own code:
each Python block of the loss section appears word for word in the file it names, the
loss it adds reaches the training loss through its weight, and the recipe entry of the
recipe section builds a Recipe. The docs cannot drift from the code unnoticed."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from vlmalign import losses
from vlmalign.objective import TERMS, Objective
from vlmalign.train.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "recipes.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:] if end < 0 else DOC[start:end]


def test_every_block_of_adding_a_loss_is_in_the_file_it_names():
    blocks = re.findall(r"```python\n(.*?)\n```", _section("Adding a loss"), flags=re.S)
    files = ["src/vlmalign/losses.py", "src/vlmalign/config.py", "src/vlmalign/objective.py"]
    assert len(blocks) == len(files)
    for block, name in zip(blocks, files, strict=True):
        assert block in (ROOT / name).read_text(), f"docs/recipes.md's block for {name} is not in {name}"


def test_the_documented_loss_reaches_the_training_loss_through_its_weight(tiny_cfg, tiny_model):
    name = re.search(r'"(\w+)": Term\("(\w+)"', _section("Adding a loss"))
    part, weight_key = name.group(1), name.group(2)
    assert part in TERMS and TERMS[part].weight == weight_key
    base = tiny_cfg("align-cg")
    with_loss = tiny_cfg("align-cg", f"objective.{weight_key}=0.5")
    model = tiny_model
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    batch = {"features": torch.randn(2, 16, 32, generator=g), "caption_ids": ids,
             "caption_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "captions": ["a", "b"]}
    off = Objective(base.objective)
    on = Objective(with_loss.objective)
    for o in (off, on):
        o.cfg.ntp_weight = 0.0  # the contrastive terms alone
    total_off, parts_off = off(model, batch)
    total_on, parts_on = on(model, batch)
    assert part not in parts_off and part in parts_on
    fn = getattr(losses, part.removesuffix("_loss") + "_loss")
    reps = on.representations(model, batch)
    expected = fn(reps["patch_v"], reps["patch_e"], with_loss.objective.patch_tau, with_loss.objective.siglip_init_bias)
    assert float(parts_on[part]) == pytest.approx(float(expected[part]), rel=1e-6)
    assert float(total_on) == pytest.approx(float(total_off) + 0.5 * float(parts_on[part]), rel=1e-6)


def test_the_documented_recipe_entry_builds_a_recipe():
    block = re.search(r"```python\n(.*?)\n\s*```", _section("Adding a recipe"), flags=re.S).group(1)
    made = []
    exec(textwrap.dedent(block).strip(), {"_add": made.append, "Recipe": Recipe})  # noqa: S102 - the doc's own line
    assert made and isinstance(made[0], Recipe) and made[0].name == "align-siglip"
