"""Using a trained checkpoint: one loading path for `vlmalign chat`, `caption`, `embed` and
`search`, and a multi-turn chat session over one image.

The chat renders the conversation with the tokenizer's chat template exactly as the
instruct recipe's training data is rendered (data/conversations.py): the image marker at
the start of the first user turn, then the generation prompt.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmalign.data.images import BadImageError, load_image
from vlmalign.data.sample import LoadReport
from vlmalign.export import is_llava_folder, load_export, load_llava_export
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.vlm import VLM
from vlmalign.search_index import SearchIndex, build_index
from vlmalign.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint folder, or a run folder's newest verified checkpoint
    (train/checkpoint.py `resolve_checkpoint`); an exported folder as it is."""
    path = Path(checkpoint)
    if (path / "export.json").exists() or (path / "vlm" / "export.json").exists() or is_llava_folder(path):
        return path
    return ckpt.resolve_checkpoint(path)


def load_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None) -> VLM:
    """A checkpoint folder (or a run folder: its `latest` checkpoint) ready for inference:
    eval mode, no gradients."""
    path = resolve_checkpoint(checkpoint)
    if is_llava_folder(path):  # a transformers LLaVA folder (vlmalign export --format llava, or published)
        model = load_llava_export(path, overrides)
    elif (path / "export.json").exists() or (path / "vlm" / "export.json").exists():
        model = load_export(path, overrides)
    else:
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def embed_image_files(model: VLM, paths: list[Path], batch_size: int = 32) -> tuple[torch.Tensor, list[Path], LoadReport]:
    """Embeddings [N, D] of the readable images, the paths kept, and what was skipped."""
    report = LoadReport()
    chunks, kept = [], []
    for i in range(0, len(paths), batch_size):
        images = []
        for p in paths[i : i + batch_size]:
            try:
                images.append(load_image(p))
                kept.append(p)
            except BadImageError as e:
                report.skip("unreadable image", str(p), str(e))
        if images:
            chunks.append(model.embed_images(images, batch_size=batch_size).cpu())
        report.loaded = len(kept)
    return (torch.cat(chunks) if chunks else torch.zeros(0, model.hidden_size)), kept, report


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one text per line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from None
    return [line.strip() for line in lines if line.strip()]


def write_index(path: str | Path, embeddings: torch.Tensor, names: list[str], kind: str, checkpoint: str) -> Path:
    """Embeddings as safetensors: tensor `embeddings` [N, D]; metadata `names` (JSON list:
    the image path or text of each row), `kind` ("image" | "text"), `checkpoint`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"names": json.dumps(names), "kind": kind, "checkpoint": checkpoint}
    save_file({"embeddings": embeddings.contiguous().float()}, str(path), metadata=meta)
    return path


def read_index(path: str | Path) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """(embeddings [N, D], names, metadata) of a file written by `write_index`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path} does not exist; write one with `vlmalign embed --images DIR --out {path}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        emb = f.get_tensor("embeddings")
    if "names" not in meta:
        raise ValueError(f"{path} is not a vlmalign embedding index (no names in its metadata)")
    return emb, json.loads(meta["names"]), meta


@torch.no_grad()
def search(
    model: VLM,
    index: torch.Tensor | SearchIndex,
    names: list[str],
    query: str,
    top: int = 5,
    method: str = "auto",
    nprobe: int | None = None,
) -> list[tuple[str, float]]:
    """The `top` rows of an image index most similar (cosine) to a text query, best first.

    `index` is the embeddings [N, D] (then searched exactly up to
    `search_index.EXACT_MAX_VECTORS` rows and with a FAISS IVF index above, as `method`
    "auto" | "exact" | "faiss" says; `nprobe` None: an eighth of the IVF lists) or an index
    already built (`search_index.build_index`, `cached_index`), which spares rebuilding it
    for every query.
    """
    if isinstance(index, torch.Tensor):
        if index.shape[0] != len(names):
            raise ValueError(f"the index has {index.shape[0]} rows but {len(names)} names")
        index = build_index(index, method, nprobe=nprobe)
    q = model.embed_texts([query]).float().cpu()  # [1, D]
    scores, rows = index.search(q, min(top, len(names)))  # [1, k]
    return [(names[i], float(s)) for s, i in zip(scores[0].tolist(), rows[0].tolist(), strict=True) if i >= 0]


# ----------------------------------------------------------------- captioning


def default_caption_prompt(model: VLM, instruction: str | None = None) -> str:
    """The prompt `VLM.generate` continues with a caption, matching how the checkpoint was
    trained: `instruction` (or, for an `instruct` checkpoint, "Describe the image in one
    sentence.") as a chat user turn; the image embedding prompt for a checkpoint trained
    with `data.caption_format=prompted`; "" (visual tokens only, LLaVA stage 1) otherwise."""
    from vlmalign.eval.captioning import caption_prompt
    from vlmalign.models.prompts import render_prompt

    cfg = model.cfg
    if instruction:
        return caption_prompt(model.tokenizer, instruction)
    if getattr(cfg, "recipe", "") == "instruct":
        return caption_prompt(model.tokenizer)
    if getattr(cfg.data, "caption_format", "plain") == "prompted":
        return render_prompt(model.tokenizer, cfg.embedding.image_prompt, cfg.embedding.chat_template)
    return ""


def caption_paths(images: str | Path) -> list[Path]:
    """`--images`: a folder (its image files, recursive, sorted) or one image file."""
    path = Path(images)
    if path.is_dir():
        return image_files(path)
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"--images {path}: no such file or folder")


@torch.no_grad()
def caption_files(
    model: VLM,
    paths: list[Path],
    prompt: str = "",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    report: LoadReport | None = None,
) -> list[tuple[Path, str]]:
    """Greedy captions `[(path, caption)]` for the readable images among `paths`, in order.

    Images are decoded and run through the tower `batch_size` at a time (frozen-tower
    features, then `eval.captioning.caption_images`, so memory stays bounded for any
    number of files); unreadable or missing files are skipped and counted in `report`
    ("unreadable image"), never a crash. `prompt` as `VLM.generate` takes it, usually
    `default_caption_prompt(model, instruction)`.
    """
    from vlmalign import cache
    from vlmalign.data.sample import Sample
    from vlmalign.eval.captioning import caption_images

    report = report if report is not None else LoadReport()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[tuple[Path, str]] = []
    for i in range(0, len(paths), batch_size):
        chunk = [Sample(id=str(p), image=Path(p)) for p in paths[i : i + batch_size]]
        feats, kept = cache.tower_features(model, chunk, batch_size=batch_size, report=report)  # [n, P, Dv]
        if not kept:
            continue
        texts = caption_images(model, feats, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out += [(s.image, t) for s, t in zip(kept, texts, strict=True)]
    report.loaded = len(out)
    return out


def write_captions(path: str | Path, captions: list[tuple[Path, str]]) -> Path:
    """Captions as JSONL `{"image": path, "caption": text}`, one per line: the captions
    format vlmalign's loaders read (`data.train_file` / `data.eval_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for image, text in captions:
            f.write(json.dumps({"image": str(image), "caption": text}, ensure_ascii=False) + "\n")
    return path


