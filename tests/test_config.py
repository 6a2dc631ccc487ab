from pathlib import Path

import pytest

from vlmalign.config import Config, ConfigError, load_config, parse_overrides, replace
from vlmalign.paths import CONFIG_DIR, recipe_config


def test_recipe_yaml_and_overrides_resolve():
    cfg = load_config(recipe_config("align-cg"), ["train.lr=5e-4", "train.max_steps=7", "vision.frozen=false"])
    assert cfg.recipe == "align-cg"
    assert cfg.objective.patch_weight == 1.0
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.vision.frozen is False


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_bools_parse_from_strings(text, value):
    assert load_config(None, [f"vision.frozen={text}"]).vision.frozen is value


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.learning_rate=1e-3"])
    assert "train.learning_rate" in str(e.value) and "lr" in str(e.value)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="vision.frozen"):
        load_config(None, ["vision.frozen=maybe"])


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("recipe: align\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.lrr"):
        load_config(p)


def test_saved_config_round_trips(tmp_path: Path):
    cfg = replace(Config(), ["train.lr=0.003", "embedding.centre=false", "objective.contrastive=clip"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_every_recipe_has_a_config_named_after_it_and_every_config_a_recipe():
    from vlmalign.paths import recipe_names
    from vlmalign.train.recipes import RECIPES

    for name in RECIPES.names():
        assert (CONFIG_DIR / f"{name}.yaml").exists()
        assert load_config(recipe_config(name)).recipe == name
    assert recipe_names() == RECIPES.names()


def test_unknown_recipe_names_the_known_ones_without_loading_torch():
    import subprocess
    import sys

    code = ("import sys; from vlmalign.paths import recipe_config\n"
            "try:\n    recipe_config('algn')\nexcept KeyError as e:\n    print(e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "align-clip" in out and "Did you mean 'align'" in out
    assert out.strip().endswith("False")  # finding a YAML by name imports no torch


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.lr"])
