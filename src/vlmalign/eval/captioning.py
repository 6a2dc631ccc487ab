"""Captioning evaluation: greedy captions for held-out images, scored with CIDEr and BLEU.

Scores come from `pycocoevalcap` (the COCO caption evaluation code; an optional extra,
`pip install 'vlmalign[caption]'`) on its own scale: BLEU-n in [0, 1] (Papineni et al.
2002, corpus level, "closest" reference length) and CIDEr (Vedantam et al. 2015, the
coco-caption `Cider`: TF-IDF n-gram cosine, n = 1..4, times 10, document frequencies
from the evaluated references). Papers usually print both times 100.

Tokenisation before scoring: `"ptb"` is the COCO protocol (Stanford PTBTokenizer through
Java, lowercased, punctuation dropped); `"simple"` lowercases and splits on anything but
letters, digits and apostrophes, with no Java (it differs from PTB on clitics, e.g.
"dog's" stays one token, and on hyphens). `"auto"` uses PTB when `java` is on the PATH and
falls back to `"simple"`, with a warning, when it is missing or fails.

A stage-1 (`align`) model captions with no prompt (image tokens, then the caption, as it
was trained); an instruction-tuned model is asked with `caption_prompt(tokenizer,
instruction)`, a user turn of its chat template.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vlmalign.data.sample import LoadReport, Sample
from vlmalign.eval.mcq import features_by_image
from vlmalign.models.prompts import render_prompt
from vlmalign.models.vlm import VLM

log = logging.getLogger(__name__)

INSTALL_HINT = "captioning metrics need pycocoevalcap: pip install 'vlmalign[caption]'"
TOKENIZERS = ("auto", "ptb", "simple")


def _scorers():
    """(Bleu, Cider) classes from pycocoevalcap, or a clear ImportError."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return Bleu, Cider


def require_scorers() -> None:
    """Raise the ImportError with the install command now, when pycocoevalcap is missing
    (before a long run that would need it at its end)."""
    _scorers()


def simple_tokenize(text: str) -> str:
    """Lowercase, keep runs of letters, digits and apostrophes, join with single spaces."""
    return " ".join(re.findall(r"[0-9a-z']+", text.lower())).strip("'")


def _ptb(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})


def tokenize_captions(texts: dict[str, list[str]], tokenizer: str = "auto") -> dict[str, list[str]]:
    """Tokenised captions (space-joined tokens) per id; see the module docstring."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    if tokenizer in ("auto", "ptb"):
        _scorers()  # the PTB wrapper lives in pycocoevalcap too
        if tokenizer == "ptb" or shutil.which("java"):
            try:
                return _ptb(texts)
            except Exception as err:  # noqa: BLE001 - Java missing or failing: fall back when allowed
                if tokenizer == "ptb":
                    raise RuntimeError(f"the PTB tokenizer (Java) failed: {err}; use tokenizer='simple'") from err
                log.warning("PTB tokenizer failed (%s); using the simple tokenizer", err)
        else:
            log.warning("java not found: captions tokenised with the simple tokenizer, not PTB")
    return {k: [simple_tokenize(t) for t in v] for k, v in texts.items()}


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto"
) -> dict[str, float]:
    """Corpus CIDEr and BLEU-1..4 of one predicted caption per id against its references.

    `predictions` and `references` must have the same ids; each id needs at least one
    non-empty reference. Returns `{"cider", "bleu1", "bleu2", "bleu3", "bleu4"}` on
    pycocoevalcap's scale (identical captions: BLEU = 1.0). Raises ImportError with the
    install command when pycocoevalcap is missing.
    """
    bleu_cls, cider_cls = _scorers()
    _, gts, res = _tokenized(predictions, references, tokenizer)
    bleu, _ = bleu_cls(4).compute_score(gts, res, verbose=0)
    cider, _ = cider_cls().compute_score(gts, res)
    return {"cider": float(cider), **{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}}


def cider_per_image(
    predictions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto"
) -> dict[str, float]:
    """Each id's CIDEr (pycocoevalcap's per-image scores, document frequencies from all the
    references given): their mean is `caption_scores(...)["cider"]`, so they serve as the
    per-item values of an interval."""
    _, cider_cls = _scorers()
    _, gts, res = _tokenized(predictions, references, tokenizer)
    _, per_image = cider_cls().compute_score(gts, res)
    # pycocoevalcap scores the ids in the order of the dict it is given
    return {k: float(v) for k, v in zip(gts, per_image, strict=True)}


def _tokenized(predictions: dict[str, str], references: dict[str, list[str]],
               tokenizer: str) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """Check that predictions and references cover the same ids, each with a non-empty
    reference; return (sorted ids, tokenized references, tokenized predictions)."""
    if set(predictions) != set(references):
        only_p = sorted(set(predictions) - set(references))[:5]
        only_r = sorted(set(references) - set(predictions))[:5]
        raise ValueError(f"predictions and references must cover the same ids; only predicted: {only_p}, "
                         f"only referenced: {only_r}")
    if not predictions:
        raise ValueError("no captions to score")
    empty = [k for k, v in references.items() if not any(r.strip() for r in v)]
    if empty:
        raise ValueError(f"ids without a non-empty reference caption: {empty[:5]}")
    keys = sorted(predictions)
    res = tokenize_captions({k: [predictions[k]] for k in keys}, tokenizer)
    gts = tokenize_captions({k: [r for r in references[k] if r.strip()] for k in keys}, tokenizer)
    return keys, gts, res


def caption_prompt(tokenizer, instruction: str = "Describe the image in one sentence.") -> str:
    """A captioning request for an instruction-tuned model: `"<image>\\n" + instruction`
    as a user turn of the chat template, with the generation prompt."""
    return render_prompt(tokenizer, f"<image>\n{instruction}", chat_template=True)


@torch.no_grad()
def caption_images(
    model: VLM, features: Tensor, prompt: str = "", max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy captions for tower features [N, P, Dv], one string per image (its first
    line, stripped). `prompt` as `VLM.generate` takes it: "" for a stage-1 model, or
    `caption_prompt(...)` for an instruction-tuned one."""
    was_training = model.training
    model.eval()
    dev = model.projector_device()
    out: list[str] = []
    for i in range(0, len(features), batch_size):
        texts = model.generate(features=features[i : i + batch_size].to(dev), prompt=prompt,
                               max_new_tokens=max_new_tokens)
        out += [t.strip().split("\n")[0].strip() for t in texts]
    model.train(was_training)
    return out


