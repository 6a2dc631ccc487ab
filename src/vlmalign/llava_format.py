"""The transformers LLaVA format (`LlavaForConditionalGeneration`), both ways.

Export (`write_llava`): a vlmalign model with an HF CLIP / SigLIP tower and the
`mlp2x_gelu` projector (LLaVA-1.5's) becomes a folder that plain transformers loads:

```
OUT/
  config.json, model.safetensors, generation_config.json   LlavaForConditionalGeneration
  tokenizer.json, tokenizer_config.json                    the LLM's tokenizer with <image>
  chat_template.jinja                                       content lists or strings (processor and tokenizer)
  processor_config.json                                     LlavaProcessor + CLIPImageProcessor
  vlmalign.safetensors, vlmalign_config.yaml               what LLaVA has no place for (below)
  README.md                                                 the model card (export.py)
```

How vlmalign's model maps onto LLaVA's:

| vlmalign | LLaVA |
| --- | --- |
| `HFVisionTower` (CLIP, CLS dropped / SigLIP) | `vision_tower`, `vision_feature_select_strategy` "default" / "full" |
| `vision.feature_layer` | `vision_feature_layer` |
| `MLPProjector` (`mlp.0`, GELU, `mlp.2`) | `multi_modal_projector` (`linear_1`, "gelu", `linear_2`) |
| the LLM's decoder and head (LoRA merged) | `language_model`, `lm_head` |
| `<image>`, id V just past the embedding table | `image_token_id` V, the table resized to V + 1 rows |

vlmalign puts visual tokens at the `<image>` positions before the embedding lookup, so its
LLM never needs a row for `<image>`; LLaVA looks `input_ids` up first and needs one. The
export adds that row (the mean of the others, transformers' default) and one more output
of the LM head: LLaVA's logits [..., :V] are vlmalign's, and the extra logit (the image
token) is the only difference.

Not expressible in LLaVA, kept in the sidecar `vlmalign.safetensors` (+ the resolved
config `vlmalign_config.yaml`) so that an import gives back the same model: the soft
prompts, the embedding centring mean and the contrastive logit scale / bias.

Import (`load_llava_parts`, `build_from_llava`): the vision tower, projector, LLM and
tokenizer come from one LLaVA folder (`from_llava=DIR` in the config), the LLM's extra
`<image>` row is dropped again when it is the table's last, and the sidecar, when the
folder has one, restores the soft prompts and the centring mean.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmalign.config import Config
from vlmalign.models.language import IMAGE_TOKEN, prepare_llm
from vlmalign.models.lora import add_lora, is_lora, merge_lora
from vlmalign.models.projector import MLPProjector
from vlmalign.models.vision import _HF_VISION_KINDS, HFVisionTower

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from vlmalign.models.vlm import VLM

log = logging.getLogger(__name__)

SIDECAR_WEIGHTS = "vlmalign.safetensors"
SIDECAR_CONFIG = "vlmalign_config.yaml"
# Model keys that travel in the sidecar (VLM buffers and soft prompts).
SIDECAR_PREFIXES = ("embed_mean", "image_soft.", "text_soft.")
OBJECTIVE_PREFIX = "objective."

EXPORTABLE = (
    "the LLaVA format holds an HF CLIP or SigLIP vision tower at its own resolution "
    "(vision.tower=hf or tiny, vision.image_size equal to the tower's) and the "
    "projector.type=mlp2x_gelu projector (LLaVA-1.5's)"
)


class NotExpressibleError(ValueError):
    """The checkpoint uses a part the LLaVA format has no place for."""


# --------------------------------------------------------------------------- checks


def llava_blockers(model: VLM) -> list[str]:
    """What keeps `model` from being written as a LLaVA folder (empty when nothing does)."""
    problems = []
    tower = model.vision
    if not isinstance(tower, HFVisionTower):
        problems.append(
            f"vision.tower={model.cfg.vision.tower} ({getattr(tower, 'name', type(tower).__name__)}) "
            "is not an HF CLIP / SigLIP tower"
        )
    elif tower.image_size != tower.native_image_size:
        problems.append(
            f"vision.image_size={tower.image_size} differs from the tower's own "
            f"{tower.native_image_size} (interpolated position embeddings)"
        )
    if not isinstance(model.projector, MLPProjector):
        problems.append(f"projector.type={model.cfg.projector.type} is not mlp2x_gelu")
    cap = getattr(model.llm.config, "final_logit_softcapping", None)
    if cap:
        problems.append(f"the LLM caps its logits (final_logit_softcapping={cap}), which LLaVA does not apply")
    vocab = model.llm.get_input_embeddings().num_embeddings
    if model.image_token_id > vocab:
        problems.append(
            f"{IMAGE_TOKEN} has id {model.image_token_id}, more than one past the embedding table ({vocab} rows)"
        )
    return problems


def check_exportable(model: VLM) -> None:
    """Raise `NotExpressibleError` naming each unsupported part and what can be exported."""
    problems = llava_blockers(model)
    if problems:
        raise NotExpressibleError(
            "this checkpoint cannot be written in the LLaVA format: " + "; ".join(problems)
            + f". {EXPORTABLE}. `vlmalign export CKPT --format vlmalign` exports any checkpoint."
        )


# --------------------------------------------------------------------------- export


def processor_chat_template(tokenizer_template: str) -> str:
    """The processor's chat template: LLaVA messages hold content lists
    (`[{"type": "image"}, {"type": "text", "text": ...}]`); they are turned into the plain
    strings the tokenizer's template expects (an image becomes `<image>` and a newline, as
    in vlmalign's prompts and LLaVA's data), then the tokenizer's template renders them."""
    prefix = (
        "{%- set ns = namespace(items=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set ns.items = ns.items + [m] -%}"
        "{%- else -%}{%- set t = namespace(s='') -%}"
        "{%- for c in m['content'] -%}"
        "{%- if c['type'] == 'image' -%}{%- set t.s = t.s + '" + IMAGE_TOKEN + "\\n' -%}"
        "{%- elif c['type'] == 'text' -%}{%- set t.s = t.s + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns.items = ns.items + [{'role': m['role'], 'content': t.s}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.items -%}"
    )
    return prefix + tokenizer_template


