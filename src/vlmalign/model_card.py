"""The model card (README.md) every `vlmalign export` writes, ready for a model hub.

It says what the model is made of (base LLM, vision tower, projector), how it was trained
(recipe, data, steps, the resolved config and the command that reproduces it), how it
scored (the checkpoint's `metrics.json`, when it was evaluated: inside the checkpoint after
training, or `eval-checkpoint-N/` beside it from `vlmalign eval`), and with what software
(package versions, the vlmalign git commit).
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from vlmalign.config import Config, flat_config, load_config

METRICS_FILE = "metrics.json"
STATE_FILE = "trainer_state.json"
PACKAGES = ("vlmalign", "torch", "transformers", "accelerate", "peft", "timm", "safetensors")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a checkpoint depends on ("-" when absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def git_commit() -> str:
    """The commit of the vlmalign source tree (with "+dirty" when it has local changes),
    or "unknown" when vlmalign is not installed from a git checkout."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def reproduce_overrides(cfg: Config) -> list[str]:
    """The `key=value` overrides that turn the recipe's shipped config into `cfg`
    (train.out_dir and train.resume left out: where a run writes, not what it is)."""
    from vlmalign.paths import recipe_config

    try:
        base = flat_config(load_config(recipe_config(cfg.recipe)))
    except Exception:  # an unknown recipe id: every value is an override
        base = {}
    out = []
    for key, value in flat_config(cfg).items():
        if key in ("train.out_dir", "train.resume") or base.get(key, object()) == value:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        needs_quote = not text or any(c in text for c in " \n\t'\"<>|&;$")
        out.append(f"{key}={json.dumps(text) if needs_quote else text}")
    return out


def evaluation_file(checkpoint: Path) -> Path | None:
    """The checkpoint's metrics.json: the end-of-training evaluation's (inside the
    checkpoint), else `vlmalign eval`'s default output beside it (`eval-checkpoint-N/`)."""
    for path in (checkpoint / METRICS_FILE, checkpoint.parent / f"eval-{checkpoint.name}" / METRICS_FILE):
        if path.is_file():
            return path
    return None


def _data_line(cfg: Config) -> str:
    d = cfg.data
    if d.shards:
        return f"webdataset shards `{d.shards}`"
    source = f"`{d.train_file}` under `{d.root}`" if d.train_file else f"`{d.root}`"
    extra = f", {d.data_fraction:g} of the records" if d.data_fraction < 1 else ""
    return f"{source}{extra}"


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return "No evaluation was recorded.\n"
    return "| metric | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def _usage(export_format: str) -> list[str]:
    if export_format == "llava":
        return [
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
            "model = AutoModelForImageTextToText.from_pretrained(\"THIS_FOLDER\")",
            "processor = AutoProcessor.from_pretrained(\"THIS_FOLDER\")",
            "pipe = pipeline(\"image-text-to-text\", model=model, processor=processor)",
            "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"photo.png\"},",
            "                                         {\"type\": \"text\", \"text\": \"What is in the image?\"}]}]",
            "print(pipe(text=messages, max_new_tokens=32))",
            "```", "",
            "vlmalign reads the folder back with `from_llava=THIS_FOLDER`; `vlmalign.safetensors` holds what "
            "LLaVA has no place for (soft prompts, the embedding centring mean, the logit scale).", "",
        ]
    return ["Load with `vlmalign.export.load_export(\"THIS_FOLDER\")`; `llm/` is a plain transformers causal LM.", ""]


def write_model_card(
    out: str | Path,
    cfg: Config,
    checkpoint: str | Path,
    *,
    export_format: str,
    export_command: str,
    tags: tuple[str, ...] = (),
) -> Path:
    """Write `out/README.md` for the export of `checkpoint` (trained with `cfg`)."""
    out, checkpoint = Path(out), Path(checkpoint)
    metrics: dict[str, Any] = {}
    source = evaluation_file(checkpoint)
    if source is not None:
        metrics = json.loads(source.read_text()).get("metrics", {})
    step = "unknown"
    if (checkpoint / STATE_FILE).is_file():
        step = str(json.loads((checkpoint / STATE_FILE).read_text()).get("step", "unknown"))
    llm = f"`{Path(cfg.from_llava).name}` (LLaVA folder)" if cfg.from_llava else f"`{cfg.llm.name}`"
    tower = (f"from the LLaVA folder `{cfg.from_llava}`" if cfg.from_llava
             else f"`{cfg.vision.tower}`" + (f" `{cfg.vision.name}`" if cfg.vision.name else ""))
    lora = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} (merged)" if cfg.lora.enabled else "none"
    overrides = " ".join(reproduce_overrides(cfg))
    versions = package_versions()
    front = {
        "library_name": "transformers" if export_format == "llava" else "vlmalign",
        "pipeline_tag": "image-text-to-text",
        "tags": ["vlmalign", cfg.recipe, *tags],
    }
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# vlmalign {cfg.recipe} model", "",
        f"Trained with vlmalign, recipe `{cfg.recipe}`, and exported in the `{export_format}` format.", "",
        *_usage(export_format),
        "## Model", "",
        f"- LLM: {llm}",
        f"- Vision tower: {tower}, feature layer {cfg.vision.feature_layer}, "
        f"{'frozen' if cfg.vision.frozen else 'trained'}",
        f"- Projector: `{'mlp2x_gelu' if cfg.from_llava else cfg.projector.type}`",
        f"- LoRA: {lora}",
        f"- Embeddings: last-token state under the prompts `{cfg.embedding.image_prompt!r}` / "
        f"`{cfg.embedding.text_prompt!r}`, centring {'on' if cfg.embedding.centre else 'off'}, "
        f"soft prompts {'on' if cfg.embedding.soft_prompts else 'off'}",
        "",
        "## Training", "",
        f"- Recipe: `{cfg.recipe}`",
        f"- Data: {_data_line(cfg)}",
        f"- Steps: {step} of {cfg.train.max_steps}, batch {cfg.train.batch_size} x accumulation "
        f"{cfg.train.grad_accum_steps}, lr {cfg.train.lr:g}",
        f"- Checkpoint: `{checkpoint}`",
        "",
        "Reproduce:", "",
        "```bash",
        f"vlmalign train {cfg.recipe} {overrides}".rstrip(),
        export_command,
        "```", "",
        "## Evaluation", "",
        _metrics_table(metrics),
        "## Software", "",
        "| package | version |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in versions.items()],
        f"| vlmalign git commit | {git_commit()} |",
        "",
        "## Resolved config", "",
        "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
