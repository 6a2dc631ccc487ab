"""FLOPs of a training step, counted analytically per LLM pass (`pass_flops`), from the
linear layers of the decoder (so LoRA adapters count) and the LLM config:

    forward  = 2 * W * n_tok  +  4 * L * d_attn * n_pairs  +  2 * D * V * n_head
    backward = 2 * W_frozen * n_tok + 4 * W_trained * n_tok + 8 * L * d_attn * n_pairs
               + 2 * D * V * n_head (x2 if the LM head trains)

with W the weights in the decoder's matmuls (all layers; frozen or trained), n_tok the
tokens run through the layers, n_pairs the (query, key) pairs attention scores (keys of a
cached prefix included), d_attn = heads * head_dim, n_head the positions the LM head runs
on, D the hidden size, V the vocabulary. Frozen weights on the gradient path cost one
matmul in the backward (activation gradients only), trained ones two (activations and
weights); attention has no weights but two operands, so its backward is twice its forward.
A pass that nothing upstream trains (cached text states' forward) has no backward.
- model FLOPs of a mode: what it executes: padded tokens, the full rectangle of attention
  pairs (the CPU kernels compute the masked entries too), its LM head positions, plus the
  tower (counted with torch's FlopCounterMode on one image, when it runs) and the projector
  (counted forward + backward with FlopCounterMode).
- useful FLOPs (the minimal step): the optimised passes on real (unpadded) tokens only,
  causal attention pairs, the LM head on label positions, no pass over a constant (a
  cached prefix, frozen text states, a frozen tower) and no backward where nothing trains.
- MFU = FLOPs / (step time * peak), peak = best fp32 matmul rate measured in the same run
  (`matmul_peak_gflops`: 2048^2 x 2048^2 matmuls, best of a few). Contrastive-loss matmuls
  ([B, D] x [D, B]) and elementwise work are not counted (under 0.1% here).

"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vlmalign.models.prompts import IGNORE_INDEX

if TYPE_CHECKING:
    from vlmalign.models.vlm import VLM
    from vlmalign.objective import Objective


@dataclass
class Pass:
    """One LLM pass of a step, for FLOP counting."""

    rows: int
    length: int  # tokens per row run through the layers (padded)
    prefix: int  # cached prefix keys attended before them
    real: int  # real (unpadded) tokens over all rows
    pairs_causal: int  # sum over real tokens of the keys they attend (prefix included)
    head: int  # positions the LM head runs on
    backward: bool  # gradients flow back through the pass


@dataclass
class LLMShape:
    """What FLOPs depend on: matmul weights of the decoder (all layers) frozen / trained,
    layers, attention width, hidden size, vocabulary, whether the LM head trains."""

    w_frozen: int
    w_trained: int
    layers: int
    d_attn: int
    hidden: int
    vocab: int
    head_trains: bool

    @classmethod
    def of(cls, model: VLM) -> LLMShape:
        frozen = trained = 0
        for mod in model.llm.get_decoder().modules():
            if isinstance(mod, nn.Linear):
                if mod.weight.requires_grad:
                    trained += mod.weight.numel()
                else:
                    frozen += mod.weight.numel()
        cfg = model.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        head = model.llm.get_output_embeddings()
        return cls(frozen, trained, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, cfg.hidden_size,
                   head.weight.shape[0], bool(head.weight.requires_grad))


def pass_flops(p: Pass, shape: LLMShape, useful: bool = False) -> float:
    """FLOPs of one pass, forward + backward (formula in the module docstring); `useful`
    counts real tokens and causal pairs only."""
    tokens = p.real if useful else p.rows * p.length
    pairs = p.pairs_causal if useful else p.rows * p.length * (p.prefix + p.length)
    w = shape.w_frozen + shape.w_trained
    attn = 4 * shape.layers * shape.d_attn * pairs
    head = 2 * shape.hidden * shape.vocab * p.head
    fwd = 2 * w * tokens + attn + head
    if not p.backward:
        return float(fwd)
    bwd = 2 * shape.w_frozen * tokens + 4 * shape.w_trained * tokens + 2 * attn + head * (2 if shape.head_trains else 1)
    return float(fwd + bwd)


def _pass(mask: Tensor, cut: int, head: int, backward: bool) -> Pass:
    """A pass over the columns from `cut` of right-padded rows with attention mask [B, T]."""
    m = mask[:, cut:]
    n = m.sum(dim=1).tolist()
    pairs = sum(k * cut + k * (k + 1) // 2 for k in n)
    return Pass(rows=m.shape[0], length=m.shape[1], prefix=cut, real=int(sum(n)), pairs_causal=int(pairs),
                head=head, backward=backward)


def _cut(prefix) -> int:
    return len(prefix.ids) if prefix is not None else 0


def _with_prefix(mask: Tensor, prefix) -> Tensor:
    """An embedding prompt's mask [B, T] (`VLM.prompt_batch`, without the cached prefix's
    columns) with those columns in front, as `_pass` reads it: [B, cut + T]."""
    return torch.cat([mask.new_ones(mask.shape[0], _cut(prefix)), mask], dim=1)


def step_passes(model: VLM, objective: Objective, batch: dict, ideal: bool = False) -> list[Pass]:
    """The LLM passes `objective(model, batch)` runs under the model's and objective's
    current switches; with `ideal`, the passes of the minimal step (every switch on)."""
    c = objective.cfg
    head_at_labels = ideal or c.head_at_labels
    cache = None if not ideal else model.llm_frozen()
    upstream = any(p.requires_grad for p in model.projector.parameters()) or not model.llm_frozen()
    out: list[Pass] = []
    shared = False
    if c.ntp_weight > 0 and "input_ids" in batch:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        cut = model.prefix_cut(ids, labels, use_cache=cache)
        n_labels = int((labels[:, cut + 1 :] != IGNORE_INDEX).sum())
        head = n_labels if head_at_labels else ids.shape[0] * (ids.shape[1] - cut)
        out.append(_pass(mask, cut, head, backward=True))
        shared = objective.shared_state_at(model, batch, switch_on=ideal) is not None
    if objective.uses_embeddings:
        if not shared:
            rows = batch.get("emb_rows")
            n = batch.get("features", batch.get("pixel_values")).shape[0] if rows is None else len(rows)
            if n:
                middle = [model.image_token_id] * model.num_visual_tokens
                _, mask, _, prefix = model.prompt_batch("image", [middle], use_cache=cache)
                out.append(_pass(_with_prefix(mask, prefix).expand(n, -1), _cut(prefix), 0,
                                 backward=upstream or model.image_soft is not None))
        text_frozen = model.text_path_frozen()
        text_cached = "text_states" in batch or (ideal and text_frozen)
        if batch["captions"] and not text_cached:
            _, mask, _, prefix = model.prompt_batch("text", model.sentence_ids(batch["captions"]), use_cache=cache)
            out.append(_pass(_with_prefix(mask, prefix), _cut(prefix), 0, backward=not text_frozen))
    return out


def counted_flops(fn) -> float:
    """FLOPs that torch's FlopCounterMode counts while `fn()` runs (matmuls, convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


