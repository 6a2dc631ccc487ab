"""Using a trained checkpoint: one loading path for `vlmalign chat`, `caption`, `embed` and
`search`, and a multi-turn chat session over one image.

The chat renders the conversation with the tokenizer's chat template exactly as the
instruct recipe's training data is rendered (data/conversations.py): the image marker at
the start of the first user turn, then the generation prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlmalign.data.images import load_image
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.vlm import VLM

log = logging.getLogger(__name__)


def load_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> VLM:
    """A checkpoint folder (or a run folder: its `latest` checkpoint) ready for inference:
    eval mode, no gradients."""
    path = Path(checkpoint)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    model = VLM.from_pretrained(path, overrides)
    model.requires_grad_(False)
    return model.eval()


class ChatSession:
    """A conversation about one image: `ask(question)` returns the model's answer and
    keeps both in the history, so follow-up questions see the earlier turns."""

    def __init__(self, model: VLM, image: str | Path, max_new_tokens: int = 64, system_prompt: str | None = None) -> None:
        self.model = model
        self.pixel_values = model.preprocess([load_image(image)]).to(model.projector_device())
        self.features = None
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})

    def prompt(self, question: str) -> str:
        """The rendered prompt for the next answer (chat template + generation prompt)."""
        first = not any(m["role"] == "user" for m in self.messages)
        content = f"{IMAGE_TOKEN}\n{question.strip()}" if first else question.strip()
        messages = [*self.messages, {"role": "user", "content": content}]
        tok = self.model.tokenizer
        if not getattr(tok, "chat_template", None):
            return "\n".join(m["content"] for m in messages) + "\n"
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def ask(self, question: str) -> str:
        if not question.strip():
            raise ValueError("empty question")
        if self.features is None:  # the tower runs once per session
            self.features = self.model.tower_features(self.pixel_values)
        answer = self.model.generate(features=self.features, prompt=self.prompt(question),
                                     max_new_tokens=self.max_new_tokens)[0]
        first = not any(m["role"] == "user" for m in self.messages)
        content = f"{IMAGE_TOKEN}\n{question.strip()}" if first else question.strip()
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        return answer
