"""`vlmalign export`: a checkpoint as a folder other tools can read.

```
OUT/
  README.md  the model card (model_card.py)
  llm/    a plain transformers causal LM: config.json, model.safetensors,
          generation_config.json and the tokenizer (LoRA merged when asked)
  llm-lora/  only with merge_lora=False on a LoRA checkpoint: the peft adapter
          (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/llm), OUT/llm-lora)`)
  vlm/    what vlmalign adds: config.yaml (llm.name -> OUT/llm), model.safetensors
          (projector, centring mean, soft prompts, trained vision weights; the LoRA
          adapters when not merged), export.json
```

The `<image>` placeholder. vlmalign adds `<image>` to the tokenizer with an id *outside* the
LLM's embedding table (the VLM puts visual tokens at those positions before the lookup).
The exported tokenizer leaves that added token out, so `len(tokenizer)` matches the plain
LLM and text that happens to contain "<image>" tokenises as ordinary text instead of
producing an id that would index past the embedding table. vlmalign adds the token back
when it loads `OUT/llm` (`load_llm`), at the same id, since it is appended last. A
tokenizer that already had `<image>` in its own vocabulary is saved as it is.

The vision tower is rebuilt from `vision.tower` / `vision.name` as a checkpoint is (the
packaged EfficientNet-Lite0, a timm model, an HF directory); only tower weights that
were trained travel in `vlm/model.safetensors`. Copy a local HF tower directory along
with the export if the tower is not packaged.

`export_llava` writes the transformers LLaVA format instead (llava_format.py): one
`LlavaForConditionalGeneration` folder that plain transformers, vLLM and lmms-eval read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.lora import is_lora
from vlmalign.models.lora import merge_lora as merge_adapters
from vlmalign.models.vlm import CONFIG_NAME, VLM, WEIGHTS_NAME
from vlmalign.train.checkpoint import resolve_checkpoint

log = logging.getLogger(__name__)

EXPORT_FORMAT = "vlmalign-export/1"
EXPORT_META = "export.json"
LLM_DIR, LORA_DIR, VLM_DIR = "llm", "llm-lora", "vlm"


def save_plain_tokenizer(tokenizer, directory: Path, vocab_size: int) -> None:
    """Save `tokenizer` to `directory` without vlmalign's added `<image>` token when its id
    lies outside the embedding table (`>= vocab_size`); checks that the saved tokenizer
    reloads with the same ids for ordinary text and the same chat template."""
    from transformers import AutoTokenizer

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokenizer.save_pretrained(directory)
    if image_id is None or image_id < vocab_size:
        return
    if image_id != len(tokenizer) - 1:
        raise ValueError(
            f"{IMAGE_TOKEN} has id {image_id} but is not the last token of the tokenizer ({len(tokenizer)}); "
            "cannot drop it without renumbering tokens added after it"
        )
    tok_json = directory / "tokenizer.json"
    data = json.loads(tok_json.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != IMAGE_TOKEN]
    tok_json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg_json = directory / "tokenizer_config.json"
    if cfg_json.is_file():
        cfg = json.loads(cfg_json.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {
                k: v for k, v in cfg["added_tokens_decoder"].items() if v.get("content") != IMAGE_TOKEN
            }
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [t for t in cfg[key] if t != IMAGE_TOKEN]
        cfg_json.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    plain = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    probe = "A red circle, left of 3 squares.\nWhat is it?"
    problems = []
    if IMAGE_TOKEN in plain.get_vocab() or len(plain) != image_id:
        problems.append(f"{IMAGE_TOKEN} still present (len {len(plain)}, expected {image_id})")
    if plain(probe).input_ids != tokenizer(probe).input_ids:
        problems.append("ordinary text tokenises differently")
    if getattr(plain, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        problems.append("the chat template was not kept")
    if problems:
        raise RuntimeError(f"the exported tokenizer in {directory} is not faithful: {'; '.join(problems)}")


@contextlib.contextmanager
def _published(out: Path):
    """A fresh folder beside `out` to write an export into, renamed to `out` when the block
    ends without error (same disk: the rename is atomic) and removed otherwise, so `out`
    is never half written. `out` may exist only as an empty folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Write a checkpoint as `out_dir/llm` (plain transformers causal LM + tokenizer) and
    `out_dir/vlm` (projector, config and everything vlmalign needs on top of `llm/`).

    `merge_lora`: fold LoRA adapters into the LLM weights (W + alpha/r * B A), so `llm/`
    alone carries the fine-tuned LLM; otherwise `llm/` is the base LLM and the adapters
    go to `llm-lora/` (peft format) and `vlm/model.safetensors`. Returns `out_dir`.
    Reload the VLM with `load_export(out_dir)`. An existing non-empty `out_dir` is refused.
    """
    from vlmalign.model_card import write_model_card

    checkpoint = resolve_checkpoint(checkpoint_dir)
    out = _fresh_out(Path(out_dir))
    model = VLM.from_pretrained(checkpoint)
    model.requires_grad_(False)
    model.eval()
    cfg = model.cfg
    lora = is_lora(model.llm)
    merged = lora and merge_lora

    # vlmalign's own weights (everything trainable_state_dict keeps but the LLM's weights,
    # which llm/ holds; LoRA adapters stay here when not merged).
    state = model.trainable_state_dict()
    keep = {k: v for k, v in state.items() if not k.startswith("llm.") or (lora and not merged and "lora_" in k)}

    with _published(out) as tmp:
        llm = model.llm
        if lora and not merged:
            llm.save_pretrained(tmp / LORA_DIR)  # peft: adapter_config.json + adapter weights
            llm = llm.unload()  # the base model, adapters removed (not merged)
        elif merged:
            llm = merge_adapters(llm)
        vocab_size = llm.get_input_embeddings().num_embeddings
        llm.save_pretrained(tmp / LLM_DIR)
        save_plain_tokenizer(model.tokenizer, tmp / LLM_DIR, vocab_size)

        vdir = tmp / VLM_DIR
        vdir.mkdir()
        save_file(keep, str(vdir / WEIGHTS_NAME))
        # llm.name points at OUT/llm as written now; load_export re-points it if OUT moves.
        export_cfg = copy.deepcopy(cfg)
        export_cfg.llm.name = str((out / LLM_DIR).resolve())
        export_cfg.llm.gguf_file = ""
        export_cfg.lora.enabled = lora and not merged
        export_cfg.save(vdir / CONFIG_NAME)
        meta = {
            "format": EXPORT_FORMAT,
            "source_checkpoint": str(checkpoint.resolve()),
            "llm_dir": f"../{LLM_DIR}",
            "lora": "merged" if merged else ("separate" if lora else "none"),
            "image_token": IMAGE_TOKEN,
            "image_token_id": model.image_token_id,
            "llm_vocab_size": vocab_size,
            "num_visual_tokens": model.num_visual_tokens,
            "recipe": getattr(cfg, "recipe", ""),
        }
        (vdir / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        flag = "" if merge_lora else " --no-merge-lora"
        write_model_card(tmp, cfg, checkpoint, export_format="vlmalign",
                         export_command=f"vlmalign export {checkpoint}{flag} --out {out}")
    log.info("exported %s to %s (LoRA %s)", checkpoint, out, meta["lora"])
    return out


def _fresh_out(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder or remove it")
    return out


def export_llava(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint as a transformers `LlavaForConditionalGeneration` folder
    (llava_format.py): weights with LoRA merged, processor, tokenizer with `<image>`,
    the sidecar and a model card. Refuses, naming the reason, a checkpoint whose tower or
    projector LLaVA cannot express. An existing non-empty `out_dir` is refused."""
    from safetensors.torch import load_file

    from vlmalign.llava_format import check_exportable, write_llava
    from vlmalign.model_card import write_model_card
    from vlmalign.train.checkpoint import OBJECTIVE_NAME

    checkpoint = resolve_checkpoint(checkpoint_dir)
    out = _fresh_out(Path(out_dir))
    model = VLM.from_pretrained(checkpoint)
    model.requires_grad_(False)
    model.eval()
    check_exportable(model)  # before anything is written
    cfg = model.cfg
    objective = load_file(str(checkpoint / OBJECTIVE_NAME)) if (checkpoint / OBJECTIVE_NAME).is_file() else {}
    with _published(out) as tmp:
        write_llava(model, tmp, objective)
        write_model_card(tmp, cfg, checkpoint, export_format="llava", tags=("llava",),
                         export_command=f"vlmalign export {checkpoint} --format llava --out {out}")
    log.info("exported %s to %s (LLaVA format)", checkpoint, out)
    return out