def _image_processor(tower: HFVisionTower):
    """vlmalign's preprocessing as a CLIPImageProcessor: RGB, bicubic resize to S x S (no
    crop, aspect ratio not kept), scale to [0, 1], the tower's mean and std."""
    from transformers import CLIPImageProcessor

    s = tower.image_size
    return CLIPImageProcessor(
        do_resize=True, size={"height": s, "width": s}, resample=3, do_center_crop=False,
        crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(tower.mean), image_std=list(tower.std), do_convert_rgb=True,
    )


def llava_config(model: VLM):
    """The LlavaConfig of `model` (its LLM's config as text_config, the tower's as
    vision_config)."""
    from transformers import LlavaConfig

    tower: HFVisionTower = model.vision
    text_config = model.llm.config
    return LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=model.image_token_id,
        image_seq_length=model.num_visual_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        vision_feature_layer=tower.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def sidecar_state(model: VLM, objective_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What LLaVA has no place for: soft prompts, the centring mean (and whether it was
    estimated), and the objective's learnable logit scale / bias (`objective.*`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(SIDECAR_PREFIXES)}
    for k, v in (objective_state or {}).items():
        state[OBJECTIVE_PREFIX + k] = v.detach().cpu().contiguous()
    return state


@torch.no_grad()
def to_llava(model: VLM):
    """A `LlavaForConditionalGeneration` made of `model`'s parts (LoRA merged, embedding
    table grown by the `<image>` row when needed). The LLaVA model shares the tower and the
    decoder with `model`, whose LLM is changed (merged, resized): use `model` no further."""
    from transformers import LlavaForConditionalGeneration

    check_exportable(model)
    llm = merge_lora(model.llm) if is_lora(model.llm) else model.llm
    vocab = llm.get_input_embeddings().num_embeddings
    config = llava_config(model)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = model.vision.model
    llava.model.language_model = llm.get_decoder()
    llava.lm_head = llm.get_output_embeddings()
    mlp = model.projector.mlp
    proj = type(llava.model.multi_modal_projector)(config)  # built on the CPU, then filled
    proj.linear_1.load_state_dict(mlp[0].state_dict())
    proj.linear_2.load_state_dict(mlp[2].state_dict())
    llava.model.multi_modal_projector = proj.to(mlp[0].weight.device)
    llava.generation_config = llm.generation_config
    left = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA parts without weights after assembly: {left[:5]}")
    if model.image_token_id >= vocab:  # vlmalign's <image> lies past the table: give it a row
        llava.resize_token_embeddings(model.image_token_id + 1, mean_resizing=True)
    llava.config.text_config.vocab_size = llava.get_input_embeddings().num_embeddings
    llava.requires_grad_(False)
    return llava.eval()


def save_processor(model: VLM, out: Path) -> None:
    """LlavaProcessor (image processor + tokenizer with `<image>` + chat template)."""
    import copy

    from transformers import LlavaProcessor

    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.padding_side = "left"  # batched generation continues every row at its end
    template = getattr(tokenizer, "chat_template", None)
    tower: HFVisionTower = model.vision
    processor = LlavaProcessor(
        image_processor=_image_processor(tower),
        tokenizer=tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        chat_template=processor_chat_template(template) if template else None,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if tower.has_cls else 0,
    )
    processor.save_pretrained(out)


def write_llava(model: VLM, out: str | Path, objective_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a LLaVA folder (weights, processor, sidecar, config) into `out`,
    which must exist and be empty. Consumes `model` (see `to_llava`)."""
    out = Path(out)
    sidecar = sidecar_state(model, objective_state)
    cfg = model.cfg
    save_processor(model, out)
    llava = to_llava(model)
    llava.save_pretrained(out)
    save_file(sidecar, str(out / SIDECAR_WEIGHTS), metadata={"format": "vlmalign-llava-sidecar/1"})
    cfg.save(out / SIDECAR_CONFIG)
    return out


# --------------------------------------------------------------------------- import


def read_llava_config(directory: str | Path):
    from transformers import AutoConfig

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"from_llava={directory}: no config.json there; give a LlavaForConditionalGeneration folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if config.model_type != "llava":
        raise ValueError(f"from_llava={directory} holds a {config.model_type!r} model, not 'llava' (LlavaForConditionalGeneration)")
    return config


def _check_importable(config, directory: Path) -> None:
    problems = []
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer} (several layers concatenated)")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={config.projector_hidden_act!r} (vlmalign's mlp2x_gelu uses exact GELU)")
    if not getattr(config, "multimodal_projector_bias", True):
        problems.append("a projector without biases")
    if config.vision_config.model_type not in _HF_VISION_KINDS:
        problems.append(f"a {config.vision_config.model_type!r} vision tower (vlmalign reads {sorted(_HF_VISION_KINDS)})")
    if problems:
        raise NotExpressibleError(f"from_llava={directory}: vlmalign cannot represent {'; '.join(problems)}")


def _image_mean_std(directory: Path, kind) -> tuple[list[float], list[float]]:
    """The folder's image processor mean/std (`processor_config.json` or the older
    `preprocessor_config.json`), else the tower kind's defaults."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        log.warning("from_llava=%s: no image processor (%s); using %s's mean and std", directory, e, kind.model_cls)
        return list(kind.mean), list(kind.std)
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None:
        return list(kind.mean), list(kind.std)
    return [float(m) for m in mean], [float(s) for s in std]


def _drop_image_row(llm: PreTrainedModel, image_token_id: int, tokenizer) -> None:
    """vlmalign keeps `<image>` past the embedding table: drop its row (and the head's)
    when it is the last one and the tokenizer ends with it (what a vlmalign export adds)."""
    rows = llm.get_input_embeddings().num_embeddings
    if image_token_id == rows - 1 and len(tokenizer) == rows:
        llm.resize_token_embeddings(rows - 1)


@torch.no_grad()
def load_llava_parts(cfg: Config) -> tuple[HFVisionTower, MLPProjector, nn.Module, Any]:
    """(vision tower, projector, LLM, tokenizer) from the LLaVA folder `cfg.from_llava`.

    The folder's tower, feature layer and projector replace `cfg.vision` / `cfg.projector`
    (their `frozen` flags still apply); the LLM gets the same treatment as `load_llm`
    (frozen per `cfg.llm.frozen`, lean MLPs, eval mode) and LoRA when `cfg.lora.enabled`.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    directory = Path(cfg.from_llava)
    config = read_llava_config(directory)
    _check_importable(config, directory)
    llava = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_id:
        raise ValueError(
            f"from_llava={directory}: the tokenizer's {IMAGE_TOKEN} has id {image_id}, the model's "
            f"image_token_id is {config.image_token_id}; vlmalign marks images with {IMAGE_TOKEN}"
        )

    # Vision tower: the folder's own class and weights, at its own resolution.
    kind = _HF_VISION_KINDS[config.vision_config.model_type]
    vision_model = llava.model.vision_tower
    if type(vision_model).__name__ != kind.model_cls:
        raise NotExpressibleError(f"from_llava={directory}: vision tower {type(vision_model).__name__}, expected {kind.model_cls}")
    mean, std = _image_mean_std(directory, kind)
    has_cls = config.vision_feature_select_strategy == "default"
    tower = HFVisionTower(
        vision_model, registry_id="llava", name=str(directory), image_size=int(config.vision_config.image_size),
        mean=mean, std=std, feature_layer=int(config.vision_feature_layer), has_cls=has_cls,
    )
    if cfg.vision.frozen:
        tower.freeze()

    # Projector: linear_1 -> GELU -> linear_2 is mlp2x_gelu.
    hidden = config.text_config.hidden_size
    projector = MLPProjector(tower.hidden_size, hidden, tower.grid)
    src = llava.model.multi_modal_projector
    projector.mlp[0].load_state_dict(src.linear_1.state_dict())
    projector.mlp[2].load_state_dict(src.linear_2.state_dict())
    if cfg.projector.frozen:
        projector.requires_grad_(False)

    # LLM: the decoder and head in the text model's causal-LM class.
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)
    base = llm.base_model_prefix
    setattr(llm, base, llava.model.language_model)
    llm.lm_head = llava.lm_head
    llm.generation_config = llava.generation_config
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"from_llava={directory}: LLM parts without weights: {left[:5]}")
    if llm.config.tie_word_embeddings:
        llm.tie_weights()
    _drop_image_row(llm, image_id, tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("from_llava=%s: the tokenizer has no chat template; prompts are used without one", directory)
    prepare_llm(llm, tokenizer, cfg.llm)
    if cfg.lora.enabled:
        llm = add_lora(llm, cfg.lora)
    log.info("loaded %s from %s (transformers %s)", type(llava).__name__, directory, transformers.__version__)
    return tower, projector, llm, tokenizer


def read_sidecar(directory: str | Path) -> dict[str, torch.Tensor]:
    """The sidecar tensors of a LLaVA folder written by vlmalign ({} for any other)."""
    path = Path(directory) / SIDECAR_WEIGHTS
    return load_file(str(path)) if path.is_file() else {}


def load_sidecar(model: VLM, directory: str | Path) -> list[str]:
    """Put the sidecar's soft prompts and centring mean into `model`; returns the keys
    loaded. A soft prompt of another shape (another prompt) is an error."""
    state = {k: v for k, v in read_sidecar(directory).items() if not k.startswith(OBJECTIVE_PREFIX)}
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        if key not in own:
            log.info("sidecar %s: %s is not used by this config (soft prompts off?)", directory, key)
            continue
        if own[key].shape != value.shape:
            raise ValueError(f"sidecar {directory}: {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
        usable[key] = value
    model.load_state_dict(usable, strict=False)
    return sorted(usable)


def build_from_llava(cfg: Config, vlm_cls: type[VLM]) -> VLM:
    """`vlm_cls(cfg, tower, projector, llm, tokenizer)` with the parts from the LLaVA
    folder `cfg.from_llava`, and the sidecar's soft prompts and centring mean when it has
    one (`VLM.build` calls this when `from_llava` is set)."""
    model = vlm_cls(cfg, *load_llava_parts(cfg))
    load_sidecar(model, cfg.from_llava)
    return model
