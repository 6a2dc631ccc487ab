"""`vlmalign experiment data-efficiency`: CG-VLM's efficiency claim in miniature.

CG-VLM (Liu et al. 2023) reports that after contrastive + generative alignment, 10% of
the instruction data reaches 95% of LLaVA's accuracy on ScienceQA-IMG. Here, on `shapes`
with the real packaged models: align the projector with `align` (NTP only, LLaVA stage 1)
and with `align-cg` (NTP + patch-token contrastive), from the same initial weights; then
instruction-tune each with LoRA (`instruct`) on data fractions 0.1, 0.25 and 1.0 of the
instruction conversations (QA + multiple choice), for the same number of epochs, and
measure multiple-choice accuracy on held-out images (option likelihood and generation).
Fraction 0 is the aligned model before instruction tuning.

Shared across runs: the loaded backbones, the tower features of every image, the data;
each instruct run starts from fresh LoRA adapters and its alignment checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console
from rich.table import Table

from vlmalign.config import Config, load_config
from vlmalign.data.scienceqa import load_mcq_json
from vlmalign.data.splits import ensure_data, subsample
from vlmalign.eval.mcq import evaluate_mcq, mcq_image_features
from vlmalign.models.vlm import VLM
from vlmalign.paths import recipe_config
from vlmalign.train.datasets import TrainData
from vlmalign.train.trainer import train

console = Console()

ALIGNMENTS = ("align", "align-cg")
FRACTIONS = (0.1, 0.25, 1.0)
# Sized so that the default run (2 seeds) takes under 30 minutes on an idle 2-core CPU
# with SmolLM2-135M + EfficientNet-Lite0: 160 scenes -> 128 training images (128 QA +
# 128 multiple-choice conversations: 16 / 4 / 2 instruct steps at fractions 1 / 0.25 /
# 0.1, one epoch at batch 16), 32 held-out images x 3 questions = 96 evaluation items.
FULL = {"scenes": 160, "align_steps": 30, "batch": 16, "epochs": 1.0, "eval_items": 96, "seeds": (0, 1)}
QUICK = {"scenes": 200, "align_steps": 8, "batch": 8, "epochs": 1.0, "eval_items": 40, "seeds": (0,)}


def _overrides(settings: dict, out: Path, seed: int, llm: str, tower: str, extra: list[str]) -> list[str]:
    return [
        f"data.root={out / 'shapes'}", f"data.shapes_n={settings['scenes']}", f"train.seed={seed}",
        f"data.fraction_seed={seed}", f"train.batch_size={settings['batch']}", f"llm.name={llm}",
        f"vision.tower={tower}", "train.log_every=10", "train.eval_at_end=false", *extra,
    ]


def _instruct_steps(n_records: int, batch: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * n_records / batch))


def _subset(data: TrainData, fraction: float, seed: int) -> TrainData:
    """The records `data.data_fraction` would pick, with their cached feature rows."""
    rows = subsample(list(range(len(data.records))), fraction, seed)
    feats = data.features[rows] if data.features is not None else None
    return TrainData(data.kind, [data.records[i] for i in rows], feats, data.text_cache, data.report)


def _mcq(model: VLM, items: list, feats: dict) -> dict[str, float]:
    return evaluate_mcq(model, items, features=feats, max_new_tokens=4)


def run_seed(settings: dict, out: Path, seed: int, llm: str, tower: str, extra: list[str]) -> dict:
    """Both alignments and their instruct runs for one seed; {alignment: {fraction: metrics}}."""
    common = _overrides(settings, out, seed, llm, tower, extra)
    base = load_config(recipe_config("align"), common)
    ensure_data(base.data)
    set_seed(seed)
    aligner = VLM.build(base)
    initial = {k: v.clone() for k, v in aligner.projector.state_dict().items()}
    captions = TrainData.prepare(aligner, base, "captions")
    root = Path(base.data.root)
    items = [it for name in ("mcq_val.json", "mcq_test.json") for it in load_mcq_json(root / name, image_root=root)]
    items = items[: settings["eval_items"]]
    feats = mcq_image_features(aligner, items)
    results: dict[str, dict[str, dict]] = {}
    conversations: TrainData | None = None
    for name in ALIGNMENTS:
        cfg = load_config(recipe_config(name), common + [f"train.out_dir={out / f'seed{seed}' / name}",
                                                         f"train.max_steps={settings['align_steps']}"])
        aligner.projector.load_state_dict(initial)  # the same start for both alignments
        aligned = train(cfg, model=aligner, data=captions)
        results[name] = {"0": _mcq(aligner, items, feats) | {"train_s": aligned.wall_time_s, "steps": 0}}
        for fraction in FRACTIONS:
            icfg = _instruct_config(common, out, seed, name, fraction, aligned.checkpoint)
            set_seed(seed)
            model = VLM.build(icfg)  # fresh LoRA adapters
            if conversations is None:
                conversations = TrainData.prepare(model, load_config(recipe_config("instruct"), common), "conversations")
            data = _subset(conversations, fraction, seed)
            steps = _instruct_steps(len(data.records), icfg.train.batch_size, settings["epochs"])
            icfg = _with(icfg, [f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}"])
            run = train(icfg, model=model, data=data)
            metrics = _mcq(run.model, items, feats) | {"train_s": run.wall_time_s, "steps": steps,
                                                       "records": len(data.records)}
            results[name][str(fraction)] = metrics
            console.print(f"  seed {seed} {name} -> instruct {fraction:g}: {steps} steps, "
                          f"MCQ likelihood {metrics['mcq_lik_acc']:.1f}%, generation {metrics['mcq_gen_acc']:.1f}%")
    return results


def _instruct_config(common: list[str], out: Path, seed: int, name: str, fraction: float, init: Path) -> Config:
    return load_config(recipe_config("instruct"), common + [
        f"train.out_dir={out / f'seed{seed}' / f'{name}-instruct-{fraction:g}'}", f"train.init_from={init}",
        f"data.data_fraction={fraction}",
    ])


def _with(cfg: Config, overrides: list[str]) -> Config:
    from vlmalign.config import replace

    return replace(cfg, overrides)


def summary_table(results: dict[int, dict], key: str, title: str) -> Table:
    """Rows: alignment x seed (and the mean); columns: data fraction."""
    fractions = ["0", *[str(f) for f in FRACTIONS]]
    table = Table(title=title)
    table.add_column("alignment")
    table.add_column("seed")
    for f in fractions:
        table.add_column(f"fraction {f}", justify="right")
    for name in ALIGNMENTS:
        for seed, res in results.items():
            table.add_row(name, str(seed), *[f"{res[name][f][key]:.1f}" for f in fractions])
        means = [sum(r[name][f][key] for r in results.values()) / len(results) for f in fractions]
        table.add_row(name, "mean", *[f"{m:.1f}" for m in means], style="bold")
    return table


def plot(results: dict[int, dict], path: Path, chance: float) -> Path:
    """MCQ accuracy vs instruction-data fraction, one colour per alignment; solid =
    likelihood, dashed = generation; thin lines per seed, thick the mean."""
    from matplotlib.figure import Figure

    fractions = [0.0, *FRACTIONS]
    keys = ["0", *[str(f) for f in FRACTIONS]]
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    for colour, name in zip(("tab:blue", "tab:orange"), ALIGNMENTS, strict=True):
        for key, style, label in (("mcq_lik_acc", "-", "likelihood"), ("mcq_gen_acc", "--", "generation")):
            for res in results.values():
                ax.plot(fractions, [res[name][k][key] for k in keys], style, color=colour, alpha=0.25, lw=1)
            mean = [sum(r[name][k][key] for r in results.values()) / len(results) for k in keys]
            ax.plot(fractions, mean, style, color=colour, lw=2.2, marker="o", label=f"{name}, {label}")
    ax.axhline(chance, color="grey", lw=1, ls=":", label=f"chance ({chance:.0f}%)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of instruction data (0 = aligned model, no instruction tuning)")
    ax.set_ylabel("multiple-choice accuracy on held-out images (%)")
    ax.set_title(f"shapes: instruction-data efficiency after alignment ({len(results)} seeds; thin = per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_data_efficiency(out: str | Path = "runs/data-efficiency", quick: bool = False, seeds: tuple[int, ...] | None = None,
                        llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
                        sizes: dict | None = None) -> dict:
    """Run the experiment; writes `results.json` and `mcq_vs_fraction.png` under `out`.
    `sizes` replaces entries of the default sizes (`FULL`, or `QUICK` with `quick`):
    scenes, align_steps, batch, epochs, eval_items; None values are ignored."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = (QUICK if quick else FULL) | {k: v for k, v in (sizes or {}).items() if v is not None}
    if unknown := set(settings) - set(FULL):
        raise ValueError(f"unknown experiment sizes {sorted(unknown)}; known: {', '.join(FULL)}")
    seeds = tuple(seeds) if seeds else settings["seeds"]
    console.print(f"[bold]data-efficiency[/] ({'quick' if quick else 'full'}): {', '.join(ALIGNMENTS)} then instruct "
                  f"at fractions {', '.join(f'{f:g}' for f in FRACTIONS)}; seeds {', '.join(map(str, seeds))}")
    results: dict[int, dict] = {}
    for seed in seeds:
        results[seed] = run_seed(settings, out, seed, llm, tower, list(extra or []))
        summary = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                   "seeds": list(results), "fractions": list(FRACTIONS), "results": results,
                   "total_s": time.perf_counter() - t0}
        (out / "results.json").write_text(json.dumps(summary, indent=2))  # after every seed
    return summarise(summary, out)


