"""`vlmalign bench`: time the training step of each recipe under its modes, side by side.

A step is the trainer's own `optimizer_step` (train/step.py: forward through `Objective`,
backward, clipping, AdamW, the temperature clamp) on one collated batch; collation and
image decoding are done before timing. Each mode is the recipe's config with switches
flipped (bench/modes.py), batched by the training data code (`build_trainset`,
`batch_sampler`), so the bench measures exactly what `vlmalign train` runs.

Timing: every mode runs `warmup` untimed steps, then `steps` timed ones, on the same
samples: whole mega-batches of LENGTH_GROUP batches are collated, so with `steps` a
multiple of LENGTH_GROUP (the default, 8) every mode, length-grouped or not, is timed on
exactly the same samples. All modes of all recipes on one shared model take turns step by
step (a drift of the machine's speed falls on every row alike). `ms_mean` (the mean over
those samples) is what the ratios use, `ms_per_step` is the median. Memory and FLOPs:
bench/memory.py, bench/flops.py.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import Tensor

from vlmalign import cache
from vlmalign.bench.flops import LLMShape, SideFlops, matmul_peak_gflops, step_flops
from vlmalign.bench.memory import (
    MemoryProbe,
    optimizer_tensors,
    saved_activation_bytes,
    step_alloc_peak_bytes,
    storage_bytes,
)
from vlmalign.bench.modes import DATA_SWITCHES, ablations, mode_overrides, switch_values
from vlmalign.bench.report import bench_ratios, bench_table
from vlmalign.cache import TextStateCache
from vlmalign.config import Config, load_config, replace
from vlmalign.data.images import load_image
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.sampler import LENGTH_GROUP
from vlmalign.models import compiled
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.paths import recipe_config
from vlmalign.train.batches import batch_sampler
from vlmalign.train.datasets import DATA_KINDS, TrainData, build_trainset
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.step import TrainStep, label_tokens, optimizer_step

console = Console()

BENCH_RECIPES = ("align", "align-cg", "align-clip", "instruct", "discriminative")


@dataclass
class BenchConfig:
    """What `vlmalign bench` measures (the CLI's flags, one field each)."""

    recipes: tuple[str, ...] = BENCH_RECIPES
    llm: str = "smollm2-135m"
    tower: str = "efficientnet-lite0"
    batch_size: int = 16
    steps: int = LENGTH_GROUP  # timed steps per mode (a multiple of LENGTH_GROUP: same samples)
    warmup: int = 1
    naive: bool = True  # time every recipe's naive mode too
    ablate: tuple[str, ...] = ()  # recipes whose single-switch ablations are timed
    threads: tuple[int, ...] = ()  # the first recipe's optimised step again at these thread counts
    # Caption format of the caption recipes: "" keeps the config's (the training default,
    # data.caption_format); `extra_formats` adds their optimised step in other formats.
    caption_format: str = ""
    extra_formats: tuple[str, ...] = ()
    data_root: str = ""
    overrides: tuple[str, ...] = ()  # config overrides for every recipe
    feature_store: str = ""  # on-disk tower feature cache (feature_store.py)
    num_threads: int = 0  # torch intra-op threads for the whole run (0: torch's default)
    out: str = ""  # JSON report path
    quiet: bool = False


# ----------------------------------------------------------------------------- setups
@dataclass
class RecipeData:
    """A recipe's model, records and what is computed once for them (tower features,
    text states), shared by all its modes; collated batches cached per data setting."""

    cfg: Config
    model: VLM
    kind: str
    records: list
    features: Tensor
    text_cache: TextStateCache
    report: LoadReport
    _batches: dict[tuple, list[dict]] = field(default_factory=dict)

    def batches(self, objective: Objective, cfg: Config) -> list[dict]:
        """Every record collated into batches the way training batches them under `cfg`
        (the model must be in `cfg`'s state: `ModeSetup.activate`)."""
        s = switch_values(cfg)
        key = (*(s[k] for k in DATA_SWITCHES), cfg.data.caption_format)
        if key not in self._batches:
            data = TrainData(self.kind, self.records, self.features if s["feature_cache"] else None, self.text_cache,
                             self.report)
            trainset = build_trainset(self.model, objective, data, cfg)
            order = list(batch_sampler(trainset.lengths, cfg))
            self._batches[key] = [trainset.collator([trainset.dataset[i] for i in idx]) for idx in order]
        return self._batches[key]

    def pixels(self) -> Tensor:
        """One preprocessed image [1, 3, H, W] (FLOP counting of the tower)."""
        return self.model.preprocess([load_image(self.records[0].image)]).to(self.model.device)


@dataclass
class ModeSetup:
    """One row of the bench: a recipe's config with a mode's switches, its objective and
    batches, on the (possibly shared) model."""

    label: str
    cfg: Config
    data: RecipeData
    objective: Objective
    trainable: tuple[bool, ...]
    batches: list[dict]

    @property
    def model(self) -> VLM:
        return self.data.model

    def activate(self) -> None:
        """Put the shared model in this row's state: its config (prompts rebuilt only when
        they differ), which parameters train, compiled layers or not."""
        model = self.model
        if model.cfg is not self.cfg:
            if model.cfg.embedding != self.cfg.embedding:
                model.set_config(self.cfg)
            else:
                model.adopt_switches(self.cfg)
            for p, on in zip(model.parameters(), self.trainable, strict=True):
                p.requires_grad_(on)
        if compiled.is_compiled(model.llm) != self.cfg.train.compile:
            compiled.set_compiled(model.llm, self.cfg.train.compile)


def bench_config(recipe: str, llm: str, tower: str, batch_size: int, data_root: str | Path | None = None,
                 overrides: tuple[str, ...] | list[str] = (), caption_format: str = "") -> Config:
    """The recipe's config with the bench's models, batch size, data and caption format."""
    extra = [f"llm.name={llm}", f"vision.tower={tower}", f"train.batch_size={batch_size}"]
    if data_root:
        extra.append(f"data.root={data_root}")
    if caption_format:
        extra.append(f"data.caption_format={caption_format}")
    return load_config(recipe_config(recipe), extra + list(overrides))


def prepare_recipe(cfg: Config, n_batches: int, model: VLM | None = None, feature_store: str | Path | None = None,
                   seed: int = 0) -> RecipeData:
    """Load `cfg`'s model (or adopt `model`), the first records of its data kind (whole
    mega-batches of LENGTH_GROUP batches, at least `n_batches` batches) and their tower
    features."""
    recipe = RECIPES.get(cfg.recipe)
    torch.manual_seed(seed)
    if model is None:
        model = VLM.build(cfg)
    model.set_config(cfg)
    apply_recipe(model, recipe)
    bs = cfg.train.batch_size
    need = -(-max(n_batches * bs, bs * LENGTH_GROUP) // (bs * LENGTH_GROUP)) * bs * LENGTH_GROUP  # whole mega-batches
    report = LoadReport()
    records = DATA_KINDS.get(recipe.data).load(cfg, report)[:need]
    probes = [Sample(id=str(i), image=r.image) for i, r in enumerate(records)]
    features, kept = cache.tower_features(model, probes, report=report, store=feature_store or None)
    records = [records[int(p.id)] for p in kept]
    return RecipeData(cfg, model, recipe.data, records, features, TextStateCache(), report)


def mode_setup(data: RecipeData, mode: str, label: str | None = None, overrides: list[str] | None = None) -> ModeSetup:
    """The row for `mode` of a prepared recipe (`overrides` on top, e.g. another caption
    format)."""
    cfg = replace(data.cfg, mode_overrides(mode, data.cfg) + list(overrides or []))
    model = data.model
    model.set_config(cfg)
    apply_recipe(model, RECIPES.get(cfg.recipe))
    objective = Objective(cfg.objective).to(model.device)
    trainable = tuple(p.requires_grad for p in model.parameters())
    setup = ModeSetup(label or mode, cfg, data, objective, trainable, [])
    setup.activate()
    setup.batches = data.batches(objective, cfg)
    return setup


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing
class _ModeRun:
    """One row's optimizer, batches and step times while `measure_modes` takes turns."""

    def __init__(self, setup: ModeSetup, steps: int, accelerator: Accelerator) -> None:
        self.setup, self.accelerator = setup, accelerator
        if len(setup.batches) < steps or not steps:
            raise ValueError(f"{len(setup.batches)} batches prepared for {steps} timed steps; prepare_recipe(cfg, {steps})")
        setup.activate()
        self.timed = [_to(b, setup.model.device) for b in setup.batches[:steps]]
        self.step_module = TrainStep(setup.model, setup.objective)
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.times: list[float] = []
        self.warm: list[float] = []
        self.parts: dict[str, float] = {}

    def step(self, batch: dict) -> dict[str, float]:
        """The trainer's optimizer step on `batch` in this row's state."""
        self.setup.activate()
        with self.accelerator.autocast():
            parts, _ = optimizer_step(self.accelerator, self.step_module, self.setup.objective, [batch], self.params,
                                      self.optimizer, self.setup.cfg.train.max_grad_norm)
        return parts

    def timed_step(self, i: int, warm: bool) -> None:
        device = self.setup.model.device
        _sync(device)
        t = time.perf_counter()
        parts = self.step(self.timed[i])
        _sync(device)
        (self.warm if warm else self.times).append(time.perf_counter() - t)
        if not self.parts:
            self.parts = {k: v for k, v in parts.items() if k.endswith("_loss") or k == "loss"}


def measure_modes(setups: list[ModeSetup], steps: int, warmup: int, peak_gflops: float, threads: int | None = None,
                  accelerator: Accelerator | None = None) -> list[dict]:
    """Time rows taking turns step by step: every row runs its `warmup` untimed steps,
    then timed step i runs batch i of each row in turn, so a drift of the machine's speed
    falls on every row alike (timing them one after another let later ones look up to 25%
    faster). Memory is measured afterwards, one row at a time, on its largest batch. One
    result row per setup, in order."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    runs = [_ModeRun(s, steps, accelerator) for s in setups]
    for model in {id(s.model): s.model for s in setups}.values():
        model.train()
        model.llm.eval()  # as the trainer: no dropout in the backbones
        model.vision.eval()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for run in runs:
            for i in range(warmup):
                run.timed_step(i % steps, warm=True)
        for i in range(steps):
            for run in runs:
                run.timed_step(i, warm=False)
        return [_row(run, peak_gflops, threads or old_threads) for run in runs]
    finally:
        torch.set_num_threads(old_threads)
        for s in setups:
            if compiled.is_compiled(s.model.llm):
                compiled.set_compiled(s.model.llm, False)


def _token_counts(batch: dict) -> tuple[int, int]:
    """(real, padded) tokens of the batch's next-token sequences."""
    mask = batch.get("attention_mask")
    return (0, 0) if mask is None else (int(mask.sum()), mask.numel())


def _row(run: _ModeRun, peak_gflops: float, threads: int) -> dict:
    """The result row of a timed setup, with its memory measured now on its largest batch."""
    setup = run.setup
    setup.activate()
    model, objective = setup.model, setup.objective
    device = model.device
    largest = max(run.timed, key=lambda b: _token_counts(b)[1])
    weights = [*model.parameters(), *model.buffers(), *objective.parameters()]
    live = [*weights, *optimizer_tensors(run.optimizer), *(v for v in largest.values() if isinstance(v, Tensor))]
    probe = MemoryProbe(device)
    probe.start()  # one step gives the resident-set figures and (CPU) the allocator's peak
    step_peak = 0 if device.type == "cuda" else step_alloc_peak_bytes(lambda: run.step(largest))
    if device.type == "cuda":
        run.step(largest)
    _sync(device)
    peak, step_mem = probe.stop()
    # CUDA: max allocated (weights, optimizer state, batch and the step's tensors)
    alloc = peak if device.type == "cuda" else (storage_bytes(live) + step_peak) / 2**20
    saved = saved_activation_bytes(lambda: objective(model, largest)[0], exclude=weights)
    run.optimizer.zero_grad(set_to_none=True)
    times, timed = run.times, run.timed
    mean = statistics.mean(times)
    shape = LLMShape.of(model)
    side = SideFlops.of(model, timed[0].get("features"), setup.data.pixels())
    flops = [step_flops(model, objective, b, shape, side) for b in timed]
    executed = statistics.mean(f[0] for f in flops)
    useful = statistics.mean(f[1] for f in flops)
    real, padded = zip(*(_token_counts(b) for b in timed), strict=True)
    bs = setup.cfg.train.batch_size
    captions = setup.cfg.data.caption_format if setup.data.kind == "captions" else ""
    return {
        "recipe": setup.cfg.recipe, "mode": setup.label, "caption_format": captions,
        "ms_per_step": 1000 * statistics.median(times), "ms_mean": 1000 * mean,
        "ms_all": [round(1000 * t, 1) for t in times], "warmup_ms": [round(1000 * t, 1) for t in run.warm],
        "samples_per_s": bs / mean, "trained_tokens_per_s": statistics.mean(label_tokens(b) for b in timed) / mean,
        "tokens_per_s": statistics.mean(real) / mean, "padding_fraction": 1 - sum(real) / max(sum(padded), 1),
        "model_gflop": executed / 1e9, "useful_gflop": useful / 1e9,
        "mfu": executed / mean / (peak_gflops * 1e9), "useful_mfu": useful / mean / (peak_gflops * 1e9),
        "peak_alloc_mb": alloc, "peak_rss_mb": peak, "step_mem_mb": step_mem, "mem_method": probe.method,
        "saved_mb": saved / 2**20, "threads": threads, "switches": switch_values(setup.cfg), "losses": run.parts,
    }


# ----------------------------------------------------------------------------- the run
def recipe_setups(bc: BenchConfig, recipe: str, models: dict[tuple, VLM]) -> tuple[tuple, list[ModeSetup]]:
    """(shared-model key, the rows to time) of one recipe: optimised, naive, ablations,
    and the optimised step in each extra caption format."""
    cfg = bench_config(recipe, bc.llm, bc.tower, bc.batch_size, bc.data_root, bc.overrides, bc.caption_format)
    key = (cfg.lora.enabled, tuple(cfg.lora.target_modules), cfg.lora.r)
    data = prepare_recipe(cfg, bc.steps, models.get(key), bc.feature_store)
    models[key] = data.model
    modes = ["optimised"] + (["naive"] if bc.naive else []) + (ablations(cfg) if recipe in bc.ablate else [])
    setups = [mode_setup(data, mode) for mode in modes]
    if data.kind == "captions":
        for fmt in bc.extra_formats:
            if fmt != cfg.data.caption_format:
                setups.append(mode_setup(data, "optimised", f"optimised-{fmt}", [f"data.caption_format={fmt}"]))
    return key, setups


def run_bench(bc: BenchConfig) -> dict:
    """Benchmark one training step per recipe; print a table, write JSON to `bc.out`.

    Returns {"device", "peak_gflops", "load_avg_before", "results": [row, ...], "ratios":
    {...}, ...}; each row holds report.RESULT_KEYS (benchmarks/README.md)."""
    for r in bc.recipes:
        RECIPES.get(r)  # unknown ids fail here, naming the known ones
    if bc.num_threads:
        torch.set_num_threads(bc.num_threads)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_start = matmul_peak_gflops(device=device)
    load_before = os.getloadavg()
    results: list[dict] = []
    models: dict[tuple, VLM] = {}
    errors: list[dict] = []
    groups: dict[tuple, list[ModeSetup]] = {}  # recipes on one shared model are timed together
    for recipe in bc.recipes:
        try:
            key, setups = recipe_setups(bc, recipe, models)
            models[key].to(device)
            for s in setups:
                s.objective.to(device)
            groups.setdefault(key, []).extend(setups)
        except Exception as e:  # one broken recipe (data, model) must not lose the others' figures
            errors.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
            console.print(f"[yellow]bench: {recipe} failed ({type(e).__name__}: {e}); continuing")
    mixed = bench_config(bc.recipes[0], bc.llm, bc.tower, bc.batch_size, None, bc.overrides).train.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed or None, cpu=device.type != "cuda")
    for setups in groups.values():
        try:
            rows = measure_modes(setups, bc.steps, bc.warmup, peak_start, accelerator=accelerator)
        except Exception as e:
            for recipe in dict.fromkeys(s.cfg.recipe for s in setups):
                errors.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
            console.print(f"[yellow]bench: timing failed ({type(e).__name__}: {e}); continuing")
            continue
        results.extend(rows)
        if not bc.quiet:
            for row in rows:
                console.print(f"{row['recipe']:>15} {row['mode']:<22} {row['ms_mean']:8.0f} ms/step  "
                              f"peak alloc {row['peak_alloc_mb']:.0f} MB")
    if bc.threads and groups:
        first = next(iter(groups.values()))[0]
        for n in bc.threads:
            row = measure_modes([first], bc.steps, bc.warmup, peak_start, threads=n, accelerator=accelerator)[0]
            row["mode"] = f"optimised-threads{n}"
            results.append(row)
    results.sort(key=lambda r: list(bc.recipes).index(r["recipe"]))  # stable: modes keep their order
    # The peak again at the end; MFU is against the higher of the two (a conservative MFU).
    peak_end = matmul_peak_gflops(device=device)
    peak = max(peak_start, peak_end)
    for r in results:
        r["mfu"] *= peak_start / peak
        r["useful_mfu"] *= peak_start / peak
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "peak_gflops": peak, "peak_gflops_start": peak_start,
        "peak_gflops_end": peak_end, "llm": bc.llm, "tower": bc.tower, "batch_size": bc.batch_size,
        "steps": bc.steps, "warmup": bc.warmup, "caption_format": bc.caption_format or "config default",
        "mixed_precision": mixed or "no", "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t0, "results": results, "ratios": bench_ratios(results), "errors": errors,
    }
    if not bc.quiet:
        wide = Console(width=max(console.width, 200)) if not console.is_terminal else console
        wide.print(bench_table(report))
    if bc.out:
        out = Path(bc.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        if not bc.quiet:
            console.print(f"wrote {out}")
    return report


def bench_from_args(args) -> int:
    """`vlmalign bench` from parsed CLI arguments (cli.py's `bench` parser)."""

    def names(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in (text or "").split(",") if t.strip())

    extra = names(getattr(args, "extra_formats", ""))
    if getattr(args, "plain_reference", False):
        extra += ("plain",)
    run_bench(BenchConfig(
        recipes=names(args.recipes) or BENCH_RECIPES, llm=args.llm, tower=args.tower, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, naive=not args.no_naive, ablate=names(args.ablate),
        threads=tuple(int(t) for t in names(args.threads)), caption_format=args.caption_format or "",
        extra_formats=extra, data_root=args.data_root or "", overrides=tuple(args.overrides),
        feature_store=args.feature_store or "", num_threads=args.num_threads or 0, out=args.json or "",
    ))
    return 0
