"""`vlmalign config show`: provenance of every resolved value."""

from pathlib import Path

import yaml

from vlmalign.config import Config, config_from_dict, flat_config, load_config, show_config


def _comment_of(text: str, key_line: str) -> str:
    """The provenance comment on the line that starts with `key_line` (indent included)."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith(key_line)]
    return line.rsplit("# ", 1)[1]


def test_provenance_labels_file_override_and_default(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("recipe: align-cg\ntrain:\n  lr: 0.002\n  max_steps: 50\n")
    prov: dict[str, str] = {}
    cfg = load_config(tmp_path / "my.yaml", ["train.max_steps=7"], provenance=prov)
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.002
    assert prov["train.lr"] == "file:my.yaml"
    assert prov["recipe"] == "file:my.yaml"
    assert prov["train.max_steps"] == "override"  # the file set it too; the override wins
    assert prov["train.batch_size"] == "default"
    assert set(prov) == set(flat_config(Config()))  # every leaf labelled, nothing else

    text = show_config(tmp_path / "my.yaml", ["train.max_steps=7"])
    assert _comment_of(text, "  lr: 0.002") == "file:my.yaml"
    assert _comment_of(text, "  max_steps: 7") == "override"
    assert _comment_of(text, "  batch_size: 16") == "default"


def test_provenance_is_optional_and_left_untouched_without_it():
    cfg = load_config(None, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4


def test_show_config_text_is_a_loadable_config(tmp_path: Path):
    """Comments aside, the printed text is YAML that loads back to the same config, prompts
    with newlines and lists included."""
    recipe_yaml = Path(__file__).resolve().parents[1] / "configs" / "align-cg.yaml"
    text = show_config(recipe_yaml, ["train.lr=5e-4", "lora.target_modules=q_proj,v_proj"])
    data = yaml.safe_load(text)
    again = config_from_dict(data)
    expected = load_config(recipe_yaml, ["train.lr=5e-4", "lora.target_modules=q_proj,v_proj"])
    assert again == expected
    assert again.embedding.image_prompt.count("\n") == 1
    assert "# file:" in text and "configs/align-cg.yaml" in text