def load_export(out_dir: str | Path, overrides: list[str] | None = None) -> VLM:
    """The VLM of an export folder (`OUT` or `OUT/vlm`), its LLM loaded from `OUT/llm`
    wherever the folder now lives; eval mode, no gradients."""
    path = Path(out_dir)
    vdir = path / VLM_DIR if (path / VLM_DIR / EXPORT_META).is_file() else path
    meta_path = vdir / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a vlmalign export (no {VLM_DIR}/{EXPORT_META}); write one with `vlmalign export`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: unknown export format {meta.get('format')!r}; this vlmalign reads {EXPORT_FORMAT}")
    llm_dir = (vdir / meta["llm_dir"]).resolve()
    model = VLM.from_pretrained(vdir, [f"llm.name={llm_dir}", *(overrides or [])])
    if model.image_token_id != meta["image_token_id"]:
        raise ValueError(
            f"{path}: {IMAGE_TOKEN} got id {model.image_token_id} on reload, the export says "
            f"{meta['image_token_id']}; the tokenizer in {llm_dir} was changed"
        )
    model.requires_grad_(False)
    return model.eval()


def is_llava_folder(path: str | Path) -> bool:
    """Whether `path` holds a transformers LLaVA model (config.json with model_type llava)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def load_llava_export(directory: str | Path, overrides: list[str] | None = None) -> VLM:
    """The VLM of a LLaVA folder (`from_llava=directory`), eval mode, no gradients.

    A folder written by `export_llava` brings its resolved config (`vlmalign_config.yaml`:
    prompts, soft prompts, centring) with LoRA off, as the export merged it; any other
    LLaVA folder gets the default config with centring off (it has no mean state)."""
    from vlmalign.config import load_config
    from vlmalign.llava_format import SIDECAR_CONFIG

    directory = Path(directory)
    side = directory / SIDECAR_CONFIG
    base = [f"from_llava={directory}", "lora.enabled=false"]
    if not side.is_file():
        base.append("embedding.centre=false")
    cfg = load_config(side if side.is_file() else None, base + list(overrides or []))
    model = VLM.build(cfg)
    model.requires_grad_(False)
    return model.eval()
