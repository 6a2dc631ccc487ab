"""Where the project's own files live (recipe configs)."""

from __future__ import annotations

from pathlib import Path

from vlmalign.train.recipes import RECIPES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def recipe_config(name_or_path: str) -> Path:
    """A recipe id ("align-cg") -> configs/align-cg.yaml; a path is returned as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    recipe = RECIPES.get(name_or_path)
    return CONFIG_DIR / recipe.config
