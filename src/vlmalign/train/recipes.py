"""Recipes: which parts a stage trains. A recipe is one YAML under configs/ named after it
(`configs/<name>.yaml`: its losses and hyper-parameters) plus one entry here (what it
unfreezes); the trainer never changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmalign.models.registry import Registry

if TYPE_CHECKING:
    from vlmalign.models.vlm import VLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    # Model parts trained: "projector", "llm" (and "vision" whenever vision.frozen=false).
    trains: tuple[str, ...]
    # Training data: "captions" (image-caption pairs), "conversations" (LLaVA
    # instruction data) or "short_long" (short and long captions, VladVA).
    data: str = "captions"
    # Parts of `trains` the config may leave frozen (e.g. discriminative without LoRA:
    # projector and soft prompts only, as in VladVA's ablations).
    optional: tuple[str, ...] = ()
    # What the end-of-training evaluation measures: "retrieval" (retrieval,
    # compositionality, held-out NTP, modality gap) and/or "mcq" (multiple choice).
    evals: tuple[str, ...] = ("retrieval",)


RECIPES: Registry[Recipe] = Registry("recipe")


def _add(recipe: Recipe) -> None:
    RECIPES.register(recipe.name)(recipe)


_add(Recipe("align", "LLaVA stage 1 (Liu et al. 2023)", ("projector",)))
_add(Recipe("align-cg", "CG-VLM (Liu et al. 2023, arXiv 2311.17945)", ("projector",)))
_add(Recipe("align-clip", "Ak et al. (ECCV Workshops 2024)", ("projector",)))
_add(Recipe("instruct", "LLaVA stage 2 (Liu et al. 2023) / CG-VLM", ("projector", "llm"),
            data="conversations", evals=("mcq",)))
_add(Recipe("discriminative", "VladVA (Ouali et al. 2025)", ("projector", "llm"),
            data="short_long", optional=("llm",)))


def apply_recipe(model: VLM, recipe: Recipe) -> list[str]:
    """Freeze everything, then unfreeze the parts the recipe trains; log and return them."""
    cfg = model.cfg
    if "llm" in recipe.trains and "llm" not in recipe.optional and cfg.llm.frozen and not cfg.lora.enabled:
        raise ValueError(
            f"recipe {recipe.name} trains the LLM, but llm.frozen=true and lora.enabled=false: "
            "set llm.frozen=false (full fine-tuning) or lora.enabled=true (LoRA adapters)"
        )
    model.requires_grad_(False)
    llm_off = cfg.llm.frozen and not cfg.lora.enabled
    if "llm" in recipe.optional and llm_off:
        log.info("recipe %s: llm.frozen=true and lora.enabled=false, the LLM stays frozen", recipe.name)
    trains = [p for p in recipe.trains
              if not (p == "projector" and cfg.projector.frozen) and not (p == "llm" and llm_off and p in recipe.optional)]
    if not cfg.vision.frozen:  # any recipe fine-tunes the tower when asked to
        trains.append("vision")
    for part in trains:
        model.unfreeze(part)
    if model.image_soft is not None or model.text_soft is not None:
        model.unfreeze("soft_prompts")  # enabled by embedding.soft_prompts: they train
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("recipe %s trains %s (%.2fM parameters); everything else frozen", recipe.name, ", ".join(trains), n / 1e6)
    return trains
