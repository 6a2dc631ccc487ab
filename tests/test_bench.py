"""The bench: every mode (the training step with switches flipped) gives the losses and
gradients of a naive reference written in the tests (tests/naive_step.py), on every
recipe; the analytic FLOP count matches torch's counter; run_bench returns the documented
keys and measures the training defaults. Never checks wall-clock time."""

import json
import math

import pytest
import torch

from tests.naive_step import naive_loss
from vlmalign.bench import (
    RESULT_KEYS,
    BenchConfig,
    ablations,
    bench_config,
    measure_modes,
    mode_overrides,
    mode_setup,
    prepare_recipe,
    run_bench,
)
from vlmalign.bench.flops import LLMShape, SideFlops, counted_flops, step_flops
from vlmalign.bench.memory import saved_activation_bytes, step_alloc_peak_bytes, storage_bytes
from vlmalign.config import Config

TINY = ("projector.pool_size=2", "objective.patch_pool=2", "data.long_max_tokens=200")
RECIPES = ["align", "align-cg", "align-clip", "instruct", "discriminative"]


@pytest.fixture(scope="module")
def prepared(shapes_root):
    """One prepared recipe per (recipe, caption format), reused by the tests of this module."""
    cache = {}

    def get(recipe, caption_format="prompted", *extra):
        key = (recipe, caption_format, extra)
        if key not in cache:
            cfg = bench_config(recipe, "tiny", "tiny", 4, shapes_root, TINY + extra, caption_format)
            cache[key] = prepare_recipe(cfg, 1)
        return cache[key]

    return get


def _params(setup):
    return [(f"model.{n}", p) for n, p in setup.model.named_parameters()] + [
        (f"objective.{n}", p) for n, p in setup.objective.named_parameters()
    ]


def _loss_and_grads(setup, loss_fn):
    """Loss parts and gradients of the setup's first batch under `loss_fn(model, objective,
    batch)`, in the setup's state."""
    setup.activate()
    for _, p in _params(setup):
        p.grad = None
    loss, parts = loss_fn(setup.model, setup.objective, setup.batches[0])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in _params(setup) if p.grad is not None}
    return {k: float(v.detach()) for k, v in parts.items() if k.endswith("loss")}, grads


def _assert_same(a, b, label):
    (pa, ga), (pb, gb) = a, b
    assert set(pa) == set(pb) and set(ga) == set(gb) and ga, label
    for k in pa:
        assert pa[k] == pytest.approx(pb[k], rel=1e-5, abs=1e-6), (label, k)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), (label, n, (ga[n] - gb[n]).abs().max())


def _objective(model, objective, batch):
    return objective(model, batch)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_mode_matches_the_naive_reference(prepared, recipe):
    """optimised, naive and each single-switch ablation: the training objective under those
    switches equals the naive reference on the same batch (losses and gradients)."""
    data = prepared(recipe)
    for mode in ["optimised", "naive", *ablations(data.cfg)]:
        if mode == "compile":
            continue  # compiled layers: test_compile_mode_keeps_losses_and_gradients
        setup = mode_setup(data, mode)
        _assert_same(_loss_and_grads(setup, _objective), _loss_and_grads(setup, naive_loss), f"{recipe} {mode}")


def test_modes_really_switch_the_computation(prepared):
    """The switches reach the step: the naive mode runs the tower on pixels, the full
    vocabulary head, separate passes and no text cache; the optimised mode does none of it."""
    data = prepared("align-clip")
    opt, naive = mode_setup(data, "optimised"), mode_setup(data, "naive")
    assert "features" in opt.batches[0] and "text_states" in opt.batches[0] and "prompt_state_at" in opt.batches[0]
    assert "pixel_values" in naive.batches[0] and "features" not in naive.batches[0]
    assert "text_states" not in naive.batches[0]
    assert not naive.cfg.objective.head_at_labels and not naive.cfg.llm.prefix_kv
    assert naive.objective.shared_state_at(naive.model, naive.batches[0]) is None
    opt.activate()
    assert opt.objective.shared_state_at(opt.model, opt.batches[0]) is not None
    # every switch is a config value the training code reads, flipped by mode_overrides
    assert set(mode_overrides("naive")) == {f"{k}=false" for k in
                                            ("train.cache_vision_features", "objective.head_at_labels",
                                             "objective.shared_pass", "llm.prefix_kv", "train.cache_text_embeddings",
                                             "train.group_by_length", "llm.lean_mlp", "train.compile")}
    with pytest.raises(ValueError, match="no-shared_pass"):
        mode_overrides("no-such-switch")


