"""`vlmalign bench`: the cost of one training step per recipe, optimised and naive.

A step is forward + backward + clipping + AdamW step on one collated batch (collation and
image decoding are done before timing). For each recipe the bench reports the median step
time over `steps` steps after `warmup`, samples/s, trained (label) tokens/s, memory, MFU
and useful-work MFU, for the optimised step (the training code itself: `Objective`) and,
with `naive=True`, a naive step that computes the same losses the plain way:

- the vision tower runs every step (no feature cache),
- full-vocabulary LM head on every position (as an HF forward with labels),
- separate LLM passes for the image embedding and the next-token loss,
- no cached prompt-prefix keys/values, no text-state cache, no length grouping.

Each optimisation can be switched off alone (`Settings`, `ablate=`), so its share is
measured. Tests (tests/test_bench.py) check that every mode gives the same losses and
gradients; wall-clock figures are only printed.

FLOPs are counted analytically (`pass_flops`), per LLM pass, from the linear layers of
the decoder (so LoRA adapters count) and the LLM config:

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

Timing: every mode runs `warmup` untimed steps, then `steps` timed ones, on the same
batches. prepare_recipe batches whole mega-batches of LENGTH_GROUP batches, so with
`steps` a multiple of LENGTH_GROUP (the default, 8) every mode, length-grouped or not,
is timed on exactly the same samples; `ms_mean` (their mean) is what the ratios use,
`ms_per_step` is the median.

Memory:
- `peak_alloc_mb`: peak tensor memory of a step, weights, gradients, optimizer state and
  batch included: CUDA's max_memory_allocated over the mode; on CPU the bytes of the
  tensors live before a step plus the peak of what the step allocates, from the CPU
  allocator's records (`step_alloc_peak_bytes`). Free of the process's libraries and of
  malloc's caching: the same quantity on both devices.
- `step_mem_mb` / `peak_rss_mb` (CPU): the process's resident set. The kernel's
  high-water mark (VmHWM) is reset before each mode (`/proc/self/clear_refs`, after
  `malloc_trim` returns freed heap to the system); `step_mem_mb` = VmHWM after the mode
  minus VmRSS before it (what the steps add on top of the loaded models), `peak_rss_mb`
  = VmHWM (libraries and weights included). Where the reset is impossible the figures
  fall back to the process-wide `ru_maxrss` and `mem_method` says so. On CUDA,
  `step_mem_mb` is the peak allocated above what was allocated before the mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vlmalign import cache, losses
from vlmalign.config import Config, load_config
from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.sampler import LengthGroupedBatchSampler
from vlmalign.models import compiled, memory
from vlmalign.models.prompts import PromptTemplate, SoftPrompt
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import DATA_KINDS, TrainData, build_trainset
from vlmalign.train.recipes import RECIPES, apply_recipe

console = Console()

BENCH_RECIPES = ("align", "align-cg", "align-clip", "instruct", "discriminative")
# Batches per length-sorted mega-batch, as the trainer's LENGTH_GROUP.
LENGTH_GROUP = 8
# Keys of each result row (documented in benchmarks/README.md).
RESULT_KEYS = (
    "recipe", "mode", "ms_per_step", "ms_mean", "ms_all", "samples_per_s", "trained_tokens_per_s", "tokens_per_s",
    "padding_fraction", "model_gflop", "useful_gflop", "mfu", "useful_mfu", "peak_alloc_mb", "peak_rss_mb",
    "step_mem_mb", "saved_mb", "losses",
)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Which optimisations a step uses; the defaults = the training code's default step
    (everything on but `compile`, which train.compile switches on)."""

    feature_cache: bool = True  # cached frozen tower features (off: the tower runs every step)
    head_at_labels: bool = True  # LM head only at label positions (off: full vocabulary everywhere)
    shared_pass: bool = True  # one LLM pass for the prompted image state and the NTP loss
    prefix_kv: bool = True  # cached keys/values of the constant prompt prefix (frozen LLM)
    text_cache: bool = True  # cached prompted text states (frozen text path)
    group_by_length: bool = True  # length-grouped batches (less padding)
    lean_mlp: bool = True  # gated MLPs keep gate and up only, act recomputed (models/memory.py)
    compile: bool = False  # torch.compile of the decoder layers (models/compiled.py; off by default)


OPTIMISED = Settings()
NAIVE = Settings(**{f.name: False for f in fields(Settings)})


