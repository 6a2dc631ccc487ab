"""Intervals, minimum detectable effects and verdicts for experiments (plain numpy).

An experiment measures each variant on several seeds and, where a metric is a mean over
evaluation items (a retrieval query, a compositional pair, a multiple-choice question),
on the same items for every variant and seed. Its uncertainty has two sources, the seed
(training noise) and the finite item set (evaluation noise), so the bootstrap here
resamples both (a two-way bootstrap over a crossed design; Efron & Tibshirani 1993):

    one draw:  seeds s*_1..s*_S from the S seeds, items i*_1..i*_N from the N items, each
               with replacement;  stat* = mean over (s*, i*) of x[s*, i*]

The 95% interval is the 2.5 and 97.5 percentiles of stat* over the draws (percentile
bootstrap). A paired difference between variants A and B uses the SAME draws for both
(their runs share seeds, initial weights and items), which is what makes a small
difference detectable at all. A metric with only per-seed values (a loss, a wall time)
resamples seeds alone.

Minimum detectable effect (MDE) of a comparison, from the half-width h of the 95%
interval of its difference: the true effect that a two-sided test at 5% detects with
80% power is (z_0.975 + z_0.8) * se = (1.96 + 0.84) / 1.96 * h ~= 1.43 h.

Verdict of a claim "A exceeds B" (difference d = A - B, interval [lo, hi], effect the
paper claims `effect` >= 0, and MDE):

- supported: lo > 0 (the difference is positive at 95%);
- not supported: hi < effect when a positive effect is claimed (the interval rules out
  an effect as large as the paper's; this includes a significant opposite effect), or
  hi < 0 when no size is claimed;
- underpowered: neither, and MDE > effect: this run could not have detected the claimed
  effect; the report says what size could (`items_for_mde`);
- inconclusive: neither, though the run was powered for the claimed effect.

A claim "X reaches a threshold t" (CG-VLM: 10% of the data reaches 95% of the full
data's accuracy) is judged the same way on X - t with effect 0: supported when lo >= t,
not supported when hi < t, underpowered when the interval's half-width exceeds the
stated tolerance, inconclusive otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95%
Z80 = 0.8416212335729143  # 80% power
MDE_FACTOR = (Z95 + Z80) / Z95  # MDE = factor x half-width of the 95% interval
DEFAULT_DRAWS = 2000
VERDICTS = ("supported", "not supported", "inconclusive", "underpowered")


def as_matrix(values: list[list[float]] | list[float] | np.ndarray) -> np.ndarray:
    """Per-seed values [S] or per-seed-per-item values [S, N] as a float [S, N] matrix
    (per-seed values become [S, 1]: one "item" per seed)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected values [seeds] or [seeds, items] with at least one of each, got shape {x.shape}")
    return x