def test_compile_mode_keeps_losses_and_gradients(prepared):
    data = prepared("align")
    reference = _loss_and_grads(mode_setup(data, "optimised"), _objective)
    compiled = mode_setup(data, "compile")
    try:
        _assert_same(reference, _loss_and_grads(compiled, _objective), "compile")
    finally:
        mode_setup(data, "optimised").activate()  # eager layers again for the other tests


def test_plain_captions_match_the_reference_in_both_modes(prepared):
    data = prepared("align-clip", "plain")
    for mode in ("optimised", "naive"):
        setup = mode_setup(data, mode)
        assert "prompt_state_at" not in setup.batches[0]
        _assert_same(_loss_and_grads(setup, _objective), _loss_and_grads(setup, naive_loss), f"plain {mode}")


def test_a_broken_optimisation_is_caught_by_the_reference(prepared, monkeypatch):
    """The reference can fail: an off-by-one shared-pass position changes the loss."""
    from vlmalign import objective as objective_module

    data = prepared("align-clip")
    setup = mode_setup(data, "optimised")
    real = objective_module.Objective.shared_state_at
    monkeypatch.setattr(objective_module.Objective, "shared_state_at",
                        lambda self, m, b: None if real(self, m, b) is None else real(self, m, b) - 1)
    ours, ref = _loss_and_grads(setup, _objective), _loss_and_grads(setup, naive_loss)
    assert ours[0]["clip_loss"] != pytest.approx(ref[0]["clip_loss"], rel=1e-4)


@pytest.mark.parametrize(("recipe", "fmt", "modes"), [
    ("align-clip", "prompted", ("optimised", "naive")),
    # plain captions: the image embedding takes its own pass, after the cached chat head
    ("align-clip", "plain", ("optimised", "naive", "no-text_cache")),
    ("instruct", "prompted", ("optimised", "naive")),
    ("discriminative", "prompted", ("optimised", "naive")),
])
def test_analytic_flops_match_torch_flop_counter(prepared, recipe, fmt, modes):
    """The analytic count (bench/flops.py) against FlopCounterMode on the executed step,
    with eager attention (whose matmuls the counter sees)."""
    data = prepared(recipe, fmt)
    m = data.model
    assert m._image_prefix.ids  # the tiny chat template's head: a cached prefix to count
    m.llm.config._attn_implementation = "eager"
    try:
        shape = LLMShape.of(m)
        for mode in modes:
            setup = mode_setup(data, mode)
            batch = setup.batches[0]
            side = SideFlops.of(m, batch.get("features"), data.pixels())

            def step(batch=batch, setup=setup):
                loss, _ = setup.objective(m, batch)
                loss.backward()

            counted = counted_flops(step)
            executed, useful = step_flops(m, setup.objective, batch, shape, side)
            assert executed == pytest.approx(counted, rel=0.02), (recipe, mode)
            assert 0 < useful <= executed * 1.0001
    finally:
        m.llm.config._attn_implementation = "sdpa"


