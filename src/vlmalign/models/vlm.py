"""The assembled vision-language model: vision tower -> projector -> causal LLM.

Sequences carry one `<image>` id per visual token; `splice` puts the projector's outputs at
those positions of the LLM input embeddings. The model offers:

- `visual_tokens`: images (or cached tower features) -> [B, Q, D];
- `sequence_states`: final hidden states of spliced sequences (captions, conversations),
  continuing the cached prompt prefix when it can; `output_head` gives the LM head's
  weights, so the objective (objective.py) computes the next-token loss where it wants;
- `image_states` / `text_states`: prompted last-token hidden states (E5-V style);
- `embed_images` / `embed_texts`: L2-normalised (optionally centred) embeddings, no grad;
- `generate`: captions or answers;
- `save_pretrained` / `from_pretrained`: one folder that reloads exactly.

[Contract] The model returns states and never computes a loss: one batch flows
vision -> projector -> splice -> LLM -> objective -> losses. Switches that change how
states are computed without changing them (`llm.prefix_kv`, `llm.lean_mlp`) are read
from the config set by `set_config`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache

from vlmalign.config import Config, load_config
from vlmalign.models import memory
from vlmalign.models.language import IMAGE_TOKEN, load_llm
from vlmalign.models.lora import add_lora, is_lora, lora_parameters
from vlmalign.models.projector import build_projector
from vlmalign.models.prompts import (
    CAPTION_FORMATS,
    IGNORE_INDEX,
    SENTENCE_MARK,
    CaptionPrompt,
    PromptTemplate,
    SoftPrompt,
    expand_image_tokens,
    leading_special_ids,
)
from vlmalign.models.vision import build_vision_tower

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class PromptPrefix:
    """Keys/values of a constant prompt prefix (e.g. the chat template's system turn),
    computed once per frozen LLM and expanded to each batch; recomputed on every call
    while the LLM has trainable parameters."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = list(ids)
        self._kv: list[tuple[Tensor, Tensor]] | None = None

    def clear(self) -> None:
        self._kv = None

    def expand(self, model: VLM, batch: int, device: torch.device) -> DynamicCache:
        kv = self._kv
        if kv is None or kv[0][0].device != device or not model.llm_frozen():
            ids = torch.tensor([self.ids], device=device)
            embeds = model.input_embeddings(ids)
            out = model.llm.get_decoder()(inputs_embeds=embeds, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if model.llm_frozen():
                kv = [(k.detach(), v.detach()) for k, v in kv]
                self._kv = kv
        cache = DynamicCache(config=model.llm.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache


class VLM(nn.Module):
    def __init__(self, cfg: Config, vision: nn.Module, projector: nn.Module, llm: nn.Module, tokenizer) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.hidden_size = llm.get_input_embeddings().embedding_dim
        # Mean prompted last-token state, subtracted before normalising when
        # cfg.embedding.centre is on; estimated on training captions, saved with the weights.
        self.register_buffer("embed_mean", torch.zeros(self.hidden_size))
        self.register_buffer("embed_mean_ready", torch.zeros((), dtype=torch.bool))
        self.set_config(cfg)

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(cls, cfg: Config) -> VLM:
        """Build every part from the config: tower, LLM (+ tokenizer), fresh projector."""
        if cfg.from_llava:  # tower, projector and LLM from one LLaVA folder (llava_format.py)
            from vlmalign.llava_format import build_from_llava

            return build_from_llava(cfg, cls)
        vision = build_vision_tower(cfg.vision)
        llm, tokenizer = load_llm(cfg.llm)
        if cfg.lora.enabled:
            llm = add_lora(llm, cfg.lora)
        hidden = llm.get_input_embeddings().embedding_dim
        projector = build_projector(cfg.projector, vision.hidden_size, hidden, vision.grid)
        return cls(cfg, vision, projector, llm, tokenizer)

    @property
    def num_visual_tokens(self) -> int:
        return self.projector.num_tokens

    @property
    def device(self) -> torch.device:
        return self.projector_device()

    def projector_device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def adopt_switches(self, cfg: Config) -> None:
        """Take `cfg` whose embedding settings equal the current ones (the same recipe with
        other optimisation switches, or another recipe on the same prompts): the config and
        `llm.lean_mlp`, keeping the prompts and their cached prefixes."""
        self.cfg = cfg
        memory.set_lean(self.llm, cfg.llm.lean_mlp)

    def set_config(self, cfg: Config) -> None:
        """Adopt `cfg` (e.g. another recipe on the same backbone): `adopt_switches`, then
        rebuild the prompt templates, their cached prefixes and (when enabled) the soft
        prompts."""
        self.adopt_switches(cfg)
        e, tok = cfg.embedding, self.tokenizer
        self.image_template = PromptTemplate.build(tok, e.image_prompt, IMAGE_TOKEN, e.chat_template)
        self.text_template = PromptTemplate.build(tok, e.text_prompt, SENTENCE_MARK, e.chat_template)
        table = self.llm.get_input_embeddings()
        for name, template in (("image_soft", self.image_template), ("text_soft", self.text_template)):
            current = getattr(self, name, None)
            n = len(template.before) + len(template.after)
            if not e.soft_prompts:
                current = None
            elif current is None or current.vectors.shape[0] != n:
                current = SoftPrompt(template, table).to(self.projector_device())
            setattr(self, name, current)
        # The scaffolding (and the template text unless it is soft) before the image / the
        # sentence is the same for every sample: with a frozen LLM its keys and values are
        # computed once and reused (PromptPrefix).
        self._image_prefix = PromptPrefix(self._prefix_ids(self.image_template, self.image_soft))
        self._text_prefix = PromptPrefix(self._prefix_ids(self.text_template, self.text_soft))

    @staticmethod
    def _prefix_ids(template: PromptTemplate, soft: SoftPrompt | None) -> list[int]:
        return list(template.head) + ([] if soft is not None else list(template.before))

    # ----------------------------------------------------------------- vision
    def preprocess(self, images: list[Image.Image]) -> Tensor:
        return self.vision.preprocess(images)

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, P, Dv]; no grad when no tower weight trains."""
        if not any(p.requires_grad for p in self.vision.parameters()):
            with torch.no_grad():
                return self.vision(pixel_values)
        return self.vision(pixel_values)

    def visual_tokens(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Images or cached tower features [B, P, Dv] -> visual tokens [B, Q, D]."""
        if features is None:
            if pixel_values is None:
                raise ValueError("visual_tokens needs pixel_values or features")
            features = self.tower_features(pixel_values)
        return self.projector(features.to(self.projector_device()))

    # ----------------------------------------------------------------- LLM passes
    def input_embeddings(self, input_ids: Tensor) -> Tensor:
        """Token embeddings from the LLM's input table; image ids map to a dummy row."""
        safe = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.llm.get_input_embeddings()(safe)  # [B, T, D]

    def splice(self, input_ids: Tensor, visual: Tensor) -> Tensor:
        """Input embeddings [B, T, D] with the visual tokens [B, Q, D] at the image ids."""
        embeds = self.input_embeddings(input_ids)
        is_image = input_ids == self.image_token_id
        per_row = is_image.sum(dim=1)
        if not torch.all(per_row == visual.shape[1]):
            raise ValueError(
                f"each sequence must hold {visual.shape[1]} image positions, found {per_row.tolist()}"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor, visual: Tensor | None = None, prefix: PromptPrefix | None = None
    ) -> Tensor:
        """Final-layer hidden states [B, T, D] (after the final norm) of the spliced sequence.
        With `prefix`, the sequence continues the prefix's cached keys/values (exact: the
        same numbers as running the prefix tokens in front, without recomputing them)."""
        embeds = self.splice(input_ids, visual) if visual is not None else self.input_embeddings(input_ids)
        return self.decode(embeds, attention_mask, prefix)

    def decode(self, embeds: Tensor, attention_mask: Tensor, prefix: PromptPrefix | None = None) -> Tensor:
        """The LLM decoder on input embeddings [B, T, D] -> final hidden states [B, T, D]."""
        kwargs: dict = {"use_cache": False}
        if prefix is not None and len(prefix.ids):
            b = embeds.shape[0]
            kwargs = {"use_cache": True, "past_key_values": prefix.expand(self, b, embeds.device)}
            ones = attention_mask.new_ones(b, len(prefix.ids))
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state

    def llm_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.llm.parameters())

    def text_path_frozen(self) -> bool:
        """Whether nothing on the text path trains (text states are then constants that
        can be cached): a frozen LLM and no trainable text soft prompt."""
        soft = self.text_soft
        return self.llm_frozen() and (soft is None or not soft.vectors.requires_grad)

    def unfreeze(self, part: str) -> None:
        """Make one part trainable: "projector", "vision", or "llm" (its LoRA adapters
        only when the LLM carries them, else every weight)."""
        if part not in ("projector", "vision", "llm", "soft_prompts"):
            raise ValueError(f"unknown model part {part!r}; parts: projector, vision, llm, soft_prompts")
        if part == "soft_prompts":
            for soft in (self.image_soft, self.text_soft):
                if soft is not None:
                    soft.requires_grad_(True)
            return
        if part == "llm" and is_lora(self.llm):
            for p in lora_parameters(self.llm):
                p.requires_grad_(True)
        else:
            getattr(self, part).requires_grad_(True)
        if part == "llm" and self.cfg.llm.gradient_checkpointing:
            # Non-reentrant: works when the inputs (spliced embeddings) need no grad.
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def caption_prompt(self, fmt: str | None = None) -> CaptionPrompt | None:
        """The ids around the visual tokens of a caption sequence, for `fmt` (default: the
        config's `data.caption_format`): None for "plain" (`[<image> x Q] caption <eos>`),
        the image embedding prompt for "prompted" (`[head][<image> x Q][suffix][tail]
        caption <eos>`), whose last prompt state is then `image_states` of the same visual
        tokens. Pass it to `CaptionCollator(prompt=...)` in training and evaluation alike."""
        fmt = fmt if fmt is not None else getattr(self.cfg.data, "caption_format", "plain")
        if fmt not in CAPTION_FORMATS:
            raise ValueError(f"data.caption_format={fmt!r}; choose one of {', '.join(CAPTION_FORMATS)}")
        if fmt == "plain":
            return None
        t, soft = self.image_template, self.image_soft is not None
        return CaptionPrompt(before=(*t.head, *t.before), after=(*t.after, *t.tail),
                             soft_before=((False,) * len(t.head) + (True,) * len(t.before)) if soft else (),
                             soft_after=((True,) * len(t.after) + (False,) * len(t.tail)) if soft else ())

    def prefix_cut(self, input_ids: Tensor, labels: Tensor, use_cache: bool | None = None) -> int:
        """How many leading tokens of every row equal the cached image-prompt prefix and can
        come from its keys/values: 0 unless the cache is on (`use_cache`, default
        `prefix_cache_on()`), all rows start with it and no label lies in it or right after
        it (its prediction would need the prefix state)."""
        ids = self._image_prefix.ids
        n = len(ids)
        if not n or input_ids.shape[1] <= n or not (self.prefix_cache_on() if use_cache is None else use_cache):
            return 0
        head = torch.tensor(ids, device=input_ids.device)
        same = bool((input_ids[:, :n] == head).all())
        return n if same and bool((labels[:, : n + 1] == IGNORE_INDEX).all()) else 0

    def prefix_cache_on(self) -> bool:
        """Whether constant prompt prefixes come from cached keys/values (`llm.prefix_kv`
        and a frozen LLM)."""
        return self.cfg.llm.prefix_kv and self.llm_frozen()

    def sequence_states(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, visual: Tensor,
        soft_mask: Tensor | None = None,
    ) -> tuple[Tensor, int]:
        """Final hidden states of spliced sequences [B, T] (captions, conversations) and
        the number of leading positions they leave out: (hidden [B, T - cut, D], cut).

        Sequences that start with the image prompt's constant prefix (the "prompted"
        caption format) continue its cached keys/values (`prefix_cut`; exact, the prefix
        holds no label), so hidden[:, t] is the state of position cut + t. `labels` [B, T]
        only decide the cut. `soft_mask` [B, T] (prompted captions with soft prompts,
        `CaptionPrompt.soft_mask`): where the image prompt's learned vectors go."""
        cut = self.prefix_cut(input_ids, labels)
        prefix = self._image_prefix if cut else None
        if soft_mask is None or self.image_soft is None or not bool(soft_mask.any()):
            return self.hidden_states(input_ids[:, cut:], attention_mask[:, cut:], visual, prefix), cut
        embeds = self.image_soft.scatter(self.splice(input_ids[:, cut:], visual), soft_mask[:, cut:].to(input_ids.device))
        return self.decode(embeds, attention_mask[:, cut:], prefix), cut

    def output_head(self) -> tuple[Tensor, Tensor | None, float | None]:
        """The LM head as tensors: (weight [V, D], bias [V] or None, final-logit softcap or
        None), for the objective's next-token loss."""
        head = self.llm.get_output_embeddings()
        return head.weight, head.bias, getattr(self.llm.config, "final_logit_softcapping", None)

    # ----------------------------------------------------------------- embeddings
    def prompt_batch(
        self, kind: str, middles: list[list[int]], use_cache: bool | None = None
    ) -> tuple[Tensor, Tensor, Tensor, PromptPrefix | None]:
        """Right-padded ids, attention mask and soft-position mask [B, T] of the `kind`
        ("image" or "text") embedding prompt around each middle, without its constant
        prefix when that comes from cached keys/values (`use_cache`, default
        `prefix_cache_on()`; the prefix is then also returned)."""
        template, soft, prefix = ((self.image_template, self.image_soft, self._image_prefix) if kind == "image"
                                  else (self.text_template, self.text_soft, self._text_prefix))
        cut = len(prefix.ids) if (self.prefix_cache_on() if use_cache is None else use_cache) else 0
        rows = [template.ids(m) for m in middles]
        rows = [(ids[cut:], soft_mask[cut:]) for ids, soft_mask in rows]
        t = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        dev = self.projector_device()
        ids = torch.tensor([r + [pad] * (t - len(r)) for r, _ in rows], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r, _ in rows], device=dev)
        soft_mask = torch.tensor([m + [False] * (t - len(m)) for _, m in rows], device=dev)
        return ids, mask, soft_mask, (prefix if cut else None)

    def sentence_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts for the text prompt, each cut to data.long_max_tokens."""
        limit = self.cfg.data.long_max_tokens
        return [ids[:limit] for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def image_states(self, visual: Tensor) -> Tensor:
        """Prompted last-token states [B, D] for visual tokens [B, Q, D] (all prompts share
        one length, so there is no padding)."""
        b = visual.shape[0]
        middle = [self.image_token_id] * self.num_visual_tokens
        ids, mask, soft_mask, prefix = self.prompt_batch("image", [middle])
        ids, mask, soft_mask = ids.expand(b, -1), mask.expand(b, -1), soft_mask.expand(b, -1)
        embeds = self.splice(ids, visual)  # [B, T, D]
        if self.image_soft is not None:
            embeds = self.image_soft.scatter(embeds, soft_mask)
        return self.decode(embeds, mask, prefix)[:, -1]

    def text_states(self, texts: list[str]) -> Tensor:
        """Prompted last-token states [B, D] of texts under the text prompt (each text cut
        to data.long_max_tokens tokens)."""
        ids, mask, soft_mask, prefix = self.prompt_batch("text", self.sentence_ids(texts))
        embeds = self.input_embeddings(ids)  # [B, T, D]
        if self.text_soft is not None:
            embeds = self.text_soft.scatter(embeds, soft_mask)
        hidden = self.decode(embeds, mask, prefix)
        last = mask.sum(dim=1) - 1  # right padding: last real position
        return hidden[torch.arange(len(texts), device=ids.device), last]

    def finish_embedding(self, states: Tensor) -> Tensor:
        """States [B, D] -> embeddings: subtract the mean state when centring, L2-normalise."""
        if self.cfg.embedding.centre:
            if not bool(self.embed_mean_ready):
                raise RuntimeError(
                    "embedding.centre is on but no mean state was estimated; "
                    "call model.set_embedding_mean(...) on training captions first"
                )
            states = states - self.embed_mean.to(states.dtype)
        return F.normalize(states, dim=-1)

    def set_embedding_mean(self, states: Tensor) -> None:
        """Store the mean of raw states [N, D] as the centring vector."""
        self.embed_mean.copy_(states.mean(dim=0).to(self.embed_mean.dtype))
        self.embed_mean_ready.fill_(True)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image] | Tensor, batch_size: int = 32) -> Tensor:
        """L2-normalised image embeddings [N, D]: PIL images, or cached features [N, P, Dv]."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            if isinstance(chunk, Tensor):
                visual = self.visual_tokens(features=chunk)
            else:
                pixels = self.preprocess(list(chunk)).to(self.projector_device())
                visual = self.visual_tokens(pixel_values=pixels)
            out.append(self.finish_embedding(self.image_states(visual)))
        return torch.cat(out) if out else torch.zeros(0, self.hidden_size)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """L2-normalised text embeddings [N, D]."""
        out = [
            self.finish_embedding(self.text_states(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.hidden_size)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None = None,
        features: Tensor | None = None,
        prompt: str = "",
        max_new_tokens: int = 32,
    ) -> list[str]:
        """Greedy text after the visual tokens (and an optional text prompt, e.g. a chat
        turn); with no prompt this is LLaVA stage-1 captioning."""
        visual = self.visual_tokens(pixel_values, features)
        b = visual.shape[0]
        prefix = [*leading_special_ids(self.tokenizer), *[self.image_token_id] * self.num_visual_tokens]
        if prompt:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            if self.image_token_id in ids:
                prefix = expand_image_tokens(ids, self.image_token_id, self.num_visual_tokens)
            else:
                prefix = prefix + ids
        ids = torch.tensor(prefix, device=visual.device).expand(b, -1)
        embeds = self.splice(ids, visual)
        # The text before the image (e.g. a chat template's system turn) is the same for
        # every row: its keys/values are computed once and shared, not per row. generate
        # takes the whole sequence and runs only the positions after the cache.
        head = prefix.index(self.image_token_id) if self.image_token_id in prefix else 0
        cached = {"past_key_values": PromptPrefix(prefix[:head]).expand(self, b, visual.device)} if head else {}
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            **cached,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ----------------------------------------------------------------- save / load
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint holds: the projector, the centring buffers, and every other
        parameter that is trainable (an unfrozen LLM or tower); frozen backbones reload
        from their own sources."""
        state = self.state_dict()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        keep = {}
        for name, tensor in state.items():
            if name.startswith(("projector.", "embed_mean", "image_soft.", "text_soft.")) or name in trainable or "lora_" in name:
                keep[name] = tensor.detach().contiguous().cpu()
        return keep

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(directory / WEIGHTS_NAME))
        self.cfg.save(directory / CONFIG_NAME)
        return directory

    def load_trainable(self, directory: str | Path) -> None:
        """Load a checkpoint's weights into this model; every saved key must exist here."""
        state = load_file(str(Path(directory) / WEIGHTS_NAME))
        missing = self.load_state_dict(state, strict=False)
        self._image_prefix.clear()
        self._text_prefix.clear()
        unexpected = list(missing.unexpected_keys)
        if unexpected:
            raise ValueError(f"{directory}: weights that this model does not have: {unexpected[:5]}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: list[str] | None = None) -> VLM:
        """Rebuild the model from `directory/config.yaml` and load its weights."""
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{directory} is not a vlmalign checkpoint (no {WEIGHTS_NAME})")
        cfg = load_config(directory / CONFIG_NAME, overrides)
        model = cls.build(cfg)
        model.load_trainable(directory)
        return model
