"""Bench modes: each is the recipe's config with some optimisation switches flipped. The
switches are ordinary config values that training reads; the bench never computes a step
any other way.

- "optimised": the config as given (the training defaults unless overridden);
- "naive": every switch off: the tower runs every step, the LM head on every position,
  separate LLM passes for the image embedding and the next-token loss, no cached
  prompt-prefix keys/values, no text-state cache, no length grouping, plain MLPs;
- "no-<switch>" (a switch on by default, off alone) and "<switch>" (off by default, on
  alone: `compile`): the ablations, one optimisation each.
"""

from __future__ import annotations

from vlmalign.config import Config, flat_config

# Bench name -> the config value that switches it (True = on).
SWITCHES: dict[str, str] = {
    "feature_cache": "train.cache_vision_features",  # cached frozen tower features
    "head_at_labels": "objective.head_at_labels",  # LM head only at label positions
    "shared_pass": "objective.shared_pass",  # one LLM pass for the image state and the NTP loss
    "prefix_kv": "llm.prefix_kv",  # cached keys/values of the constant prompt prefix
    "text_cache": "train.cache_text_embeddings",  # cached prompted text states (frozen text path)
    "group_by_length": "train.group_by_length",  # length-grouped batches
    "lean_mlp": "llm.lean_mlp",  # gated MLPs keep gate and up only (models/memory.py)
    "compile": "train.compile",  # torch.compile of the decoder layers (off by default)
}
# Switches that change the batches (collation), not the step.
DATA_SWITCHES = ("feature_cache", "text_cache", "group_by_length")


def switch_values(cfg: Config) -> dict[str, bool]:
    """{switch: on} of a config."""
    flat = flat_config(cfg)
    return {name: bool(flat[key]) for name, key in SWITCHES.items()}


def ablations(cfg: Config | None = None) -> list[str]:
    """Single-switch modes relative to `cfg` (default: the training defaults):
    "no-<name>" for a switch that is on, "<name>" for one that is off."""
    values = switch_values(cfg or Config())
    return [f"no-{name}" if on else name for name, on in values.items()]


def mode_overrides(mode: str, cfg: Config | None = None) -> list[str]:
    """Config overrides of `mode` ("optimised", "naive", or one of `ablations(cfg)`)."""
    if mode == "optimised":
        return []
    if mode == "naive":
        return [f"{key}=false" for key in SWITCHES.values()]
    known = ablations(cfg)
    if mode not in known:
        raise ValueError(f"unknown bench mode {mode!r}; modes: optimised, naive, {', '.join(known)}")
    name = mode.removeprefix("no-")
    return [f"{SWITCHES[name]}={'false' if mode.startswith('no-') else 'true'}"]