def test_run_bench_measures_the_training_defaults_and_returns_the_documented_keys(shapes_root, tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(BenchConfig(recipes=("align", "align-clip"), llm="tiny", tower="tiny", batch_size=4, steps=1,
                                   warmup=0, out=str(out), data_root=str(shapes_root), overrides=TINY,
                                   extra_formats=("prompted",), quiet=True))
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert [(r["recipe"], r["mode"]) for r in report["results"]] == [
        ("align", "optimised"), ("align", "naive"), ("align", "optimised-prompted"),
        ("align-clip", "optimised"), ("align-clip", "naive"), ("align-clip", "optimised-prompted")]
    rows = {(r["recipe"], r["mode"]): r for r in report["results"]}
    # the default rows use training's default caption format, and say so
    assert rows[("align-clip", "optimised")]["caption_format"] == Config().data.caption_format
    assert rows[("align-clip", "optimised-prompted")]["caption_format"] == "prompted"
    for row in report["results"]:
        assert set(RESULT_KEYS) <= set(row)
        for key in ("ms_per_step", "ms_mean", "samples_per_s", "mfu", "useful_mfu", "model_gflop", "peak_alloc_mb",
                    "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["mode"], key)
        assert 0 <= row["padding_fraction"] < 1
    # The naive step does strictly more work than the optimised one on the same recipe.
    for recipe in ("align", "align-clip"):
        assert rows[(recipe, "naive")]["model_gflop"] > rows[(recipe, "optimised")]["model_gflop"]
    assert rows[("align", "optimised")]["padding_fraction"] <= rows[("align", "naive")]["padding_fraction"]
    assert report["peak_gflops"] > 0
    assert {"align-clip/naive_over_optimised_time", "align-clip/optimised_over_align_time",
            "align-clip/optimised-prompted_over_align_time",
            "align/optimised_over_naive_step_mem", "align/optimised_over_naive_alloc_peak"} <= set(report["ratios"])
    # The naive align-clip step keeps full-vocabulary logits and the tower's activations.
    assert rows[("align-clip", "naive")]["peak_alloc_mb"] > rows[("align-clip", "optimised")]["peak_alloc_mb"]


def test_unknown_recipe_names_the_known_ones(shapes_root):
    with pytest.raises(Exception, match="align-clip"):
        run_bench(BenchConfig(recipes=("align-clp",), llm="tiny", tower="tiny", data_root=str(shapes_root), quiet=True))


def test_saved_activation_bytes_counts_what_backward_keeps():
    w = torch.randn(8, 8)  # a frozen weight: kept for the input gradient, excluded as a weight
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_activation_bytes(lambda: (x @ w).sum(), exclude=[w]) == 0
    assert saved_activation_bytes(lambda: (x @ w).sum()) == w.numel() * 4
    # tanh keeps its output [4, 8]; exp keeps its output too: two distinct storages
    assert saved_activation_bytes(lambda: (x.tanh().exp()).sum(), exclude=[w]) == 2 * 4 * 8 * 4


def test_every_data_setting_batches_the_same_samples(shapes_root):
    """With a whole mega-batch of steps, grouped and ungrouped batches (cached features or
    pixels) hold exactly the same samples: modes are timed on the same tokens."""
    data = prepare_recipe(bench_config("align-clip", "tiny", "tiny", 4, shapes_root, TINY), 8)
    seen, pad = {}, {}
    for mode in ("optimised", "naive", "no-group_by_length", "no-feature_cache"):
        batches = mode_setup(data, mode).batches
        assert len(batches) == 8, mode
        seen[mode] = sorted(c for b in batches for c in b["captions"])
        pad[mode] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert len({tuple(v) for v in seen.values()}) == 1
    assert len(seen["optimised"]) == 32
    assert pad["optimised"] <= pad["no-group_by_length"]


def test_step_alloc_peak_bytes_is_the_live_tensor_peak():
    kept = torch.empty(3 << 20, dtype=torch.uint8)  # allocated before: not the step's

    def step():
        nonlocal kept
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(4 << 20, dtype=torch.uint8)  # 5 MiB live here: the peak
        del a, b
        kept = None  # freeing older memory does not lower the step's count below its start
        c = torch.empty(2 << 20, dtype=torch.uint8)
        return c

    assert step_alloc_peak_bytes(step) == 5 << 20
    assert step_alloc_peak_bytes(lambda: None) == 0


def test_storage_bytes_counts_each_storage_once():
    w = torch.zeros(10, 10)
    assert storage_bytes([w, w[:5], w.t()]) == 400
    assert storage_bytes([w, torch.zeros(3)]) == 412


def test_recipes_sharing_a_model_take_turns_in_their_own_state(shapes_root):
    """measure_modes alternates recipes on one model: each step runs under its recipe's
    config and trainable parameters (ModeSetup.activate), as if timed alone."""
    align_data = prepare_recipe(bench_config("align", "tiny", "tiny", 4, shapes_root, TINY), 1)
    align = mode_setup(align_data, "optimised")
    frozen_data = prepare_recipe(bench_config("align-clip", "tiny", "tiny", 4, shapes_root,
                                              TINY + ("projector.frozen=true",)), 1, model=align_data.model)
    frozen = mode_setup(frozen_data, "optimised")
    model = align_data.model
    assert model.cfg is frozen.cfg and not any(p.requires_grad for p in model.projector.parameters())
    align.activate()
    assert model.cfg is align.cfg and all(p.requires_grad for p in model.projector.parameters())
    expected = align.objective(model, align.batches[0])[1]["loss"]
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    rows = measure_modes([frozen, align], 1, 0, 100.0)
    assert [r["recipe"] for r in rows] == ["align-clip", "align"]
    assert rows[1]["losses"]["loss"] == pytest.approx(float(expected), rel=1e-5)
    # align's steps trained the projector; align-clip's (projector frozen) could not
    assert any(not torch.equal(before[n], p) for n, p in model.projector.named_parameters())
