"""Configuration: nested dataclasses, YAML files and dotted command-line overrides.

Every value has one home here, with its default and where the default comes from.
`load_config("configs/align.yaml", ["train.lr=1e-3"])` reads a YAML file, applies overrides
and returns a `Config`; unknown keys and values of the wrong type raise `ConfigError`
naming the key and listing the known ones.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmalign.paths import recipe_config


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class VisionConfig:
    # Registry id of the tower (see models/vision.py): "efficientnet-lite0" (packaged
    # ImageNet weights), "timm" (any timm model by `name`), "hf" (HF CLIP/SigLIP vision
    # model from a local dir or hub id in `name`), "tiny" (random, for tests).
    tower: str = "efficientnet-lite0"
    name: str = ""
    pretrained: bool = True
    # HF towers: hidden layer whose patch features are used; -2 as in LLaVA-1.5.
    feature_layer: int = -2
    # Input resolution; 224 is EfficientNet-Lite0's and CLIP ViT-B's training size.
    image_size: int = 224
    # Frozen by default, as in every alignment stage of the three papers.
    frozen: bool = True


@dataclass
class ProjectorConfig:
    # "linear", "mlp2x_gelu" (LLaVA-1.5) or "pooled" (adaptive average pool to a k x k
    # grid, then mlp2x_gelu).
    type: str = "pooled"
    # pooled: k. 7x7 -> 3x3 cut a SmolLM2 step from ~4.4 s to ~1.3 s here (FINDINGS.md).
    pool_size: int = 3
    # Keep the projector fixed in recipes that would train it (e.g. discriminative after
    # an alignment run, VladVA's "projector trainable or frozen").
    frozen: bool = False


@dataclass
class LLMConfig:
    # Registry id of a packaged model ("smollm2-135m", "tiny"), a local directory, or a
    # hub id.
    name: str = "smollm2-135m"
    # A GGUF file inside `name` when it is a directory that holds one.
    gguf_file: str = ""
    # Executing model code from a checkpoint is off unless the user asks for it.
    trust_remote_code: bool = False
    # Frozen in the alignment stage (LLaVA stage 1, CG-VLM, Ak et al.).
    frozen: bool = True
    # Recompute activations in the backward pass (less memory, ~30% more compute) when
    # the LLM trains; transformers' gradient_checkpointing_enable.
    gradient_checkpointing: bool = False
    # Gated MLPs keep 2 of their 3 activations for backward and recompute act(gate)
    # (models/memory.py): a third less MLP activation memory, same results.
    lean_mlp: bool = True
    # Keys/values of a constant prompt prefix (chat scaffolding before the image or the
    # sentence) computed once while the LLM is frozen and reused by every batch; exact
    # (benchmarks/README.md: off costs align-clip ~1.4x).
    prefix_kv: bool = True


@dataclass
class LoraConfig:
    # LoRA adapters on the LLM through peft, for recipes that train the LLM (instruct,
    # discriminative). r=16, alpha=16 on all linear layers is VladVA's setting.
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # peft target_modules: ["all-linear"] (every linear layer but the LM head) or names
    # such as ["q_proj", "v_proj"].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class EmbeddingConfig:
    # E5-V style prompts (Ak et al., VladVA). "<image>" marks where visual tokens go,
    # "<sent>" where the text goes.
    image_prompt: str = "<image>\nSummarize above image in one word:"
    text_prompt: str = "<sent>\nSummarize above sentence in one word:"
    # Wrap prompts in the tokenizer's chat template (user turn + generation prompt).
    chat_template: bool = True
    # Subtract a mean last-token state (estimated on training captions, saved with the
    # checkpoint) before normalising; part of the embedding definition for training and
    # evaluation alike. On by default: SmolLM2's raw states are nearly collinear (mean
    # cosine ~0.99) and centring made the CLIP loss learn in 90 steps (FINDINGS.md).
    centre: bool = True
    # How many training captions estimate the mean state.
    centre_samples: int = 512
    # VladVA / Ak et al.: learned prompt embeddings (separate for images and texts),
    # initialised from the token embeddings of the handcrafted prompts above.
    soft_prompts: bool = False


@dataclass
class ObjectiveConfig:
    # Next-token loss on caption tokens (LLaVA stage 1).
    ntp_weight: float = 1.0
    # Global contrastive loss on prompted embeddings: "none", "clip" or "siglip".
    contrastive: str = "none"
    contrastive_weight: float = 1.0
    # CLIP: learnable logit scale, init 1/0.07; after each optimizer step its parameter is
    # clamped to [log min, log max] as CLIP and open_clip do (max 100, Radford et al.), so
    # a scale that overshoots still has a gradient and can come back.
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    min_logit_scale: float = 1.0
    # SigLIP: logit scale init 10 and bias init -10 (Zhai et al.).
    siglip_init_logit_scale: float = 10.0
    siglip_init_bias: float = -10.0
    # CG-VLM patch-token contrastive loss. The paper does not publish these; our choice:
    # weight 1, a 3x3 pooled grid, tau 0.05 (tau 0.1 stayed at chance here, FINDINGS.md).
    patch_weight: float = 0.0
    patch_pool: int = 3
    patch_tau: float = 0.05
    # A SigLIP form of the patch-token loss (losses.patch_sigmoid_loss), on the same
    # vectors, scale 1/patch_tau and bias siglip_init_bias; off by default (our addition,
    # not in CG-VLM).
    patch_sigmoid_weight: float = 0.0
    # How the step computes the losses (results equal either way; benchmarks/README.md
    # measures each): the LM head only at label positions (off: on every position, as an
    # HF causal LM with labels), and one LLM pass for both the prompted image state and
    # the next-token loss when captions continue the embedding prompt
    # (data.caption_format=prompted; off: the embedding takes its own pass).
    head_at_labels: bool = True
    shared_pass: bool = True


@dataclass
class DataConfig:
    # Folder of a dataset in the shapes layout: train.jsonl, val.jsonl, test.jsonl,
    # sugarcrepe_test.json, images/. Generated when missing and `generate_shapes` is on.
    root: str = "data/shapes"
    generate_shapes: bool = True
    shapes_n: int = 1280
    shapes_seed: int = 0
    # Explicit files override the layout above (paths relative to `root` or absolute).
    train_file: str = ""
    eval_file: str = ""
    compositional_file: str = ""
    # Which caption field trains the caption losses.
    caption_field: str = "caption"
    # "plain": [<image> x Q] caption <eos> (LLaVA stage 1); "prompted": the caption
    # continues the image embedding prompt, so one LLM pass serves both the embedding and
    # the next-token loss (align-clip then costs ~1.1x align instead of ~1.7x;
    # benchmarks/README.md). Training and held-out evaluation use the same format.
    caption_format: str = "plain"
    # Caption tokens kept (after the image tokens); longer captions are truncated and
    # counted.
    max_caption_tokens: int = 64
    # Evaluate on at most this many pairs (0: all).
    eval_max_samples: int = 0
    # Stream training pairs from webdataset tar shards (`vlmalign data shard`): an
    # index.json, its folder, or a brace pattern. Any recipe: conversation shards for
    # instruct, caption shards for the others; features and text states are then
    # computed each step instead of cached.
    shards: str = ""
    # Multiple-choice questions (ScienceQA style) for the instruct recipe's evaluation;
    # "" means the shapes layout's mcq_test.json.
    mcq_file: str = ""
    # Train on a seeded random subset of this share of the training records (CG-VLM's
    # data-efficiency experiment); the same fraction_seed gives the same subset.
    data_fraction: float = 1.0
    fraction_seed: int = 0
    # Conversations (instruct recipe): tokens per sequence, visual tokens included.
    max_conversation_tokens: int = 256
    # discriminative recipe (VladVA): captions shorter than short_max_tokens train the
    # contrastive loss, captions of long_min_tokens..long_max_tokens the next-token loss.
    short_field: str = "short_caption"
    long_field: str = "long_caption"
    short_max_tokens: int = 30
    long_min_tokens: int = 30
    long_max_tokens: int = 500
    # discriminative recipe: the long captions' next-token loss conditioned on the image
    # embedding prompt (`[prompt with <image>] long caption <eos>`, soft prompts included),
    # as VladVA trains it; off: `[<image> x Q] long caption <eos>` (LLaVA stage 1).
    long_caption_prompted: bool = False
    # Abort (before training) when more than this share of records was skipped as bad.
    max_skip_fraction: float = 0.5
    # Image paths in data files must stay inside the data root unless this is on.
    allow_outside_root: bool = False
    # DataLoader workers decoding images (data/loading.py): -1 automatic, 0 on a CPU-only
    # machine and 8 per GPU on CUDA (capped by the cores): one H100 with a ViT-L/14-336
    # tower takes ~1,000 images/s, one worker decodes ~155 (docs/scale.md, "Feeding a GPU").
    num_workers: int = -1
    # Page-locked batches for asynchronous copies to the GPU (CUDA only).
    pin_memory: bool = True
    # Batches each worker prepares ahead (torch's default is 2; workers only).
    prefetch_factor: int = 4
    # Benchmarks for the evaluation, by any name (relative to `root` or absolute): a
    # Karpathy-split JSON (COCO / Flickr30k retrieval) and a zero-shot folder
    # (`<class>/<image>`). "" uses the shapes layout's files when training on `shapes`.
    karpathy_file: str = ""
    zeroshot_dir: str = ""
    # With `train_file` set and no `eval_file`: this seeded share of the training file's
    # records (at most `heldout_max`) is held out of training and evaluated on.
    heldout_fraction: float = 0.1
    heldout_max: int = 1000
    heldout_seed: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/align"
    max_steps: int = 90
    batch_size: int = 16
    grad_accum_steps: int = 1
    # lr 1e-3 as LLaVA stage 1 uses for the projector; warmup because lr 1e-3 without it
    # was unstable here (FINDINGS.md).
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    # Save a checkpoint every N steps (0: only at the end).
    save_every: int = 0
    # Periodic checkpoints kept on disk (older ones are deleted; 0 keeps all). 3 as a
    # margin against a corrupt newest one; the final checkpoint is always kept.
    keep_checkpoints: int = 3
    # "" trains from scratch; a checkpoint folder, or "latest" (the newest complete
    # checkpoint-* under out_dir), continues that run exactly: weights, optimizer,
    # scheduler, RNG states and the position in the data order.
    resume: str = ""
    # Batch captions of similar length together (less padding; transformers'
    # group_by_length). Shuffling stays random across batches.
    group_by_length: bool = True
    # Precompute frozen vision features once instead of every step.
    cache_vision_features: bool = True
    # Folder for frozen tower features on disk (memory-mapped, keyed by tower weights +
    # image sha256), reused across runs and epochs; "" keeps them in memory only.
    feature_cache_dir: str = ""
    # Precompute text embeddings when nothing on the text path trains.
    cache_text_embeddings: bool = True
    # torch.compile the LLM's decoder layers (models/compiled.py). Off by default: on the
    # 2-core CPU it compiles for 3-6 minutes for ~10% faster steps, a gain only after
    # ~600+ steps (benchmarks/README.md); `vlmalign bench --ablate RECIPE` measures it.
    compile: bool = False
    # "no" (fp32), "bf16" (GPUs that support it) or "fp16"; "" takes the launcher's
    # setting (`accelerate launch --mixed_precision` or its config file), fp32 by default.
    mixed_precision: str = ""
    # Evaluate on the held-out split after training.
    eval_at_end: bool = True
    # Load trainable weights (projector, centring mean) from this checkpoint before
    # training: how `instruct` starts from an alignment run.
    init_from: str = ""
    # A step with a non-finite loss or gradient is skipped and counted; this many in a row
    # abort the run.
    max_nonfinite_steps: int = 5
    # Experiment trackers (Accelerate's): "tensorboard", "wandb", "mlflow", several, or
    # "none"; TensorBoard by default as it ships with the base install (train/runlog.py).
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    # Which evaluations run (after training and in `vlmalign eval`); each also needs its
    # file (see DataConfig), and is skipped with a line naming the file otherwise.
    retrieval: bool = True  # held-out pairs: retrieval, modality gap, held-out NTP loss
    compositional: bool = True  # SugarCrepe-style items (data.compositional_file)
    karpathy: bool = True  # data.karpathy_file
    zeroshot: bool = True  # data.zeroshot_dir
    mcq: bool = True  # multiple choice, recipes that evaluate it (data.mcq_file)


@dataclass
class Config:
    recipe: str = "align"
    # A transformers LLaVA folder (LlavaForConditionalGeneration) that supplies the vision
    # tower, the projector and the LLM, replacing vision.*, projector.type and llm.name
    # (llava_format.py); "" builds them from those settings.
    from_llava: str = ""
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (`.yaml`) or JSON (any other suffix)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to the annotated type `typ`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(typ)[:1] or (str,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(typ, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    return value


def _update(
    obj: Any,
    data: dict[str, Any],
    prefix: str = "",
    provenance: dict[str, str] | None = None,
    source: str = "",
) -> None:
    """Set fields of dataclass `obj` from `data`, recursing into nested dataclasses.
    When `provenance` is given, record `provenance[dotted_key] = source` for each value set."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config key {dotted!r}; known keys here: {', '.join(sorted(known))}"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {sorted(f.name for f in fields(current))}")
            _update(current, value, f"{dotted}.", provenance, source)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))
            if provenance is not None:
                provenance[dotted] = source


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-3", "recipe=align"] into a nested dict (values stay strings)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _update(cfg, data)
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    provenance: dict[str, str] | None = None,
) -> Config:
    """Read a YAML config (or start from defaults) and apply dotted overrides.

    When `provenance` (a dict) is given, it is filled with one entry per leaf key
    (`"train.lr"`) saying where the value came from: `"default"` (the dataclass),
    `"file:<path>"` (the YAML file) or `"override"` (the command line; the last word wins).
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            _update(cfg, data, provenance=provenance, source=f"file:{_display_path(path)}")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        _update(cfg, parse_overrides(overrides), provenance=provenance, source="override")
    if provenance is not None:
        for key in flat_config(cfg):
            provenance.setdefault(key, "default")
    return cfg


def _display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def flat_config(cfg: Config) -> dict[str, Any]:
    """Leaf values of `cfg` by dotted key, in declaration order: {"train.lr": 0.001, ...}."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def _yaml_scalar(value: Any) -> str:
    """One value as a YAML flow scalar on one line that reads back as the same value."""
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value, ensure_ascii=False)  # "\n" escapes; JSON strings are YAML
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("\n...\n").removesuffix("\n").strip()


