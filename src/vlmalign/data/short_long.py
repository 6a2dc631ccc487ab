"""Short and long captions for the discriminative recipe (VladVA, Ouali et al. 2025): each
caption of a sample goes by its token length to the contrastive loss (short: fewer than
`short_max_tokens`) or to the next-token loss (long: `long_min_tokens` to
`long_max_tokens`); a sample with both contributes to both losses.

Every caption field the sample has (`short_field`, `long_field`) is sorted by length, not
by its name, so "short" data with a long caption still trains the right loss; a sample
with no usable caption is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlmalign.config import DataConfig
from vlmalign.data.collate import CaptionCollator
from vlmalign.data.images import load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.models.prompts import CaptionPrompt


@dataclass
class ShortLong:
    """One sample's contrastive caption (`short`, or "") and next-token caption (`long`)."""

    short: str
    long: str


def split_captions(samples: list[Sample], tokenizer, cfg: DataConfig, report: LoadReport | None = None) -> tuple[list[int], list[ShortLong]]:
    """(indices of the samples kept, their short/long captions). When a sample holds two
    captions of the same kind, the one from `short_field` (short) or `long_field` (long)
    wins."""
    report = report if report is not None else LoadReport()
    keep: list[int] = []
    out: list[ShortLong] = []
    for i, s in enumerate(samples):
        short = long = ""
        for field in (cfg.short_field, cfg.long_field):
            text = getattr(s, field, "") if field in ("caption", "short_caption", "long_caption") else s.meta.get(field, "")
            if not text:
                continue
            n = len(tokenizer(text, add_special_tokens=False).input_ids)
            if n < cfg.short_max_tokens:
                short = short or text
            elif cfg.long_min_tokens <= n <= cfg.long_max_tokens:
                long = long or text
        if not short and not long:
            report.skip("no_short_or_long_caption", s.id,
                        f"no caption under {cfg.short_max_tokens} tokens or of {cfg.long_min_tokens}-{cfg.long_max_tokens} tokens")
            continue
        keep.append(i)
        out.append(ShortLong(short, long))
    return keep, out


class ShortLongDataset(Dataset):
    """Items: `index`, `short`, `long`, `features` or `pixel_values`, and the cached
    `text_state` of the short caption when the text path is frozen."""

    def __init__(self, captions: list[ShortLong], images: list, features: Tensor | None = None,
                 text_states: Tensor | None = None, preprocess=None) -> None:
        if features is None and preprocess is None:
            raise ValueError("ShortLongDataset needs cached features or a preprocess function")
        self.captions, self.images, self.features = captions, images, features
        self.text_states, self.preprocess = text_states, preprocess

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        c = self.captions[i]
        item: dict = {"index": i, "short": c.short, "long": c.long}
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["pixel_values"] = self.preprocess([load_image(self.images[i])])[0]
        if self.text_states is not None and c.short:
            item["text_state"] = self.text_states[i]
        return item


class ShortLongCollator:
    """A batch of images with two row subsets: `ntp_rows` [B_long] with the long captions'
    input_ids, attention_mask, labels [B_long, T] (`[<image> x Q] caption <eos>`), and
    `emb_rows` [B_short] with the short `captions` (and `text_states` when cached).

    With `prompt` (`data.long_caption_prompted`, VladVA) the long captions continue the
    image embedding prompt instead: `[prompt around <image> x Q] caption <eos>`, with
    `soft_mask` where soft prompts go."""

    def __init__(self, tokenizer, image_token_id: int, num_visual_tokens: int, max_long_tokens: int,
                 prompt: CaptionPrompt | None = None) -> None:
        self.sequences = CaptionCollator(tokenizer, image_token_id, num_visual_tokens, max_long_tokens, prompt)

    @property
    def truncated(self) -> int:
        return self.sequences.truncated

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {"index": torch.tensor([it["index"] for it in items])}
        for key in ("features", "pixel_values"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])  # [B, P, Dv] / [B, 3, H, W]
        long_rows = [r for r, it in enumerate(items) if it["long"]]
        short_rows = [r for r, it in enumerate(items) if it["short"]]
        batch["ntp_rows"] = torch.tensor(long_rows, dtype=torch.long)
        batch["emb_rows"] = torch.tensor(short_rows, dtype=torch.long)
        if long_rows:
            seq = self.sequences([{"index": r, "caption": items[r]["long"]} for r in long_rows])
            batch |= {k: seq[k] for k in ("input_ids", "attention_mask", "labels", "soft_mask") if k in seq}
        batch["captions"] = [items[r]["short"] for r in short_rows]
        if short_rows and "text_state" in items[short_rows[0]]:
            batch["text_states"] = torch.stack([items[r]["text_state"] for r in short_rows])
        return batch