def describe_image_set(given: str | Path, paths: list[Path]) -> str:
    """`N images in DIR`, naming the sub-folders they come from (with their counts) when
    the search went into any, so a folder that holds more than expected shows it before
    the work starts."""
    root = Path(given)
    if not root.is_dir():
        return f"{len(paths)} image{'s' * (len(paths) != 1)}: {root}"
    by_folder = Counter(p.parent.relative_to(root).parts[0] if p.parent != root else "." for p in paths)
    subs = [f"{name}/ {n}" for name, n in by_folder.most_common() if name != "."]
    where = f" ({by_folder['.']} at the top, in sub-folders: {', '.join(subs[:8])}{', ...' if len(subs) > 8 else ''})" if subs else ""
    return f"{len(paths)} images in {root}, searched recursively{where}"


def caption_command(
    checkpoint: str | Path,
    images: str | Path,
    prompt: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> tuple[list[tuple[Path, str]], LoadReport]:
    """`vlmalign caption`: load a checkpoint (or a `vlmalign export` folder), caption
    `images` (a folder or one file), print `path<TAB>caption` lines, or write JSONL to
    `out` and print where; skipped files are summarised on stderr. Returns the captions
    and the load report."""
    import sys

    path = Path(checkpoint)
    if (path / "vlm" / "export.json").is_file() or (path / "export.json").is_file():
        from vlmalign.export import load_export

        model = load_export(path)
    else:
        model = load_checkpoint(path)
    report = LoadReport()
    paths = caption_paths(images)
    print(describe_image_set(images, paths), file=sys.stderr)
    text = default_caption_prompt(model, prompt)
    probe = min(len(paths), max(1, min(batch_size, 4)))
    t0 = time.perf_counter()
    results = caption_files(model, paths[:probe], text, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            report=report)
    if len(paths) > probe:
        per_image = (time.perf_counter() - t0) / probe
        print(f"about {per_image * (len(paths) - probe):.0f} s for the other {len(paths) - probe} images "
              f"({per_image:.2f} s per image on the first {probe})", file=sys.stderr)
        rest = LoadReport()
        results += caption_files(model, paths[probe:], text, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 report=rest)
        report.absorb(rest)
    report.loaded = len(results)
    if out:
        write_captions(out, results)
        print(f"wrote {len(results)} captions to {out}")
    else:
        for image, text in results:
            print(f"{image}\t{text}")
    if report.total_skipped():
        print(report.summary(), file=sys.stderr)
    return results, report