def references_by_image(samples: Sequence[Sample], fields: Sequence[str] = ("caption",)) -> dict[str, list[str]]:
    """Distinct non-empty reference captions per image (`str(sample.image)`), from the
    sample attributes `fields` (e.g. "caption", "long_caption"), in first-seen order."""
    refs: dict[str, list[str]] = {}
    for s in samples:
        texts = refs.setdefault(str(s.image), [])
        for f in fields:
            text = getattr(s, f, "").strip()
            if text and text not in texts:
                texts.append(text)
    return {k: v for k, v in refs.items() if v}


def evaluate_captioning(
    model: VLM,
    samples: Sequence[Sample],
    features: dict[str, Tensor] | None = None,
    prompt: str = "",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_images: int = 0,
    reference_fields: Sequence[str] = ("caption",),
    tokenizer: str = "auto",
    report: LoadReport | None = None,
    predictions: dict[str, str] | None = None,
) -> dict[str, float]:
    """Caption each distinct image of `samples` and score against all its captions.

    References per image: the distinct `reference_fields` of every sample of that image
    (COCO has 5 per image). `features` maps `str(image)` to tower features [P, Dv]
    (`features_by_image`; computed here when None, unreadable images skipped and counted
    in `report`). `max_images` > 0 evaluates the first that many images. Returns
    `caption_cider`, `caption_bleu1..4` (pycocoevalcap's scale) and `caption_images`; the
    generated captions are written into `predictions` (image -> caption) when given.
    Raises ImportError with the install command when pycocoevalcap is missing (checked
    before any generation).
    """
    _scorers()
    refs = references_by_image(samples, reference_fields)
    images = list(refs)[:max_images] if max_images > 0 else list(refs)
    if features is None:
        features = features_by_image(model, [Path(p) for p in images], report=report)
    images = [p for p in images if p in features]
    if not images:
        raise ValueError("no image with a readable file and a reference caption to evaluate")
    texts = caption_images(model, torch.stack([features[p] for p in images]), prompt, max_new_tokens, batch_size)
    preds = dict(zip(images, texts, strict=True))
    if predictions is not None:
        predictions.update(preds)
    scores = caption_scores(preds, {p: refs[p] for p in images}, tokenizer)
    return {**{f"caption_{k}": v for k, v in scores.items()}, "caption_images": float(len(images))}