def show_config(path_or_recipe: str | Path | None, overrides: list[str] | None = None) -> str:
    """`vlmalign config show`: the resolved config as YAML, each value followed by a
    comment saying where it came from (`# default`, `# file:configs/align.yaml`,
    `# override`). The text is itself a valid config file (`yaml.safe_load` of it,
    passed to `load_config`, gives the same config).

    `path_or_recipe` is a YAML path, a recipe id ("align-cg", resolved through
    vlmalign.paths.recipe_config) or None (defaults only).
    """
    path: Path | None = None
    if path_or_recipe is not None:
        path = Path(path_or_recipe)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            path = recipe_config(str(path_or_recipe))
    provenance: dict[str, str] = {}
    cfg = load_config(path, overrides, provenance=provenance)
    flat = flat_config(cfg)
    lines = [f"# resolved config: {_display_path(path) if path else 'defaults'}"
             + (f" + overrides {' '.join(overrides)}" if overrides else "")]
    body: list[tuple[str, str]] = []  # (text, provenance comment)
    section = ""
    for key, value in flat.items():
        head, _, leaf = key.rpartition(".")
        if head != section:
            body.append((f"{head}:", ""))
            section = head
        indent = "  " if head else ""
        body.append((f"{indent}{leaf}: {_yaml_scalar(value)}", provenance[key]))
    # Comments in one column; a long value (a prompt) pushes only its own comment out.
    width = min(max(len(text) for text, _ in body), 44) + 2
    for text, src in body:
        lines.append(f"{text}{' ' * max(width - len(text), 2)}# {src}" if src else text)
    return "\n".join(lines) + "\n"


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A deep copy of `cfg` with dotted overrides applied."""
    new = config_from_dict(dataclasses.asdict(cfg))
    _update(new, parse_overrides(overrides))
    return new
