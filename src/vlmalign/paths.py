"""Where the project's own files live (recipe configs). Imports nothing heavy: finding a
YAML by name must not load torch, transformers or the models."""

from __future__ import annotations

import difflib
from pathlib import Path

from vlmalign.models.registry import UnknownIdError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def recipe_names() -> list[str]:
    """The recipe ids that have a config: configs/<name>.yaml."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def recipe_config(name_or_path: str) -> Path:
    """A recipe id ("align-cg") -> configs/align-cg.yaml; a path is returned as is.
    An unknown id raises UnknownIdError naming the known ones (and the closest)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    found = CONFIG_DIR / f"{name_or_path}.yaml"
    if found.exists():
        return found
    known = recipe_names()
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownIdError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(known)}.{hint} "
                     "(or pass the path of a YAML config)")
