"""Handcrafted prompts for prompted last-token embeddings (E5-V; Ak et al.; VladVA).

A prompt template holds `<image>` (where the visual tokens go) or `<sent>` (where the text
goes), and is wrapped in the tokenizer's chat template as a user turn followed by the
generation prompt, so the last token is the one that would start the answer.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

SENTENCE_MARK = "<sent>"


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
