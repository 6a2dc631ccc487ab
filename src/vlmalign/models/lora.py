"""LoRA adapters on the LLM through `peft` (Hu et al. 2021; VladVA uses r=16, alpha=16 on
all linear layers).

`add_lora(llm, cfg)` wraps a causal LM in a `peft` model whose base weights are frozen and
whose adapters train; `merge_lora(llm)` folds the adapters into the base weights and
returns the plain transformers model (what `vlmalign export --merge-lora` writes).
"""

from __future__ import annotations

import logging

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from vlmalign.config import LoraConfig

log = logging.getLogger(__name__)


def _targets(cfg: LoraConfig) -> str | list[str]:
    """peft's `target_modules`: the string "all-linear" (every linear layer but the output
    head) or a list of module names."""
    names = list(cfg.target_modules)
    if not names:
        raise ValueError("lora.target_modules is empty; use [all-linear] or module names such as [q_proj, v_proj]")
    return "all-linear" if names == ["all-linear"] else names


def add_lora(llm: nn.Module, cfg: LoraConfig) -> PeftModel:
    """Wrap `llm` with LoRA adapters (base weights frozen, adapters trainable)."""
    config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(cfg),
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(llm, config)
    except ValueError as e:  # peft names the modules it could not find
        raise ValueError(f"lora.target_modules={list(cfg.target_modules)}: {e}") from None
    n = sum(p.numel() for n_, p in wrapped.named_parameters() if "lora_" in n_)
    log.info("LoRA r=%d alpha=%d on %s: %.2fM adapter parameters", cfg.r, cfg.alpha, _targets(cfg), n / 1e6)
    return wrapped


def is_lora(llm: nn.Module) -> bool:
    return isinstance(llm, PeftModel)


def lora_parameters(llm: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of a LoRA-wrapped LLM (empty for a plain one)."""
    return [p for n, p in llm.named_parameters() if "lora_" in n]


def merge_lora(llm: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the plain transformers model."""
    if not is_lora(llm):
        return llm
    return llm.merge_and_unload()