def summarise(summary: dict, out: Path) -> dict:
    """Plot and print the tables of a results summary (one run's, or merged)."""
    results = summary["results"]
    chance = next(iter(results.values()))[ALIGNMENTS[0]]["0"].get("mcq_chance", 0.0)
    png = plot(results, out / "mcq_vs_fraction.png", chance)
    console.print(summary_table(results, "mcq_lik_acc", "MCQ accuracy (%), option likelihood"))
    console.print(summary_table(results, "mcq_gen_acc", "MCQ accuracy (%), generation + answer parsing"))
    console.print(f"chance {chance:.1f}%; wrote {out / 'results.json'} and {png} ({summary['total_s']:.0f} s)")
    return summary


def merge_results(dirs: list[str | Path], out: str | Path) -> dict:
    """Combine the `results.json` of runs made with different `--seeds` (e.g. one process
    per seed) into one summary, table and plot under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict = {"results": {}, "total_s": 0.0, "sources": [str(d) for d in dirs]}
    for d in dirs:
        part = json.loads((Path(d) / "results.json").read_text())
        merged["settings"], merged["fractions"] = part["settings"], part["fractions"]
        merged["results"] |= part["results"]
        merged["total_s"] += part["total_s"]
    merged["seeds"] = list(merged["results"])
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    return summarise(merged, out)
