"""The bench: naive, optimised and every single-optimisation mode compute the same losses
and gradients; the analytic FLOP count matches torch's counter; run_bench returns the
documented keys. Never checks wall-clock time."""

import json
import math

import pytest
import torch

from vlmalign.bench import (
    NAIVE,
    OPTIMISED,
    RESULT_KEYS,
    LLMShape,
    SideFlops,
    ablations,
    bench_config,
    bench_loss,
    counted_flops,
    measure_modes,
    prepare_recipe,
    run_bench,
    saved_activation_bytes,
    step_alloc_peak_bytes,
    step_flops,
    storage_bytes,
)

TINY = ["projector.pool_size=2", "objective.patch_pool=2", "data.long_max_tokens=200"]
RECIPES = ["align", "align-cg", "align-clip", "instruct", "discriminative"]


def _setup(recipe, root, caption_format="prompted"):
    cfg = bench_config(recipe, "tiny", "tiny", 4, root, TINY)
    return prepare_recipe(cfg, 1, caption_format)


def _params(setup):
    return [(f"model.{n}", p) for n, p in setup.model.named_parameters()] + [
        (f"objective.{n}", p) for n, p in setup.objective.named_parameters()
    ]


def _loss_and_grads(setup, settings):
    """Loss parts and gradients of the first length-grouped batch (the same samples in
    every mode; pixels instead of cached features when the feature cache is off)."""
    batch = setup.batches[(settings.feature_cache, True)][0]
    for _, p in _params(setup):
        p.grad = None
    loss, parts = bench_loss(setup.model, setup.objective, batch, settings)
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


@pytest.mark.parametrize("recipe", RECIPES)
def test_naive_and_optimised_give_the_same_losses_and_gradients(shapes_root, recipe):
    setup = _setup(recipe, shapes_root)
    naive_batch = setup.batches[(False, True)][0]
    assert "pixel_values" in naive_batch and "features" not in naive_batch  # the tower runs
    _assert_same(_loss_and_grads(setup, OPTIMISED), _loss_and_grads(setup, NAIVE), recipe)


def test_each_optimisation_alone_keeps_losses_and_gradients(shapes_root):
    setup = _setup("align-clip", shapes_root)
    assert "prompt_state_at" in setup.batches[(True, True)][0]  # the shared pass applies
    reference = _loss_and_grads(setup, OPTIMISED)
    for name, settings in ablations().items():
        _assert_same(reference, _loss_and_grads(setup, settings), name)


def test_plain_captions_give_the_same_losses_in_both_modes(shapes_root):
    setup = _setup("align-clip", shapes_root, caption_format="plain")
    assert "prompt_state_at" not in setup.batches[(True, True)][0]
    _assert_same(_loss_and_grads(setup, OPTIMISED), _loss_and_grads(setup, NAIVE), "plain")


@pytest.mark.parametrize("recipe", ["align-clip", "instruct", "discriminative"])
def test_analytic_flops_match_torch_flop_counter(shapes_root, recipe):
    """The analytic count (module docstring of bench.py) against FlopCounterMode on the
    executed step, with eager attention (whose matmuls the counter sees)."""
    setup = _setup(recipe, shapes_root)
    m = setup.model
    m.llm.config._attn_implementation = "eager"
    shape = LLMShape.of(m)
    pixels = setup.batches[(False, True)][0]["pixel_values"]
    side = SideFlops.of(m, setup.batches[(True, True)][0].get("features"), pixels)
    for settings in (OPTIMISED, NAIVE):
        batch = setup.batches[(settings.feature_cache, True)][0]

        def step(batch=batch, settings=settings):
            loss, _ = bench_loss(m, setup.objective, batch, settings)
            loss.backward()

        counted = counted_flops(step)
        executed, useful = step_flops(m, setup.objective, batch, settings, shape, side)
        assert executed == pytest.approx(counted, rel=0.02), (recipe, settings)
        assert 0 < useful <= executed * 1.0001
    m.llm.config._attn_implementation = "sdpa"


def test_run_bench_returns_the_documented_keys(shapes_root, tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(["align", "align-clip"], llm="tiny", tower="tiny", batch_size=4, steps=1, warmup=0,
                       naive=True, out=out, data_root=shapes_root, overrides=TINY, quiet=True)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert [(r["recipe"], r["mode"]) for r in report["results"]] == [
        ("align", "optimised"), ("align", "naive"), ("align-clip", "optimised"), ("align-clip", "naive")]
    for row in report["results"]:
        assert set(RESULT_KEYS) <= set(row)
        for key in ("ms_per_step", "ms_mean", "samples_per_s", "mfu", "useful_mfu", "model_gflop", "peak_alloc_mb",
                    "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["mode"], key)
        assert 0 <= row["padding_fraction"] < 1
    rows = {(r["recipe"], r["mode"]): r for r in report["results"]}
    # The naive step does strictly more work than the optimised one on the same recipe.
    for recipe in ("align", "align-clip"):
        assert rows[(recipe, "naive")]["model_gflop"] > rows[(recipe, "optimised")]["model_gflop"]
    assert rows[("align", "optimised")]["padding_fraction"] <= rows[("align", "naive")]["padding_fraction"]
    assert report["peak_gflops"] > 0
    assert {"align-clip/naive_over_optimised_time", "align-clip/optimised_over_align_time",
            "align/optimised_over_naive_step_mem", "align/optimised_over_naive_alloc_peak"} <= set(report["ratios"])
    # The naive align-clip step keeps full-vocabulary logits and the tower's activations.
    assert rows[("align-clip", "naive")]["peak_alloc_mb"] > rows[("align-clip", "optimised")]["peak_alloc_mb"]


def test_unknown_recipe_names_the_known_ones(shapes_root):
    with pytest.raises(Exception, match="align-clip"):
        run_bench(["align-clp"], llm="tiny", tower="tiny", data_root=shapes_root, quiet=True)


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
    cfg = bench_config("align-clip", "tiny", "tiny", 4, shapes_root, TINY)
    setup = prepare_recipe(cfg, 8)
    seen = {}
    for key, batches in setup.batches.items():
        assert len(batches) == 8, key
        seen[key] = sorted(c for b in batches for c in b["captions"])
    assert len({tuple(v) for v in seen.values()}) == 1
    assert len(seen[(True, True)]) == 32
    pad = {k: sum(int((b["attention_mask"] == 0).sum()) for b in setup.batches[k]) for k in setup.batches}
    assert pad[(True, True)] <= pad[(True, False)]


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
    config and trainable parameters (RecipeSetup.activate), as if timed alone."""
    align = prepare_recipe(bench_config("align", "tiny", "tiny", 4, shapes_root, TINY), 1)
    frozen = prepare_recipe(bench_config("align-clip", "tiny", "tiny", 4, shapes_root, TINY + ["projector.frozen=true"]),
                            1, model=align.model)
    model = align.model
    assert model.cfg is frozen.cfg and not any(p.requires_grad for p in model.projector.parameters())
    align.activate()
    assert model.cfg is align.cfg and all(p.requires_grad for p in model.projector.parameters())
    expected = bench_loss(model, align.objective, align.batches[(True, True)][0], OPTIMISED)[1]["loss"]
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    rows = measure_modes([(frozen, "optimised"), (align, "optimised")], 1, 0, 100.0)
    assert [r["recipe"] for r in rows] == ["align-clip", "align"]
    assert rows[1]["losses"]["loss"] == pytest.approx(float(expected), rel=1e-5)
    # align's steps trained the projector; align-clip's (projector frozen) could not
    assert any(not torch.equal(before[n], p) for n, p in model.projector.named_parameters())
