"""The toy bench's statistics: mean and 95 % interval per recipe and metric, and paired differences
between two recipes on the same (subject, seed).

A run is one dict, as the bench writes it:
    {"recipe": "prior", "subject": "marked_star", "seed": 0, "metrics": {"subject_fidelity": 0.91, ...}}

Which interval, and why: a Student t-interval with the SUBJECT as the unit. A recipe's value for a
subject is the mean over its seeds; the interval is mean +- t_{0.975, n-1} * sd / sqrt(n) over the n
subjects. The question a benchmark answers is "on a new subject, what does this recipe give?", so
subjects are the independent draws; a run's seeds share their subject and are not independent
draws (treating 8 subjects x 3 seeds as 24 would narrow the interval for free). A bootstrap over
subjects and seeds was the alternative; with ~8 subjects the percentile bootstrap is known to be
too narrow (its spread is the plug-in sd, sqrt((n-1)/n) of the usual one, and it ignores the t
tail: 2.36 instead of 1.96 at n = 8), and it needs random draws, while the t-interval is exact for
normal subject means and can be checked by hand. Paired differences are the same interval on the
per-subject mean of (b - a) over the seeds both recipes ran: the paired t-interval, which removes
the subject-to-subject spread that both recipes share.

    summary = summarize(runs)                                     # {recipe: {metric: Interval}}
    paired_difference(runs, "prior", "no_prior", "pres")          # Interval of no_prior - prior
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import mpmath  # installed with torch (sympy's dependency): its incomplete beta gives Student's t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of n subject values and its two-sided confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int  # subjects (the unit)
    confidence: float = CONFIDENCE

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict:
        return dict(mean=self.mean, low=self.low, high=self.high, n=self.n, confidence=self.confidence)


def t_quantile(p: float, df: int) -> float:
    """Student t quantile: the x with P(T_df <= x) = p, by bisection on the CDF
    P(T <= x) = 1 - I_{df / (df + x^2)}(df / 2, 1 / 2) / 2 for x >= 0 (I: regularized incomplete beta)."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")

    def cdf(x: float) -> float:
        return 1.0 - 0.5 * float(mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2.0
    for _ in range(100):  # the bracket halves each time: 2^-100 of it is far below a float's precision
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of the mean of `values` (one per subject)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs values from at least 2 subjects, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def _table(runs: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
    """{(recipe, subject, seed): metrics}, refusing duplicates and runs without those keys."""
    table = {}
    for run in runs:
        missing = [k for k in ("recipe", "subject", "seed", "metrics") if k not in run]
        if missing:
            raise ValueError(f"run {run!r} lacks {missing}: each run needs recipe, subject, seed and metrics")
        key = (run["recipe"], run["subject"], int(run["seed"]))
        if key in table:
            raise ValueError(f"two runs for recipe {key[0]!r}, subject {key[1]!r}, seed {key[2]}")
        table[key] = run["metrics"]
    return table


def _value(table: dict, key: tuple, metric: str) -> float:
    value = table[key].get(metric)
    if value is None:
        raise ValueError(f"run (recipe {key[0]!r}, subject {key[1]!r}, seed {key[2]}) has no value for {metric!r}")
    return float(value)


def _subject_means(per_run: dict[tuple[str, int], float]) -> list[float]:
    """{(subject, seed): value} -> the mean over seeds of each subject."""
    by_subject: dict[str, list[float]] = {}
    for (subject, _), value in per_run.items():
        by_subject.setdefault(subject, []).append(value)
    return [sum(v) / len(v) for _, v in sorted(by_subject.items())]


def recipe_interval(runs: Iterable[dict], recipe: str, metric: str, confidence: float = CONFIDENCE) -> Interval:
    """Mean over subjects (each the mean over its seeds) of `metric` for `recipe`, with its t-interval."""
    table = _table(runs)
    per_run = {(s, k): _value(table, (r, s, k), metric) for r, s, k in table if r == recipe}
    if not per_run:
        raise ValueError(f"no runs of recipe {recipe!r}; recipes: {sorted({r for r, _, _ in table})}")
    return mean_interval(_subject_means(per_run), confidence)


def summarize(runs: Iterable[dict], metrics: Sequence[str] | None = None,
              confidence: float = CONFIDENCE) -> dict[str, dict[str, Interval]]:
    """{recipe: {metric: Interval}} for every recipe in `runs` and every metric (default: those every
    run of the recipe reports)."""
    runs = list(runs)
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == recipe]
        names = metrics or [m for m in mine[0]["metrics"] if all(r["metrics"].get(m) is not None for r in mine)]
        out[recipe] = {m: recipe_interval(mine, recipe, m, confidence) for m in names}
    return out


def paired_difference(runs: Iterable[dict], recipe_a: str, recipe_b: str, metric: str,
                      confidence: float = CONFIDENCE) -> Interval:
    """`recipe_b` - `recipe_a` on the (subject, seed) pairs both ran: per subject the mean of the
    differences over its paired seeds, then the t-interval over subjects (unpaired runs are left out)."""
    table = _table(runs)
    a = {(s, k) for r, s, k in table if r == recipe_a}
    b = {(s, k) for r, s, k in table if r == recipe_b}
    pairs = sorted(a & b)
    if not pairs:
        raise ValueError(f"recipes {recipe_a!r} and {recipe_b!r} share no (subject, seed) run")
    diffs = {(s, k): _value(table, (recipe_b, s, k), metric) - _value(table, (recipe_a, s, k), metric)
             for s, k in pairs}
    return mean_interval(_subject_means(diffs), confidence)