@dataclass
class SideFlops:
    """Counted FLOPs per sample of the parts outside the LLM."""

    tower_fwd: float  # one image through the frozen tower
    projector: float  # projector forward + backward, per image

    @classmethod
    def of(cls, model: VLM, features: Tensor | None, pixels: Tensor) -> SideFlops:
        with torch.no_grad():
            tower = counted_flops(lambda: model.tower_features(pixels[:1]))
            feats = features[:1] if features is not None else model.tower_features(pixels[:1])

        def proj() -> None:
            out = model.projector(feats.to(model.projector_device()))
            if out.requires_grad:
                out.sum().backward()

        proj_flops = counted_flops(proj)
        model.projector.zero_grad(set_to_none=True)
        return cls(tower, proj_flops)


def step_flops(model: VLM, objective: Objective, batch: dict, shape: LLMShape, side: SideFlops) -> tuple[float, float]:
    """(model FLOPs the step executes under the current switches, useful FLOPs of the
    minimal step) for `batch`."""
    images = batch.get("features", batch.get("pixel_values")).shape[0]
    executed = sum(pass_flops(p, shape) for p in step_passes(model, objective, batch))
    useful = sum(pass_flops(p, shape, useful=True) for p in step_passes(model, objective, batch, ideal=True))
    executed += side.projector * images
    useful += side.projector * images
    tower_trains = any(p.requires_grad for p in model.vision.parameters())
    if "features" not in batch or tower_trains:
        executed += side.tower_fwd * images
    if tower_trains:
        useful += 3 * side.tower_fwd * images
    return executed, useful


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, device: torch.device | str = "cpu",
                       warmup_s: float = 1.5) -> float:
    """Best fp32 matmul rate (GFLOP/s) of `repeats` n x n @ n x n products (2 n^3 FLOPs
    each), after `warmup_s` seconds of the same products: a cold start measures up to 30%
    low on this CPU (110 vs 150 GFLOP/s on 2 threads), which would inflate every MFU."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    until = time.perf_counter() + warmup_s
    while time.perf_counter() < until:
        torch.mm(a, b)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
