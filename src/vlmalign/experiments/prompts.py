"""`vlmalign experiment prompts --checkpoint DIR`: the same trained model, evaluated under
several handcrafted embedding prompts (Ak et al. 2024 find that the prompt matters).

For each prompt pair the centring mean is re-estimated on training captions under that
prompt (it is part of the embedding definition), then retrieval and compositionality are
measured with the checkpoint's evaluation data. Checkpoints with trained soft prompts are
evaluated with their learned prompt only: another handcrafted prompt would discard it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlmalign.data.splits import train_samples
from vlmalign.eval.evaluate import EvalData, evaluate
from vlmalign.inference import load_checkpoint, resolve_checkpoint

console = Console()

# (name, image prompt, text prompt): E5-V's (our default), variants of its instruction,
# and no instruction at all.
PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("one word (E5-V)", "<image>\nSummarize above image in one word:", "<sent>\nSummarize above sentence in one word:"),
    ("describe", "<image>\nDescribe the image in one word:", "<sent>\nDescribe the sentence in one word:"),
    ("caption", "<image>\nWrite a short caption for this image:", "<sent>\nThis is a short caption of an image:"),
    ("no instruction", "<image>", "<sent>"),
)
CENTRE_SAMPLES = 256


def run_prompts(checkpoint: str | Path, out: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Evaluate the checkpoint under each prompt pair; writes `prompts.json` next to it."""
    path = resolve_checkpoint(checkpoint)
    model = load_checkpoint(path, overrides)
    cfg = model.cfg
    prompts = PROMPTS
    if cfg.embedding.soft_prompts:
        console.print("[yellow]this checkpoint has trained soft prompts: evaluating its own prompt only")
        prompts = (("learned soft prompt", cfg.embedding.image_prompt, cfg.embedding.text_prompt),)
    data = EvalData.prepare(model, cfg)
    captions = [s.caption for s in train_samples(cfg.data)][:CENTRE_SAMPLES]
    results: dict[str, dict[str, float]] = {}
    for name, image_prompt, text_prompt in prompts:
        emb = dataclasses.replace(cfg.embedding, image_prompt=image_prompt, text_prompt=text_prompt)
        pcfg = dataclasses.replace(cfg, embedding=emb)
        model.set_config(pcfg)
        if emb.centre and not emb.soft_prompts:
            with torch.no_grad():
                model.set_embedding_mean(torch.cat([model.text_states(captions[i : i + 64])
                                                    for i in range(0, len(captions), 64)]))
        results[name] = evaluate(model, data, pcfg) | {"image_prompt": image_prompt, "text_prompt": text_prompt}
    target = Path(out) if out else path / "prompts.json"
    target.write_text(json.dumps({"checkpoint": str(path), "results": results}, indent=2))
    console.print(table(results, f"embedding prompts on {path}"))
    console.print(f"wrote {target}")
    return results


def table(results: dict[str, dict], title: str) -> Table:
    t = Table(title=title)
    cols = [("emb_i2t_R@1", "i2t R@1"), ("emb_i2t_R@5", "i2t R@5"), ("emb_t2i_R@1", "t2i R@1"),
            ("emb_t2i_R@5", "t2i R@5"), ("comp_emb_mean", "comp mean"), ("gap_gap", "gap")]
    t.add_column("prompt")
    for _, label in cols:
        t.add_column(label, justify="right")
    for name, m in results.items():
        t.add_row(name, *[f"{m[k]:.2f}" if k == "gap_gap" else f"{m[k]:.1f}" for k, _ in cols])
    return t


# ---------------------------------------------------------------- training with each prompt


def _with_prompts(image_prompt: str, text_prompt: str):
    def change(cfg):
        return dataclasses.replace(cfg, embedding=dataclasses.replace(cfg.embedding, image_prompt=image_prompt,
                                                                      text_prompt=text_prompt))
    return change


def run_prompt_training(out: str | Path = "runs/prompts", quick: bool = False, seeds: list[int] | None = None,
                        llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
                        command: str = "", report_only: bool = False) -> dict:
    """Ak et al.'s prompt study with training: `align-clip` trained with each prompt pair
    of `PROMPTS` (from the same initial projector on the same captions, each with its own
    centring mean and text states) and evaluated under the prompt it was trained with
    (`study.py`). Claim: an instruction prompt (E5-V's) trains better embeddings than none."""
    from vlmalign.experiments import stats
    from vlmalign.experiments.study import Arm, Study, run_study

    study = Study(
        name="prompts", title="Embedding prompts in contrastive training (align-clip), Ak et al.",
        arms=[Arm(name, f"image {ip!r}, text {tp!r}", _with_prompts(ip, tp), {"image_prompt": ip, "text_prompt": tp})
              for name, ip, tp in PROMPTS],
        claims=[stats.Claim("instruction-prompt", "an instruction prompt trains better embeddings than none "
                            "(text->image R@5)", "t2i_R@5", PROMPTS[0][0], "no instruction", 2.0, paper="Ak et al. 2024")],
    )
    return run_study(study, out, quick, seeds, llm, tower, extra, command, report_only)