def ablations() -> dict[str, Settings]:
    """The optimised settings with one optimisation switched each: {"no-<name>": Settings}
    for those on by default, {"<name>": Settings} for those off by default (compile)."""
    out = {}
    for f in fields(Settings):
        on = getattr(OPTIMISED, f.name)
        out[f"no-{f.name}" if on else f.name] = replace(OPTIMISED, **{f.name: not on})
    return out


def mode_settings(mode: str) -> Settings:
    """"optimised", "naive", or one of `ablations()` ("no-<optimisation>", "compile")."""
    table = {"optimised": OPTIMISED, "naive": NAIVE, **ablations()}
    if mode not in table:
        raise ValueError(f"unknown bench mode {mode!r}; modes: {', '.join(table)}")
    return table[mode]


# ----------------------------------------------------------------------------- the step
def _prompted_ids(model: VLM, template: PromptTemplate, soft: SoftPrompt | None, middles: list[list[int]],
                  keep_prefix: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """Right-padded prompt ids, mask, soft mask [B, T] and the prefix length cut off
    (what `VLM._prompted` builds; `keep_prefix` runs the prefix tokens instead)."""
    prefix = model._image_prefix if template is model.image_template else model._text_prefix
    ids, mask, soft_mask, cached = model._prompted(template, soft, prefix, middles)
    cut = len(prefix.ids) if cached is not None else 0
    if keep_prefix and cut:
        head = torch.tensor(prefix.ids, device=ids.device).expand(ids.shape[0], -1)
        ids = torch.cat([head, ids], dim=1)
        mask = torch.cat([torch.ones_like(head), mask], dim=1)
        soft_mask = torch.cat([torch.zeros_like(head, dtype=torch.bool), soft_mask], dim=1)
        cut = 0
    return ids, mask, soft_mask, cut


def _text_middles(model: VLM, texts: list[str]) -> list[list[int]]:
    limit = model.cfg.data.long_max_tokens
    return [ids[:limit] for ids in model.tokenizer(list(texts), add_special_tokens=False).input_ids]


def naive_image_states(model: VLM, visual: Tensor) -> Tensor:
    """`VLM.image_states` without the cached prefix: the whole prompt runs. [B, D]"""
    b = visual.shape[0]
    middle = [model.image_token_id] * model.num_visual_tokens
    ids, mask, soft_mask, _ = _prompted_ids(model, model.image_template, model.image_soft, [middle], True)
    ids, mask, soft_mask = ids.expand(b, -1), mask.expand(b, -1), soft_mask.expand(b, -1)
    embeds = model.splice(ids, visual)  # [B, T, D]
    if model.image_soft is not None:
        embeds = model.image_soft.scatter(embeds, soft_mask)
    return model.decode(embeds, mask)[:, -1]


def naive_text_states(model: VLM, texts: list[str]) -> Tensor:
    """`VLM.text_states` without the cached prefix. [B, D]"""
    ids, mask, soft_mask, _ = _prompted_ids(model, model.text_template, model.text_soft, _text_middles(model, texts), True)
    embeds = model.input_embeddings(ids)
    if model.text_soft is not None:
        embeds = model.text_soft.scatter(embeds, soft_mask)
    hidden = model.decode(embeds, mask)
    return hidden[torch.arange(len(texts), device=ids.device), mask.sum(dim=1) - 1]


def full_vocab_ntp(hidden: Tensor, labels: Tensor, head: nn.Module) -> dict[str, Tensor]:
    """HF's causal-LM loss: logits [B, T, V] on every position, shifted mean cross-entropy
    over labels != -100 (what `LlamaForCausalLM(labels=...)` computes)."""
    logits = head(hidden).float()  # [B, T, V]
    v = logits.shape[-1]
    shift = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), shift.reshape(-1), ignore_index=IGNORE_INDEX)
    return {"ntp_loss": loss, "ntp_tokens": (shift != IGNORE_INDEX).sum()}


