"""Work done once instead of every step: frozen tower features and frozen text states.

When the vision tower is frozen its features never change, so alignment computes them once
(FINDINGS.md: recomputing them is a large share of a step). When nothing on the text path
trains (frozen LLM, no text soft prompt), the prompted text states are constant too.

With a store folder (`tower_features(..., store=dir)`, or the config's
`train.feature_cache_dir`), tower features also persist on disk across runs, keyed by the
tower's weights and the image's bytes (feature_store.py): later runs skip the tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlmalign.data.images import BadImageError, load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.feature_store import FeatureStore, image_digest
from vlmalign.models.vlm import VLM
from vlmalign.train.runlog import track


def open_store(model: VLM, store: str | Path | FeatureStore | None) -> FeatureStore | None:
    """The feature store for `model`'s tower: `store` itself, a folder, or (None) the
    config's `train.feature_cache_dir` when set; None when there is none."""
    if isinstance(store, FeatureStore):
        return store
    root = store if store is not None else getattr(model.cfg.train, "feature_cache_dir", "")
    if not root:
        return None
    tower = model.vision
    return FeatureStore(root, tower.cache_key(), (tower.num_patches, tower.hidden_size))


@torch.no_grad()
def tower_features(
    model: VLM,
    samples: list[Sample],
    batch_size: int = 32,
    report: LoadReport | None = None,
    store: str | Path | FeatureStore | None = None,
) -> tuple[Tensor, list[Sample]]:
    """Features [N_kept, P, Dv] of each sample's image, and the samples kept. Unreadable
    images are skipped and counted in `report`, never a crash mid-run. Images shared by
    several samples (e.g. 5 captions per image) are encoded once. With a feature store
    (`store`, see `open_store`), images whose bytes it holds are neither decoded nor run
    through the tower, and new features are written to it."""
    report = report if report is not None else LoadReport()
    device = model.projector_device()
    disk = open_store(model, store)
    rows: dict[str, Tensor | None] = {}  # image key -> its features [P, Dv]
    stored: dict[str, Tensor] = {}  # key -> features read from the store
    digests: dict[str, str] = {}
    if disk is not None:
        for s in samples:
            key = str(s.image)
            if key not in digests:
                try:
                    digests[key] = image_digest(s.image)
                except OSError:
                    pass  # load_image below reports it
        found = disk.get(list(digests.values()))
        stored = {k: found[d] for k, d in digests.items() if d in found}
    pending: list = []  # decoded images waiting for the next tower batch
    pending_keys: list[str] = []
    kept: list[Sample] = []
    bad: set[str] = set()

    def flush() -> None:
        if pending:
            feats = model.tower_features(model.preprocess(pending).to(device)).cpu()  # [n, P, Dv]
            rows.update(zip(pending_keys, feats, strict=True))
            if disk is not None:
                disk.put([digests[k] for k in pending_keys], feats)
            pending.clear()
            pending_keys.clear()

    for s in track(samples, "tower features", total=len(samples)):
        key = str(s.image)
        if key in bad:
            report.skip("unreadable image", key, "see the first error for this file")
            continue
        if key not in rows:
            if key in stored:
                rows[key] = stored[key]
                kept.append(s)
                continue
            try:
                img = load_image(s.image)
            except BadImageError as e:
                bad.add(key)
                report.skip("unreadable image", key, str(e))
                continue
            rows[key] = None  # filled by flush()
            pending.append(img)
            pending_keys.append(key)
            if len(pending) == batch_size:
                flush()
        kept.append(s)
    flush()
    if not kept:
        return torch.zeros(0), kept
    return torch.stack([rows[str(s.image)] for s in kept]), kept  # [N_kept, P, Dv]


class TextStateCache:
    """Raw prompted last-token states of texts, each distinct text computed once per text
    prompt.

    Valid only while nothing on the text path trains (frozen LLM, no text soft prompt):
    then a caption's state is a constant, shared by training, evaluation and by several
    recipes trained on the same backbone. States are kept per text prompt (its token ids
    and the text length limit), so a model with another prompt never reads them.
    """

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._states: dict[tuple, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._states.values())

    @staticmethod
    def prompt_key(model: VLM) -> tuple:
        """What a text state depends on besides the text and the frozen backbone."""
        return (*model.text_template.ids([])[0], -1, model.cfg.data.long_max_tokens)

    @torch.no_grad()
    def states(self, model: VLM, texts: list[str]) -> Tensor:
        """[N, D] raw states for `texts`, computing the ones not seen before."""
        known = self._states.setdefault(self.prompt_key(model), {})
        todo = [t for t in dict.fromkeys(texts) if t not in known]
        todo.sort(key=len)  # batches of similar length: little padding
        starts = range(0, len(todo), self.batch_size)
        for i in track(starts, f"text states ({len(todo)})", total=len(starts)):
            chunk = todo[i : i + self.batch_size]
            for t, s in zip(chunk, model.text_states(chunk).cpu(), strict=True):
                known[t] = s
        if not texts:
            return torch.zeros(0, model.hidden_size)
        return torch.stack([known[t] for t in texts])
