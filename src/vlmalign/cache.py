"""Work done once instead of every step: frozen tower features and frozen text states.

When the vision tower is frozen its features never change, so alignment computes them once
(FINDINGS.md: recomputing them is a large share of a step). When nothing on the text path
trains (frozen LLM, no text soft prompt), the prompted text states are constant too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmalign.data.images import BadImageError, load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.models.vlm import VLM


@torch.no_grad()
def tower_features(
    model: VLM, samples: list[Sample], batch_size: int = 32, report: LoadReport | None = None
) -> tuple[Tensor, list[Sample]]:
    """Features [N_kept, P, Dv] of each sample's image, and the samples kept. Unreadable
    images are skipped and counted in `report`, never a crash mid-run. Images shared by
    several samples (e.g. 5 captions per image) are encoded once."""
    report = report if report is not None else LoadReport()
    device = model.projector_device()
    rows: dict[str, int] = {}
    pending: list = []  # decoded images waiting for the next tower batch
    chunks: list[Tensor] = []
    kept: list[Sample] = []
    bad: set[str] = set()

    def flush() -> None:
        if pending:
            chunks.append(model.tower_features(model.preprocess(pending).to(device)).cpu())
            pending.clear()

    for s in samples:
        key = str(s.image)
        if key in bad:
            report.skip("unreadable image", key, "see the first error for this file")
            continue
        if key not in rows:
            try:
                img = load_image(s.image)
            except BadImageError as e:
                bad.add(key)
                report.skip("unreadable image", key, str(e))
                continue
            rows[key] = len(rows)
            pending.append(img)
            if len(pending) == batch_size:
                flush()
        kept.append(s)
    flush()
    if not kept:
        return torch.zeros(0), kept
    unique = torch.cat(chunks)  # [N_distinct, P, Dv]
    index = torch.tensor([rows[str(s.image)] for s in kept], dtype=torch.long)
    return unique[index], kept


class TextStateCache:
    """Raw prompted last-token states of texts, each distinct text computed once.

    Valid only while nothing on the text path trains (frozen LLM, no text soft prompt):
    then a caption's state is a constant, shared by training, evaluation and by several
    recipes trained on the same backbone.
    """

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._states: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    @torch.no_grad()
    def states(self, model: VLM, texts: list[str]) -> Tensor:
        """[N, D] raw states for `texts`, computing the ones not seen before."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._states]
        todo.sort(key=len)  # batches of similar length: little padding
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            for t, s in zip(chunk, model.text_states(chunk).cpu(), strict=True):
                self._states[t] = s
        if not texts:
            return torch.zeros(0, model.hidden_size)
        return torch.stack([self._states[t] for t in texts])