def bench_loss(model: VLM, objective: Objective, batch: dict, s: Settings) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss, parts) of one batch under settings `s`. With the LM head at labels and
    the prefix cache on this is the training objective itself (`Objective`), told by the
    batch which caches to use; otherwise a reference step written here, same losses."""
    memory.set_lean(model.llm, s.lean_mlp)
    if s.compile != compiled.is_compiled(model.llm):
        compiled.set_compiled(model.llm, s.compile)
    b = dict(batch)
    if not s.shared_pass:
        b.pop("prompt_state_at", None)
    if not s.text_cache:
        b.pop("text_states", None)
    if s.head_at_labels and s.prefix_kv:
        return objective(model, b)
    return _reference_loss(model, objective, b, s)


def _reference_loss(model: VLM, objective: Objective, batch: dict, s: Settings) -> tuple[Tensor, dict[str, Tensor]]:
    c = objective.cfg
    visual = model.visual_tokens(batch.get("pixel_values"), batch.get("features"))  # [B, Q, D]
    parts: dict[str, Tensor] = {}
    total = visual.new_zeros(())
    image_state = None
    if c.ntp_weight > 0 and "input_ids" in batch:
        rows = batch.get("ntp_rows")
        v = visual if rows is None else visual[rows.to(visual.device)]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        cut = model._cut_prefix(ids, labels) if s.prefix_kv else 0
        hidden = model.hidden_states(ids[:, cut:], mask[:, cut:], v, model._image_prefix if cut else None)
        head = model.llm.get_output_embeddings()
        if s.head_at_labels:
            out = losses.next_token_loss(hidden, labels[:, cut:], head.weight, head.bias)
        else:
            out = full_vocab_ntp(hidden, labels[:, cut:], head)
        state_at = objective.shared_state_at(model, batch)
        if state_at is not None:
            image_state = hidden[:, state_at - cut]
        parts |= out
        total = total + c.ntp_weight * out["ntp_loss"]
    elif c.ntp_weight > 0:
        parts |= objective.ntp_part(model, batch, visual)
    if objective.contrastive_active:
        if objective.uses_embeddings:
            if image_state is None:
                rows = batch.get("emb_rows")
                ev = visual if rows is None else visual[rows.to(visual.device)]
                image_state = model.image_states(ev) if s.prefix_kv else naive_image_states(model, ev)
            if "text_states" not in batch:
                texts = batch["captions"]
                batch = dict(batch, text_states=model.text_states(texts) if s.prefix_kv else naive_text_states(model, texts))
        reps = objective.representations(model, batch, visual, image_state=image_state)
        loss, cparts = objective.contrastive(reps)
        total = total + loss
        parts |= cparts
    parts["loss"] = total.detach()
    return total, parts


# ----------------------------------------------------------------------------- FLOPs
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


def step_passes(model: VLM, objective: Objective, batch: dict, s: Settings) -> list[Pass]:
    """The LLM passes `bench_loss(model, objective, batch, s)` runs."""
    c = objective.cfg
    upstream = any(p.requires_grad for p in model.projector.parameters()) or not model.llm_frozen()
    out: list[Pass] = []
    shared = False
    if c.ntp_weight > 0 and "input_ids" in batch:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        cut = model._cut_prefix(ids, labels) if s.prefix_kv else 0
        n_labels = int((labels[:, cut + 1 :] != IGNORE_INDEX).sum())
        head = n_labels if s.head_at_labels else ids.shape[0] * (ids.shape[1] - cut)
        out.append(_pass(mask, cut, head, backward=True))
        shared = s.shared_pass and objective.shared_state_at(model, batch) is not None
    if objective.uses_embeddings:
        if not shared:
            rows = batch.get("emb_rows")
            n = batch.get("features", batch.get("pixel_values")).shape[0] if rows is None else len(rows)
            if n:
                middle = [model.image_token_id] * model.num_visual_tokens
                _, mask, _, cut = _prompted_ids(model, model.image_template, model.image_soft, [middle], not s.prefix_kv)
                out.append(_pass(mask.expand(n, -1), cut, 0, backward=upstream or model.image_soft is not None))
        text_frozen = model.text_path_frozen()
        if batch["captions"] and not (s.text_cache and text_frozen):
            middles = _text_middles(model, batch["captions"])
            _, mask, _, cut = _prompted_ids(model, model.text_template, model.text_soft, middles, not s.prefix_kv)
            out.append(_pass(mask, cut, 0, backward=not text_frozen))
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


def step_flops(model: VLM, objective: Objective, batch: dict, s: Settings, shape: LLMShape,
               side: SideFlops) -> tuple[float, float]:
    """(model FLOPs executed by the step under `s`, useful FLOPs of the minimal step)."""
    images = batch.get("features", batch.get("pixel_values")).shape[0]
    executed = sum(pass_flops(p, shape) for p in step_passes(model, objective, batch, s))
    useful = sum(pass_flops(p, shape, useful=True) for p in step_passes(model, objective, batch, OPTIMISED))
    executed += side.projector * images
    useful += side.projector * images
    tower_trains = any(p.requires_grad for p in model.vision.parameters())
    if not s.feature_cache or tower_trains:
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


# ----------------------------------------------------------------------------- memory
class MemoryProbe:
    """Peak memory of a stretch of code (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda" if device.type == "cuda" else "vmhwm-reset"

    @staticmethod
    def _status(key: str) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return float("nan")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "process-maxrss"
        self.base = self._status("VmRSS")

    def stop(self) -> tuple[float, float]:
        """(peak in MB, peak above the start in MB)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            return peak, peak - self.base
        if self.method == "process-maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            peak = self._status("VmHWM")
        return peak, peak - self.base


# ----------------------------------------------------------------------------- data
@dataclass
class RecipeSetup:
    """A recipe ready to step: model, objective, and batches for each data setting."""

    cfg: Config
    model: VLM
    objective: Objective
    batches: dict[tuple[bool, bool], list[dict]]  # (feature_cache, group_by_length) -> batches
    trainable: tuple[bool, ...] = ()  # requires_grad of model.parameters() under this recipe
    caption_format: str = "prompted"

    def activate(self) -> None:
        """Put the (possibly shared) model in this recipe's state: its config and which
        parameters train. The prompt prefixes are rebuilt only when the prompts differ."""
        model = self.model
        if model.cfg is not self.cfg:
            if model.cfg.embedding != self.cfg.embedding:
                model.set_config(self.cfg)
            else:
                model.cfg = self.cfg
            for p, on in zip(model.parameters(), self.trainable, strict=True):
                p.requires_grad_(on)


def bench_config(recipe: str, llm: str, tower: str, batch_size: int, data_root: str | Path | None,
                 overrides: Iterable[str] = ()) -> Config:
    """The recipe's config with the bench's models, batch size and data."""
    extra = [f"llm.name={llm}", f"vision.tower={tower}", f"train.batch_size={batch_size}"]
    if data_root is not None:
        extra.append(f"data.root={data_root}")
    return load_config(recipe_config(recipe), extra + list(overrides))


def prepare_recipe(cfg: Config, n_batches: int, caption_format: str = "prompted", model: VLM | None = None,
                   feature_store: str | Path | None = None, seed: int = 0) -> RecipeSetup:
    """Load `cfg`'s model (or adopt `model`), the first records of its data kind (whole
    mega-batches of LENGTH_GROUP batches, at least `n_batches` batches), their tower
    features and text states, and collate all their batches for every data setting
    (collation is not timed). With `n_batches` a multiple of LENGTH_GROUP the first
    `n_batches` batches of every setting hold exactly the same samples, grouped by
    length or not, so modes are timed on the same tokens."""
    recipe = RECIPES.get(cfg.recipe)
    torch.manual_seed(seed)
    if model is None:
        model = VLM.build(cfg)
    model.set_config(cfg)
    apply_recipe(model, recipe)
    objective = Objective(cfg.objective).to(model.device)
    bs = cfg.train.batch_size
    need = max(n_batches * bs, bs * LENGTH_GROUP)
    need = -(-need // (bs * LENGTH_GROUP)) * bs * LENGTH_GROUP  # whole mega-batches
    report = LoadReport()
    records = DATA_KINDS.get(recipe.data).load(cfg, report)[:need]
    probes = [Sample(id=str(i), image=r.image) for i, r in enumerate(records)]
    features, kept = cache.tower_features(model, probes, report=report, store=feature_store)
    records = [records[int(p.id)] for p in kept]
    text_cache = cache.TextStateCache()
    batches: dict[tuple[bool, bool], list[dict]] = {}
    for feature_cache in (True, False):
        data = TrainData(recipe.data, records, features if feature_cache else None, text_cache, report)
        trainset = build_trainset(model, objective, data, cfg)
        if isinstance(trainset.collator, CaptionCollator):
            trainset.collator.prompt = model.caption_prompt(caption_format)
        for grouped in (True, False):
            lengths = trainset.lengths if grouped else [0] * len(trainset.lengths)
            sampler = LengthGroupedBatchSampler(lengths, bs, seed=seed, group=LENGTH_GROUP if grouped else 1)
            order = list(sampler)  # all of the records: every data setting batches the same samples
            batches[(feature_cache, grouped)] = [trainset.collator([trainset.dataset[i] for i in idx]) for idx in order]
    return RecipeSetup(cfg, model, objective, batches, tuple(p.requires_grad for p in model.parameters()),
                       caption_format)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- timing
def measure_mode(setup: RecipeSetup, mode: str, steps: int, warmup: int, peak_gflops: float,
                 threads: int | None = None) -> dict:
    """Time `steps` optimizer steps of `setup` under `mode` after `warmup` untimed ones
    (on the same batches); one result row (`measure_modes` with one mode)."""
    return measure_modes([(setup, mode)], steps, warmup, peak_gflops, threads)[0]


class _ModeRun:
    """One mode's optimizer, batches and step times while `measure_modes` takes turns."""

    def __init__(self, setup: RecipeSetup, mode: str, steps: int) -> None:
        self.setup, self.mode, self.s = setup, mode, mode_settings(mode)
        model, device = setup.model, setup.model.device
        batches = setup.batches[(self.s.feature_cache, self.s.group_by_length)][:steps]
        if len(batches) < steps or not steps:
            raise ValueError(f"{len(batches)} batches prepared for {steps} timed steps; prepare_recipe(cfg, {steps})")
        self.timed = [_to(b, device) for b in batches]
        setup.activate()
        self.params = [p for p in list(model.parameters()) + list(setup.objective.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.times: list[float] = []
        self.warm: list[float] = []
        self.parts: dict[str, float] = {}

    def step(self, batch: dict) -> dict[str, Tensor]:
        self.setup.activate()
        return _step(self.setup.model, self.setup.objective, batch, self.s, self.params, self.optimizer,
                     self.setup.cfg.train.max_grad_norm)

    def timed_step(self, i: int, warm: bool) -> None:
        device = self.setup.model.device
        _sync(device)
        t = time.perf_counter()
        parts = self.step(self.timed[i])
        _sync(device)
        (self.warm if warm else self.times).append(time.perf_counter() - t)
        if not self.parts:
            self.parts = {k: float(v.detach()) for k, v in parts.items() if k.endswith("_loss") or k == "loss"}


def measure_modes(runs: list[tuple[RecipeSetup, str]], steps: int, warmup: int, peak_gflops: float,
                  threads: int | None = None) -> list[dict]:
    """Time several (setup, mode) pairs taking turns step by step: every mode runs its
    `warmup` untimed steps, then timed step i runs batch i of each mode in turn, so a
    drift of the machine's speed during the run (other tenants, the allocator settling)
    falls on every mode alike; timing modes one after another let later ones look up to
    25% faster. Setups may be different recipes on one shared model (`RecipeSetup.activate`
    switches it). Memory is measured afterwards, one mode at a time, on each mode's
    largest batch. One result row per pair, in order."""
    states = [_ModeRun(setup, mode, steps) for setup, mode in runs]
    for setup in {id(st.setup): st.setup for st in states}.values():
        setup.model.train()
        setup.model.llm.eval()  # as the trainer: no dropout in the backbones
        setup.model.vision.eval()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for st in states:
            for i in range(warmup):
                st.timed_step(i % steps, warm=True)
        for i in range(steps):
            for st in states:
                st.timed_step(i, warm=False)
        return [_mode_row(st, peak_gflops, threads or old_threads) for st in states]
    finally:
        torch.set_num_threads(old_threads)
        for st in states:
            _restore(st.setup.model)


def _mode_row(st: _ModeRun, peak_gflops: float, threads: int) -> dict:
    """The result row of a timed mode, with its memory measured now on its largest batch."""
    setup, s = st.setup, st.s
    setup.activate()
    model, objective = setup.model, setup.objective
    device = model.device
    largest = max(st.timed, key=lambda b: _token_counts(b)[1])
    weights = [*model.parameters(), *model.buffers(), *objective.parameters()]
    live = [*weights, *optimizer_tensors(st.optimizer), *(v for v in largest.values() if isinstance(v, Tensor))]
    probe = MemoryProbe(device)
    probe.start()  # one step gives the resident-set figures and (CPU) the allocator's peak
    step_peak = 0 if device.type == "cuda" else step_alloc_peak_bytes(lambda: st.step(largest))
    if device.type == "cuda":
        st.step(largest)
    _sync(device)
    peak, step_mem = probe.stop()
    # CUDA: max allocated (weights, optimizer state, batch and the step's tensors)
    alloc = peak if device.type == "cuda" else (storage_bytes(live) + step_peak) / 2**20
    saved = saved_activation_bytes(lambda: bench_loss(model, objective, largest, s)[0], exclude=weights)
    st.optimizer.zero_grad(set_to_none=True)
    _restore(model)
    times, timed = st.times, st.timed
    sec = statistics.median(times)
    mean = statistics.mean(times)
    shape = LLMShape.of(model)
    side = SideFlops.of(model, timed[0].get("features"), _pixels(setup, timed[0]))
    flops = [step_flops(model, objective, b, s, shape, side) for b in timed]
    executed = statistics.mean(f[0] for f in flops)
    useful = statistics.mean(f[1] for f in flops)
    label_tokens = statistics.mean(_label_tokens(b) for b in timed)
    real, padded = zip(*(_token_counts(b) for b in timed), strict=True)
    bs = setup.cfg.train.batch_size
    return {
        "recipe": setup.cfg.recipe, "mode": st.mode, "ms_per_step": 1000 * sec, "ms_mean": 1000 * mean,
        "ms_all": [round(1000 * t, 1) for t in times], "warmup_ms": [round(1000 * t, 1) for t in st.warm],
        "samples_per_s": bs / mean, "trained_tokens_per_s": label_tokens / mean,
        "tokens_per_s": statistics.mean(real) / mean,
        "padding_fraction": 1 - sum(real) / max(sum(padded), 1),
        "model_gflop": executed / 1e9, "useful_gflop": useful / 1e9,
        "mfu": executed / mean / (peak_gflops * 1e9), "useful_mfu": useful / mean / (peak_gflops * 1e9),
        "peak_alloc_mb": alloc, "peak_rss_mb": peak, "step_mem_mb": step_mem, "mem_method": probe.method,
        "saved_mb": saved / 2**20, "threads": threads, "losses": st.parts,
    }


def _restore(model: VLM) -> None:
    """Back to the training code's default step (lean MLPs on, eager layers)."""
    memory.set_lean(model.llm, True)
    if compiled.is_compiled(model.llm):
        compiled.set_compiled(model.llm, False)


def _step(model: VLM, objective: Objective, batch: dict, s: Settings, params: list[Tensor],
          optimizer: torch.optim.Optimizer, max_norm: float) -> dict[str, Tensor]:
    """One optimizer step (forward, backward, clipping, AdamW); the loss parts."""
    loss, parts = bench_loss(model, objective, batch, s)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors of an optimizer's state (AdamW: step, exp_avg, exp_avg_sq per parameter)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared weights once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints start/stop lines
    (and a GPU-count error on CPU-only machines) that would interleave with the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_alloc_peak_bytes(step) -> int:
    """Peak bytes of CPU tensor memory `step()` allocates above what was allocated before
    it, from the allocation records of torch's CPU allocator (`torch.profiler` with
    `profile_memory`): what CUDA's max_memory_allocated adds during a step, free of the
    process's libraries and of malloc's caching, which the resident set includes."""
    from torch._C._profiler import _EventType

    with _stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as prof:
        step()
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocs.append((event.start_time_ns, event.extra_fields))
    if not allocs:
        return 0
    allocs.sort(key=lambda a: a[0])
    first = allocs[0][1]
    base = first.total_allocated - first.alloc_size  # the allocator's running total before the step
    return max(0, max(a.total_allocated for _, a in allocs) - base)


def saved_activation_bytes(loss_fn, exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `loss_fn()` builds
    its graph: the activation memory of a step, free of allocator effects. Storages of
    `exclude` (the weights, which layers keep for their input gradient) are not counted.
    Backward then runs once to free the graph: the caller zeroes the gradients."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    if loss.requires_grad:
        loss.backward()  # frees the graph (dropping it unused left ~0.5 GB a call resident)
    return sum(storages.values())


def _pixels(setup: RecipeSetup, batch: dict) -> Tensor:
    px = batch.get("pixel_values")
    if px is None:
        px = setup.batches[(False, True)][0]["pixel_values"]
    return px.to(setup.model.device)


def _label_tokens(batch: dict) -> int:
    labels = batch.get("labels")
    return 0 if labels is None else int((labels[:, 1:] != IGNORE_INDEX).sum())


def _token_counts(batch: dict) -> tuple[int, int]:
    """(real, padded) tokens of the batch's next-token sequences."""
    mask = batch.get("attention_mask")
    return (0, 0) if mask is None else (int(mask.sum()), mask.numel())


# ----------------------------------------------------------------------------- the run
def run_bench(
    recipes: Iterable[str] = BENCH_RECIPES,
    llm: str = "smollm2-135m",
    tower: str = "efficientnet-lite0",
    batch_size: int = 16,
    steps: int = LENGTH_GROUP,
    warmup: int = 1,
    naive: bool = True,
    out: Path | str | None = None,
    ablate: Iterable[str] = (),
    threads: Iterable[int] = (),
    caption_format: str = "prompted",
    data_root: str | Path | None = None,
    overrides: Iterable[str] = (),
    feature_store: str | Path | None = None,
    plain_reference: bool = False,
    num_threads: int | None = None,
    quiet: bool = False,
) -> dict:
    """Benchmark one training step per recipe; print a table, write JSON to `out`.

    For each recipe: the optimised step, the naive step (`naive`), every single-
    optimisation ablation for the recipes in `ablate`, and the optimised step at each
    thread count in `threads` (for the first recipe). `caption_format` ("prompted" or
    "plain") is the caption sequence of the caption recipes: "prompted" lets align-clip
    share one LLM pass between its embedding and its next-token loss. `plain_reference`
    adds align's optimised step on plain captions (`[<image> x Q] caption <eos>`, the
    LLaVA stage-1 sequence) as the row "optimised-plain". `feature_store`: a folder for
    the on-disk tower feature cache (feature_store.py). `num_threads`: torch's intra-op
    threads for the whole run (None keeps torch's default, one per core).

    Returns {"device", "peak_gflops", "load_avg", "results": [row, ...], "ratios": {...},
    ...}; each row holds RESULT_KEYS (see benchmarks/README.md).
    """
    recipes = list(recipes)
    for r in recipes:
        RECIPES.get(r)  # unknown ids fail here, naming the known ones
    ablate = set(ablate)
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_start = matmul_peak_gflops(device=device)
    load_before = os.getloadavg()
    results: list[dict] = []
    models: dict[tuple, VLM] = {}
    errors: list[dict] = []
    # Recipes on one shared model (same LoRA setting) are timed together, step by step in
    # turn, so the joint / NTP-only ratios compare steps taken side by side.
    groups: dict[tuple, list[tuple[RecipeSetup, str]]] = {}
    for recipe in recipes:
        try:
            key, runs = _recipe_runs(recipe, models, device, llm, tower, batch_size, steps, naive, ablate,
                                     caption_format, data_root, overrides, feature_store, plain_reference)
            groups.setdefault(key, []).extend(runs)
        except Exception as e:  # one broken recipe (data, model) must not lose the others' figures
            errors.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
            console.print(f"[yellow]bench: {recipe} failed ({type(e).__name__}: {e}); continuing")
    for runs in groups.values():
        try:
            rows = measure_modes(runs, steps, warmup, peak)
        except Exception as e:
            for recipe in dict.fromkeys(setup.cfg.recipe for setup, _ in runs):
                errors.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
            console.print(f"[yellow]bench: timing failed ({type(e).__name__}: {e}); continuing")
            continue
        for (setup, mode), row in zip(runs, rows, strict=True):
            row["mode"] = mode if setup.caption_format != "plain" or caption_format == "plain" else "optimised-plain"
            results.append(row)
            if not quiet:
                console.print(f"{row['recipe']:>15} {row['mode']:<22} {row['ms_mean']:8.0f} ms/step  "
                              f"peak alloc {row['peak_alloc_mb']:.0f} MB")
    if threads and groups:
        first = next(iter(groups.values()))[0][0]
        for n in threads:
            row = measure_mode(first, "optimised", steps, warmup, peak, threads=n)
            row["mode"] = f"optimised-threads{n}"
            results.append(row)
    results.sort(key=lambda r: recipes.index(r["recipe"]))  # stable: modes keep their order
    # The peak again at the end; MFU is against the higher of the two (a conservative MFU).
    peak_end = matmul_peak_gflops(device=device)
    peak = max(peak_start, peak_end)
    for r in results:
        r["mfu"] *= peak_start / peak
        r["useful_mfu"] *= peak_start / peak
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "peak_gflops": peak, "peak_gflops_start": peak_start,
        "peak_gflops_end": peak_end, "llm": llm, "tower": tower,
        "batch_size": batch_size, "steps": steps, "warmup": warmup, "caption_format": caption_format,
        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t0, "results": results, "ratios": bench_ratios(results), "errors": errors,
    }
    if not quiet:
        wide = Console(width=max(console.width, 200)) if not console.is_terminal else console
        wide.print(bench_table(report))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        if not quiet:
            console.print(f"wrote {out}")
    return report


def _recipe_runs(recipe, models, device, llm, tower, batch_size, steps, naive, ablate, caption_format, data_root,
                 overrides, feature_store, plain_reference) -> tuple[tuple, list[tuple[RecipeSetup, str]]]:
    """(shared-model key, the (setup, mode) pairs to time) of one recipe: its optimised
    mode, naive, ablations, and align on plain captions with `plain_reference`."""
    cfg = bench_config(recipe, llm, tower, batch_size, data_root, overrides)
    key = (cfg.lora.enabled, tuple(cfg.lora.target_modules), cfg.lora.r)
    modes = ["optimised"] + (["naive"] if naive else []) + (list(ablations()) if recipe in ablate else [])
    setup = prepare_recipe(cfg, steps, caption_format, models.get(key), feature_store)
    models[key] = setup.model.to(device)
    setup.objective.to(device)
    runs = [(setup, mode) for mode in modes]
    if recipe == "align" and plain_reference and caption_format != "plain":
        runs.append((prepare_recipe(cfg, steps, "plain", setup.model, feature_store), "optimised"))
    return key, runs


def bench_ratios(results: list[dict]) -> dict[str, float]:
    """Ratios between rows (times: `ms_mean`, the same samples in every mode when the step
    count is a multiple of LENGTH_GROUP): `<recipe>/naive_over_optimised_time`,
    `.../optimised_over_naive_alloc_peak` (peak tensor memory), `.../optimised_over_naive_step_mem`,
    `.../optimised_over_naive_peak_rss`, `.../optimised_over_naive_saved` (activations kept
    for backward), `<recipe>/optimised_over_align_time` (joint / NTP-only),
    `<recipe>/optimised_over_plain_align_time` (over align on plain captions),
    `<recipe>/<ablation>_over_optimised_time`."""
    rows = {(r["recipe"], r["mode"]): r for r in results}
    out: dict[str, float] = {}
    align = rows.get(("align", "optimised"))
    plain = rows.get(("align", "optimised-plain"))

    def ratio(a: dict, b: dict, key: str) -> float:
        return a[key] / max(b[key], 1e-9)

    for (recipe, mode), r in rows.items():
        if mode == "optimised" and plain is not None:
            out[f"{recipe}/optimised_over_plain_align_time"] = ratio(r, plain, "ms_mean")
        opt = rows.get((recipe, "optimised"))
        if opt is None:
            continue
        if mode == "naive":
            out[f"{recipe}/naive_over_optimised_time"] = ratio(r, opt, "ms_mean")
            for key, name in (("peak_alloc_mb", "alloc_peak"), ("step_mem_mb", "step_mem"),
                              ("peak_rss_mb", "peak_rss"), ("saved_mb", "saved")):
                out[f"{recipe}/optimised_over_naive_{name}"] = ratio(opt, r, key)
        elif mode == "optimised" and align is not None and recipe != "align":
            out[f"{recipe}/optimised_over_align_time"] = ratio(r, align, "ms_mean")
        elif mode != "optimised":
            out[f"{recipe}/{mode}_over_optimised_time"] = ratio(r, opt, "ms_mean")
    return out


def bench_table(report: dict) -> Table:
    """The rich table `run_bench` prints."""
    table = Table(title=f"vlmalign bench: {report['llm']} + {report['tower']}, batch {report['batch_size']}, "
                        f"peak {report['peak_gflops']:.0f} GFLOP/s, load {report['load_avg_before'][0]:.1f}")
    for col in ("recipe", "mode", "ms/step", "ms mean", "samples/s", "trained tok/s", "pad", "GFLOP", "MFU",
                "useful MFU", "saved MB", "peak alloc MB", "step mem MB", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("recipe", "mode") else "right")
    for r in report["results"]:
        table.add_row(r["recipe"], r["mode"], f"{r['ms_per_step']:.0f}", f"{r['ms_mean']:.0f}",
                      f"{r['samples_per_s']:.1f}", f"{r['trained_tokens_per_s']:.0f}", f"{r['padding_fraction']:.0%}",
                      f"{r['model_gflop']:.0f}", f"{r['mfu']:.0%}", f"{r['useful_mfu']:.0%}", f"{r['saved_mb']:.0f}",
                      f"{r['peak_alloc_mb']:.0f}", f"{r['step_mem_mb']:.0f}", f"{r['peak_rss_mb']:.0f}")
    return table


def bench_from_args(args) -> int:
    """`vlmalign bench`: run_bench from parsed CLI arguments (cli.py's `bench` parser:
    --recipes, --llm, --tower, --batch-size, --steps, --warmup, --no-naive, --ablate,
    --threads, --num-threads, --caption-format, --data-root, --feature-store,
    --plain-reference, --json, and key=value config overrides)."""

    def names(text: str) -> list[str]:
        return [t.strip() for t in (text or "").split(",") if t.strip()]

    run_bench(
        names(args.recipes) or BENCH_RECIPES, llm=args.llm, tower=args.tower, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, naive=not args.no_naive, out=args.json, ablate=names(args.ablate),
        threads=[int(t) for t in names(args.threads)], caption_format=args.caption_format, data_root=args.data_root,
        overrides=args.overrides, feature_store=args.feature_store, plain_reference=args.plain_reference,
        num_threads=args.num_threads,
    )
    return 0
