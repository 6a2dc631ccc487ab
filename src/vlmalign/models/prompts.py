"""Handcrafted and soft prompts for prompted last-token embeddings (E5-V; Ak et al.; VladVA).

A prompt template holds `<image>` (where the visual tokens go) or `<sent>` (where the text
goes), and is wrapped in the tokenizer's chat template as a user turn followed by the
generation prompt, so the last token is the one that would start the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

SENTENCE_MARK = "<sent>"
# Label of positions that train nothing (prompt, image, padding): HF's ignore index.
IGNORE_INDEX = -100
# Caption sequences: "plain" `[<image> x Q] caption <eos>` (LLaVA stage 1), or "prompted"
# (the caption continues the image embedding prompt; `CaptionPrompt`).
CAPTION_FORMATS = ("plain", "prompted")


@dataclass(frozen=True)
class CaptionPrompt:
    """Token ids around the visual tokens in the "prompted" caption format: `before`
    (chat head + template text before `<image>`) and `after` (template text after it + the
    chat tail up to the generation prompt). `VLM.caption_prompt()` builds it from the image
    embedding template, so the caption continues exactly the image embedding prompt.
    With soft prompts, `soft_before` / `soft_after` flag the positions of `before` /
    `after` that hold the template's text (the learned vectors go there, as in the
    embedding pass); empty: no soft positions."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    soft_before: tuple[bool, ...] = ()
    soft_after: tuple[bool, ...] = ()

    def soft_mask(self, num_visual_tokens: int) -> list[bool]:
        """Which positions of `[before][<image> x Q][after]` hold soft-prompt vectors."""
        if not self.soft_before and not self.soft_after:
            return []
        before = list(self.soft_before) or [False] * len(self.before)
        after = list(self.soft_after) or [False] * len(self.after)
        return [*before, *[False] * num_visual_tokens, *after]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str, chat_template: bool, sentence: str | None = None
) -> str:
    """Fill `<sent>` with `sentence` and wrap the result in the chat template if asked."""
    text = template
    if sentence is not None:
        if SENTENCE_MARK not in template:
            raise ValueError(f"the text prompt {template!r} has no {SENTENCE_MARK} placeholder")
        text = template.replace(SENTENCE_MARK, sentence)
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (e.g. Gemma's `<bos>`; none for SmolLM2):
    sequences built from pieces must start with them, or such models see text they were
    never trained on (Gemma-3-270M's caption loss: 12.05 without `<bos>`, 3.91 with)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    n = len(full) - len(plain)
    return list(full[:n]) if n > 0 and list(full[n:n + len(plain)]) == list(plain) else []


def expand_image_tokens(ids: list[int], image_token_id: int, num_tokens: int) -> list[int]:
    """Replace the single image placeholder id in `ids` by `num_tokens` copies of it."""
    count = ids.count(image_token_id)
    if count != 1:
        raise ValueError(
            f"expected exactly one <image> placeholder in the prompt, found {count}; "
            "put one '<image>' in embedding.image_prompt"
        )
    at = ids.index(image_token_id)
    return ids[:at] + [image_token_id] * num_tokens + ids[at + 1 :]


PLACEHOLDER = "\x00"  # stands for the image / sentence while rendering the chat template


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt cut into token pieces: chat scaffolding `head`, the template's own text
    `before` and `after` the placeholder (what soft prompts replace), and scaffolding `tail`
    (end of turn, generation prompt). Pieces are tokenised separately, so the template's
    tokens are the same for every image or sentence put in the middle."""

    head: tuple[int, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]
    tail: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, template: str, placeholder: str, chat_template: bool) -> PromptTemplate:
        """Split `template` at `placeholder` ("<image>" or "<sent>") and wrap it in the chat
        template (as `render_prompt` does)."""
        if template.count(placeholder) != 1:
            raise ValueError(f"the prompt {template!r} must hold {placeholder} exactly once")
        before, after = template.split(placeholder)
        scaffold = render_prompt(tokenizer, PLACEHOLDER, chat_template)
        head, tail = scaffold.split(PLACEHOLDER)

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False).input_ids) if text else ()

        return cls(ids(head), ids(before), ids(after), ids(tail))

    def ids(self, middle: list[int]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole prompt around `middle`, and which positions hold the
        template's own text (`before` and `after`)."""
        ids = [*self.head, *self.before, *middle, *self.after, *self.tail]
        soft = [False] * len(self.head) + [True] * len(self.before) + [False] * len(middle)
        soft += [True] * len(self.after) + [False] * len(self.tail)
        return ids, soft


class SoftPrompt(nn.Module):
    """Learned embeddings for the template text of one prompt (VladVA; Ak et al.),
    initialised from the token embeddings of the handcrafted prompt and inserted where its
    tokens would be. `vectors` [n_before + n_after, D]."""

    def __init__(self, template: PromptTemplate, embedding: nn.Embedding) -> None:
        super().__init__()
        ids = torch.tensor([*template.before, *template.after], dtype=torch.long)
        with torch.no_grad():
            init = embedding(ids.to(embedding.weight.device)).detach().clone()
        self.vectors = nn.Parameter(init.float())  # [n, D]

    def scatter(self, embeds: Tensor, soft_mask: Tensor) -> Tensor:
        """Put the vectors at the True positions of `soft_mask` [B, T] (each row holds
        exactly n of them, in order) of `embeds` [B, T, D]."""
        b = embeds.shape[0]
        values = self.vectors.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, n, D]
        return embeds.masked_scatter(soft_mask.unsqueeze(-1), values)