def draw_indices(rng: np.random.Generator, draws: int, seeds: int, items: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap index draws: seed indices [draws, seeds] and item indices [draws, items].
    With one item (per-seed values) the item index is always 0."""
    seed_idx = rng.integers(0, seeds, size=(draws, seeds))
    item_idx = rng.integers(0, items, size=(draws, items)) if items > 1 else np.zeros((draws, 1), dtype=np.int64)
    return seed_idx, item_idx


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n indices occurs in each row of idx [draws, k] -> [draws, n]."""
    draws = idx.shape[0]
    flat = (idx + np.arange(draws)[:, None] * n).ravel()
    return np.bincount(flat, minlength=draws * n).reshape(draws, n).astype(np.float64)


def bootstrap_means(x: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """stat* of every draw: the mean of x[S, N] over the resampled seeds x items [draws].

    Uses mean over (s*, i*) of x[s*, i*] = (u^T x w) / (S N), where u [S] and w [N] count
    how often each seed and item was drawn: one [draws, N] x [N, S] product."""
    s, n = x.shape
    u = _counts(seed_idx, s)  # [draws, S]
    w = _counts(item_idx, n)  # [draws, N]
    return (u * (w @ x.T)).sum(axis=1) / (seed_idx.shape[1] * item_idx.shape[1])


@dataclass
class Interval:
    """A mean with its 95% bootstrap interval."""

    mean: float
    lo: float
    hi: float
    seeds: int
    items: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict[str, float]:
        """The fields, the half-width and the 95% interval as one pair [lo, hi]."""
        return asdict(self) | {"half_width": self.half_width, "interval_95": [self.lo, self.hi]}


def interval(values, draws: int = DEFAULT_DRAWS, seed: int = 0) -> Interval:
    """Mean and 95% percentile-bootstrap interval of per-seed [S] or per-seed-per-item
    [S, N] values (resampling seeds and items)."""
    x = as_matrix(values)
    rng = np.random.default_rng(seed)
    si, ii = draw_indices(rng, draws, *x.shape)
    stats = bootstrap_means(x, si, ii)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return Interval(float(x.mean()), float(lo), float(hi), x.shape[0], x.shape[1] if x.shape[1] > 1 else 0)


def paired_difference(a, b, draws: int = DEFAULT_DRAWS, seed: int = 0) -> Interval:
    """Mean of a - b and its 95% interval, resampling seeds and items jointly for both
    (a and b: [S] or [S, N] on the same seeds and items, in the same order)."""
    xa, xb = as_matrix(a), as_matrix(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values need the same seeds and items: {xa.shape} vs {xb.shape}")
    return interval(xa - xb, draws, seed)


def ratio_interval(a, b, draws: int = DEFAULT_DRAWS, seed: int = 0) -> Interval:
    """mean(a) / mean(b) and its 95% interval from the same paired draws (a, b as in
    `paired_difference`); e.g. acc(align-cg at 10%) / acc(align at 100%)."""
    xa, xb = as_matrix(a), as_matrix(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values need the same seeds and items: {xa.shape} vs {xb.shape}")
    rng = np.random.default_rng(seed)
    si, ii = draw_indices(rng, draws, *xa.shape)
    num, den = bootstrap_means(xa, si, ii), bootstrap_means(xb, si, ii)
    ratios = num / np.where(den == 0, np.nan, den)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    mean_b = xb.mean()
    return Interval(float(xa.mean() / mean_b) if mean_b else float("nan"), float(lo), float(hi), xa.shape[0],
                    xa.shape[1] if xa.shape[1] > 1 else 0)


def mde(diff: Interval) -> float:
    """Minimum detectable effect (5% two-sided, 80% power) from a difference's interval."""
    return MDE_FACTOR * diff.half_width


def items_for_mde(diff: Interval, target: float) -> int | None:
    """Evaluation items that would bring the MDE down to `target`, assuming the interval
    shrinks as 1 / sqrt(items) (item noise dominant; more seeds are needed too when seed
    noise dominates). None when the comparison has no items or the target is 0."""
    if not diff.items or target <= 0:
        return None
    current = mde(diff)
    if current <= target:
        return diff.items
    return int(np.ceil(diff.items * (current / target) ** 2))


def verdict(diff: Interval, effect: float = 0.0) -> str:
    """Verdict of the claim "difference > 0" (see the module docstring)."""
    if diff.seeds < 2 and not diff.items:
        return "underpowered"  # one per-seed value: no estimate of the spread at all
    if diff.lo > 0:
        return "supported"
    if (effect > 0 and diff.hi < effect) or diff.hi < 0:
        return "not supported"
    if effect > 0 and mde(diff) > effect:
        return "underpowered"
    return "inconclusive"


def threshold_verdict(value: Interval, threshold: float, tolerance: float) -> str:
    """Verdict of the claim "value >= threshold": supported when the interval lies at or
    above it, not supported when below; underpowered when the half-width exceeds
    `tolerance` (the run cannot place the value to within the precision that matters)."""
    if value.lo >= threshold:
        return "supported"
    if value.hi < threshold:
        return "not supported"
    return "underpowered" if value.half_width > tolerance else "inconclusive"


@dataclass
class Claim:
    """A paper's claim as a comparison of two variants on one metric.

    `better` - `worse` > 0 on `metric` (for a lower-is-better metric name it the other way
    round with `lower_is_better`), with the effect size the paper reports (`effect`, in the
    metric's units; 0 when the paper states only a direction)."""

    id: str
    text: str
    metric: str
    better: str
    worse: str
    effect: float = 0.0
    lower_is_better: bool = False
    paper: str = ""


def judge(claim: Claim, values: dict[str, np.ndarray], draws: int = DEFAULT_DRAWS) -> dict:
    """A claim's difference interval, MDE, verdict and the items that would settle it.
    `values`: variant -> [S, N] (or [S]) values of `claim.metric`."""
    a, b = values[claim.better], values[claim.worse]
    if claim.lower_is_better:
        a, b = b, a
    diff = paired_difference(a, b, draws)
    m = mde(diff)
    return {
        **asdict(claim),
        "difference": diff.to_dict(),
        "mde": m,
        "verdict": verdict(diff, claim.effect),
        "items_for_claimed_effect": items_for_mde(diff, claim.effect) if claim.effect > 0 else None,
    }


def summarise_metric(per_seed_items: dict[str, np.ndarray], chance: float | None,
                     draws: int = DEFAULT_DRAWS) -> dict[str, dict]:
    """For each variant: per-seed means, the mean, its 95% interval and the chance level."""
    out = {}
    for variant, x in per_seed_items.items():
        m = as_matrix(x)
        ci = interval(m, draws)
        out[variant] = {"per_seed": m.mean(axis=1).tolist(), **ci.to_dict(), "chance": chance}
    return out

