"""Tokenisation, label masks and batching for caption data.

A caption sample becomes `[<image> x Q] caption <eos>` (LLaVA stage-1 "plain" format), or,
with a `CaptionPrompt` ("prompted" format), the image embedding prompt followed by the
caption: `[chat head][<image> x Q][prompt suffix][chat tail] caption <eos>`. Labels are -100
on the image and prompt positions and on padding, so the next-token loss sees only the
caption and its end token. In the prompted format the hidden state right before the caption
is the prompted image embedding (E5-V style), so one LLM pass serves both the embedding and
the next-token loss (objective.py). The caption's own token ids (no image, no eos) are kept
apart for the patch-token contrastive loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlmalign.data.images import load_image
from vlmalign.data.sample import Sample
from vlmalign.models.prompts import (
    CAPTION_FORMATS,
    IGNORE_INDEX,
    CaptionPrompt,
    leading_special_ids,
)

__all__ = ["CAPTION_FORMATS", "IGNORE_INDEX", "CaptionCollator", "CaptionDataset", "CaptionPrompt"]


class CaptionDataset(Dataset):
    """Samples with, per item, cached tower features or a preprocessed image, and (when
    the text path is frozen) the cached raw prompted text state of the caption."""

    def __init__(
        self,
        samples: list[Sample],
        features: Tensor | None = None,
        text_states: Tensor | None = None,
        preprocess=None,
    ) -> None:
        if features is None and preprocess is None:
            raise ValueError("CaptionDataset needs cached features or a preprocess function")
        if features is not None and len(features) != len(samples):
            raise ValueError(f"{len(features)} feature rows for {len(samples)} samples")
        self.samples = samples
        self.features = features
        self.text_states = text_states
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        item: dict = {"index": i, "caption": s.caption}
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["pixel_values"] = self.preprocess([load_image(s.image)])[0]
        if self.text_states is not None:
            item["text_state"] = self.text_states[i]
        return item


@dataclass
class CaptionCollator:
    """Builds a batch dict: input_ids, attention_mask, labels [B, T]; caption_ids,
    caption_mask [B, Tc]; features or pixel_values; text_states when cached; captions.
    With `prompt` (prompted format) it also holds `prompt_state_at`: the position (same in
    every row) of the last prompt token, whose final hidden state is the image embedding,
    and, with soft prompts, `soft_mask` [B, T] (where the learned prompt vectors go)."""

    tokenizer: object
    image_token_id: int
    num_visual_tokens: int
    max_caption_tokens: int = 64
    prompt: CaptionPrompt | None = None
    truncated: int = field(default=0, init=False)

    def caption_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > self.max_caption_tokens:
            self.truncated += 1
            ids = ids[: self.max_caption_tokens]
        return ids

    def __call__(self, items: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        image = [self.image_token_id] * self.num_visual_tokens
        if self.prompt is not None:  # [before][<image> x Q][after]: the image embedding prompt
            image = [*self.prompt.before, *image, *self.prompt.after]
        else:  # plain: the tokenizer's own leading ids (Gemma's <bos>) first, untrained
            image = [*leading_special_ids(self.tokenizer), *image]
        caps = [self.caption_ids(it["caption"]) for it in items]
        seqs = [image + c + [eos] for c in caps]
        labels = [[IGNORE_INDEX] * len(image) + c + [eos] for c in caps]
        t = max(len(s) for s in seqs)
        tc = max(1, max(len(c) for c in caps))
        batch = {
            "input_ids": torch.tensor([s + [pad] * (t - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (t - len(lab)) for lab in labels]),
            "caption_ids": torch.tensor([c + [pad] * (tc - len(c)) for c in caps]),
            "caption_mask": torch.tensor([[1] * len(c) + [0] * (tc - len(c)) for c in caps]),
            "captions": [it["caption"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
        }
        if self.prompt is not None:
            batch["prompt_state_at"] = len(image) - 1  # last prompt token, before the caption
            soft = self.prompt.soft_mask(self.num_visual_tokens)
            if soft:  # soft prompts: where their vectors go (same positions in every row)
                batch["soft_mask"] = torch.tensor([soft + [False] * (t - len(soft))] * len(seqs))
        for key, out in (("features", "features"), ("pixel_values", "pixel_values"), ("text_state", "text_states")):
            if key in items[0]:
                batch[out] = torch.stack([it[key] for it in items])
        return batch
