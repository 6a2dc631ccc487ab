"""The experiment statistics (bootstrap over seeds and items, paired differences, MDE,
verdicts) and the runner's resume, on cheap fake variants (no model)."""

import json

import numpy as np
import pytest

from vlmalign.experiments import stats
from vlmalign.experiments.runner import (
    Experiment,
    Metric,
    Variant,
    VariantResult,
    read_records,
    run_experiment,
)


def _naive_means(x: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    return np.array([x[np.ix_(s, i)].mean() for s, i in zip(seed_idx, item_idx, strict=True)])


def test_bootstrap_means_match_a_naive_loop():
    rng = np.random.default_rng(1)
    x = rng.random((3, 17))
    si, ii = stats.draw_indices(np.random.default_rng(5), 200, 3, 17)
    np.testing.assert_allclose(stats.bootstrap_means(x, si, ii), _naive_means(x, si, ii), rtol=1e-12)


def test_interval_of_constant_values_has_zero_width_and_the_mean():
    ci = stats.interval(np.full((3, 50), 0.7))
    assert ci.mean == pytest.approx(0.7) and ci.lo == pytest.approx(0.7) and ci.hi == pytest.approx(0.7)


def test_item_interval_matches_the_binomial_normal_approximation():
    # one seed, 400 Bernoulli(0.5) items: half-width ~ 1.96 * sqrt(0.25 / 400) = 0.049
    x = np.array([[1.0, 0.0] * 200])
    ci = stats.interval(x, draws=4000)
    assert ci.half_width == pytest.approx(1.96 * np.sqrt(0.25 / 400), rel=0.1)


def test_seed_noise_widens_the_interval():
    items = np.tile(np.array([1.0, 0.0] * 100), (3, 1))  # the same items on every seed
    shifted = items + np.array([[-0.2], [0.0], [0.2]])  # a seed offset on top
    assert stats.interval(shifted).half_width > 1.5 * stats.interval(items).half_width


def test_paired_difference_is_narrower_than_unpaired_when_items_correlate():
    rng = np.random.default_rng(0)
    base = rng.random((3, 300))  # item difficulty shared by both variants
    a, b = base + 0.02, base + rng.normal(0, 0.01, (3, 300))
    paired = stats.paired_difference(a, b)
    unpaired_hw = np.hypot(stats.interval(a).half_width, stats.interval(b).half_width)
    assert paired.half_width < 0.2 * unpaired_hw
    assert paired.lo > 0  # 0.02 detected because the pairs share items


def test_paired_difference_uses_the_same_draws_for_both():
    a = np.random.default_rng(2).random((2, 40))
    d = stats.paired_difference(a, a)
    assert d.mean == 0 and d.lo == 0 and d.hi == 0


def test_ratio_interval_contains_the_ratio():
    a = np.full((3, 100), 0.5)
    a[:, :10] = 1.0
    b = np.full((3, 100), 0.5)
    r = stats.ratio_interval(a, b)
    assert r.mean == pytest.approx(0.55 / 0.5)
    assert r.lo <= r.mean <= r.hi and r.lo > 1.0


def test_mde_is_the_power_factor_times_the_half_width():
    d = stats.Interval(0.0, -1.0, 1.0, 3, 100)
    assert stats.mde(d) == pytest.approx((1.959964 + 0.841621) / 1.959964)
    assert stats.items_for_mde(d, stats.mde(d) / 2) == 400  # half the MDE: 4x the items


@pytest.mark.parametrize(("lo", "hi", "effect", "expected"), [
    (0.5, 3.0, 2.0, "supported"),
    (-3.0, -0.5, 0.0, "not supported"),
    (-0.5, 1.0, 2.0, "not supported"),  # rules out the claimed +2
    (-5.0, 5.0, 2.0, "underpowered"),  # MDE ~7 > 2
    (-0.5, 2.5, 2.5, "inconclusive"),  # half-width 1.5 -> MDE 2.14 < 2.5, and +2.5 not ruled out
    (-0.2, 2.4, 4.0, "not supported"),
    (-0.5, 5.0, 4.0, "inconclusive"),
    (-0.5, 0.5, 0.0, "inconclusive"),
])
def test_verdicts(lo, hi, effect, expected):
    d = stats.Interval((lo + hi) / 2, lo, hi, 3, 100)
    assert stats.verdict(d, effect) == expected


def test_threshold_verdicts():
    assert stats.threshold_verdict(stats.Interval(1.0, 0.96, 1.04, 3, 300), 0.95, 0.05) == "supported"
    assert stats.threshold_verdict(stats.Interval(0.8, 0.7, 0.9, 3, 300), 0.95, 0.05) == "not supported"
    assert stats.threshold_verdict(stats.Interval(0.9, 0.6, 1.2, 3, 300), 0.95, 0.05) == "underpowered"
    assert stats.threshold_verdict(stats.Interval(0.95, 0.92, 0.98, 3, 300), 0.95, 0.05) == "inconclusive"


def test_judge_flips_lower_is_better():
    vals = {"a": np.full((3, 1), 1.0), "b": np.full((3, 1), 2.0)}
    c = stats.Claim("loss", "a has a lower loss", "loss", better="a", worse="b", lower_is_better=True)
    assert stats.judge(c, vals)["verdict"] == "supported"


# ---------------------------------------------------------------- the runner


class Boom(RuntimeError):
    pass


def _experiment(calls: list, fail_at: tuple[str, int] | None = None, settings: dict | None = None) -> Experiment:
    def make(name: str, offset: float):
        def run(shared, seed):
            if fail_at == (name, seed):
                raise Boom(name)
            calls.append((name, seed))
            assert shared == {"seed": seed}
            items = [float((i + seed) % 3 == 0 or offset > 0.5 and i % 2 == 0) for i in range(30)]
            return VariantResult({"acc": float(np.mean(items)), "loss": 1.0 - offset}, {"acc": items})
        return Variant(name, run)

    return Experiment(
        name="fake", title="fake experiment", variants=[make("base", 0.0), make("better", 1.0)], seeds=[0, 1, 2],
        setup=lambda seed: {"seed": seed},
        metrics=[Metric("acc", "accuracy", chance=0.5), Metric("loss", "loss", lower_is_better=True, unit="")],
        claims=[stats.Claim("c1", "better beats base", "acc", "better", "base", effect=0.05)],
        settings=settings or {"steps": 3},
    )


def test_runner_resumes_after_a_kill_and_skips_finished_runs(tmp_path):
    calls: list = []
    with pytest.raises(Boom):
        run_experiment(_experiment(calls, fail_at=("better", 0)), tmp_path, log=lambda s: None)
    assert calls == [("base", 0)]
    assert [(r["variant"], r["seed"]) for r in read_records(tmp_path / "results.jsonl")] == [("base", 0)]
    calls.clear()
    summary = run_experiment(_experiment(calls), tmp_path, log=lambda s: None)
    assert ("base", 0) not in calls and calls[0] == ("better", 0) and len(calls) == 5
    assert summary["seeds"] == [0, 1, 2]
    assert len(summary["records"]) == 6
    acc = summary["metrics"]["acc"]["variants"]
    assert len(acc["base"]["per_seed"]) == 3 and acc["base"]["items"] == 30
    assert summary["claims"][0]["verdict"] in {"supported", "not supported", "inconclusive", "underpowered"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["provenance"]["data_sha256"] == {} and saved["provenance"]["vlmalign_version"]
    assert (tmp_path / "plot.png").stat().st_size > 5000 and "better beats base" in (tmp_path / "table.md").read_text()


def test_runner_ignores_a_line_cut_short_by_a_kill(tmp_path):
    calls: list = []
    run_experiment(_experiment(calls), tmp_path, log=lambda s: None)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls.clear()
    run_experiment(_experiment(calls), tmp_path, log=lambda s: None)
    assert calls == [("better", 2)]
    assert len(read_records(tmp_path / "results.jsonl")) == 6


def test_runner_refuses_to_resume_with_other_settings(tmp_path):
    from vlmalign.experiments.runner import SettingsMismatch

    run_experiment(_experiment([]), tmp_path, log=lambda s: None)
    with pytest.raises(SettingsMismatch):
        run_experiment(_experiment([], settings={"steps": 4}), tmp_path, log=lambda s: None)


def test_report_only_on_an_empty_folder_summarises_nothing(tmp_path):
    summary = run_experiment(_experiment([]), tmp_path, log=lambda s: None, execute=False)
    assert summary["seeds"] == [] and summary["metrics"] == {} and summary["claims"][0]["verdict"] == "not run"


def test_one_seed_without_items_is_never_a_verdict():
    d = stats.paired_difference([[2.0]], [[1.0]])  # one seed, one per-seed value each
    assert d.lo == d.hi == 1.0 and stats.verdict(d, 0.0) == "underpowered"


def test_the_plot_draws_every_claimed_metric_first_and_says_when_it_leaves_some_out():
    from vlmalign.experiments.report import plot_metrics

    metrics = {f"m{i}": {"label": f"m{i}"} for i in range(20)}
    summary = {"metrics": metrics, "claims": [{"metric": "m18"}, {"metric": "m3"}]}
    keys = [k for k, _ in plot_metrics(summary, max_metrics=5)]
    assert keys == ["m3", "m18", "m0", "m1", "m2"]  # claimed ones first, in the table's order, then the rest
    assert [k for k, _ in plot_metrics(summary, max_metrics=30)] == ["m3", "m18", *[f"m{i}" for i in range(20)
                                                                                  if i not in (3, 18)]]
