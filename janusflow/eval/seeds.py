"""Statistics over training seeds, for the comparisons that train every arm once per seed
(tools/compare_repa.py, tools/ablations.py).

One seed gives one number per arm and metric; several seeds give a spread, and a comparison is only as good as
the error bar it comes with. Here:

- ``estimate(values)``: the mean over seeds and the half-width of its 95% Student-t interval,
  ``t(0.975, n - 1) * sd / sqrt(n)`` with the sample standard deviation (n - 1 in the denominator);
  e.g. [1, 2, 3] gives 2 ± 4.303 * 1 / sqrt(3) = 2 ± 2.484. One seed gives no interval: printed "n/a (1 seed)".
- ``paired_difference(a, b)``: the same interval for the per-seed differences a_s - b_s over the seeds both arms
  ran. The arms of a comparison share their seeds (same data order, noise and start per seed), so pairing removes
  the seed's own effect; an interval that excludes 0 tells the arms apart.
- ``told_apart(diff, ...)``: the verdict of such an interval, in the words of the comparison.
- ``steps_to_reach`` / ``speedup``: the steps a curve needs to be at least as good as a level, and the ratio of two
  such step counts (one seed's pair of curves).
- ``curve_band(curves)``: the mean curve of several seeds and its interval per step, for plots.
- ``seed_dir`` / ``seed_overrides`` / ``check_seed_free``: where seed S of a comparison runs (``OUT/.../seed-S``) and
  the recipe override it runs with (``train.seed=S``).

t quantiles come from ``scipy.stats.t`` (scipy is a dependency: the FD's matrix square root needs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CONFIDENCE = 0.95
NO_INTERVAL = "n/a (1 seed)"
INTERVAL_NAME = "95% t-interval over seeds"


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (of at least one value)."""
    if not values:
        raise ValueError("the mean of no values")
    return sum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n - 1 in the denominator); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean, sd / sqrt(n); None for fewer than 2 values."""
    sd = sample_sd(values)
    return None if sd is None else sd / math.sqrt(len(values))


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile: t(0.5 + confidence / 2, df), e.g. 4.303 for df 2 at 95%."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    return float(t.ppf(0.5 + confidence / 2, df))


def t_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float | None:
    """The half-width of the t-interval of the mean, t(df = n - 1) * se; None for fewer than 2 values."""
    se = standard_error(values)
    return None if se is None else t_quantile(len(values) - 1, confidence) * se


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` per-seed values and the half-width of its t-interval (None: a single seed)."""

    mean: float
    half_width: float | None
    n: int

    def excludes_zero(self) -> bool | None:
        """Whether the interval lies entirely on one side of 0 (None without an interval)."""
        if self.half_width is None:
            return None
        return self.mean - self.half_width > 0 or self.mean + self.half_width < 0

    def format(self, digits: int = 4, sign: bool = False, suffix: str = "") -> str:
        """``mean ± half-width`` (``mean ± n/a (1 seed)`` for one seed); ``sign`` writes a leading +."""
        m = f"{self.mean:+.{digits}f}" if sign else f"{self.mean:.{digits}f}"
        ci = NO_INTERVAL if self.half_width is None else f"{self.half_width:.{digits}f}{suffix}"
        return f"{m}{suffix} ± {ci}"


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and t-interval half-width of per-seed values."""
    return Estimate(mean(values), t_half_width(values, confidence), len(values))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Estimate | None:
    """The t-interval of the per-seed differences a[s] - b[s] over the seeds in both (``{seed: value}``);
    None when they share no seed."""
    shared = sorted(set(a) & set(b))
    return estimate([a[s] - b[s] for s in shared], confidence) if shared else None


def told_apart(diff: Estimate | None, if_higher: str, if_lower: str) -> str:
    """Whether a paired difference tells two arms apart: "-" without one, n/a for a single seed, "no (interval
    includes 0)", or "yes: " with ``if_higher`` / ``if_lower`` by the sign of its mean."""
    if diff is None:
        return "-"
    if diff.excludes_zero() is None:
        return NO_INTERVAL
    if not diff.excludes_zero():
        return "no (interval includes 0)"
    return f"yes: {if_higher if diff.mean > 0 else if_lower}"


def at_least_as_good(value: float, level: float, lower_is_better: bool) -> bool:
    return value <= level if lower_is_better else value >= level


def steps_to_reach(steps: Sequence[int], values: Sequence[float], level: float, lower_is_better: bool) -> int | None:
    """The first step whose value is at least as good as ``level`` (None: never)."""
    return next((s for s, v in zip(steps, values) if at_least_as_good(v, level, lower_is_better)), None)


def speedup(steps_slow: int | None, steps_fast: int | None) -> float | None:
    """How many times fewer steps the fast arm needs to reach a level: steps_slow / steps_fast
    (None where an arm never reaches it, or reaches it at step 0)."""
    return steps_slow / steps_fast if steps_slow and steps_fast else None


def curve_band(curves: Sequence[tuple[Sequence[int], Sequence[float]]], confidence: float = CONFIDENCE
               ) -> tuple[list[int], list[float], list[float] | None]:
    """The steps every curve has, the mean over curves there and the t-interval half-widths (None: one curve)."""
    common = set(curves[0][0]).intersection(*(set(s) for s, _ in curves[1:]))
    steps = sorted(common)
    lookups = [dict(zip(s, v)) for s, v in curves]
    per_step = [[lookup[step] for lookup in lookups] for step in steps]
    means = [mean(vs) for vs in per_step]
    if len(curves) < 2:
        return steps, means, None
    return steps, means, [t_half_width(vs, confidence) for vs in per_step]


def seed_dir(root: str | Path, seed: int) -> Path:
    """Where seed ``seed`` of a comparison runs: ROOT/seed-S."""
    return Path(root) / f"seed-{seed}"


def seed_overrides(overrides: Sequence[str], seed: int) -> list[str]:
    """The recipe overrides of seed ``seed``: the user's, then ``train.seed=S``."""
    return [*overrides, f"train.seed={seed}"]


def check_seed_free(overrides: Sequence[str]) -> str | None:
    """An error message if the overrides set train.seed themselves (the tools set it per seed), else None."""
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
        return "train.seed is set per run by --seeds (seed S trains with train.seed=S); drop the override"
    return None
