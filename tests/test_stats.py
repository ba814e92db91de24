"""The toy bench's statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dreambooth_lib.toyworld import stats


def run(recipe, subject, seed, **metrics):
    return dict(recipe=recipe, subject=subject, seed=seed, metrics=metrics)


def test_t_quantile_matches_the_printed_table():
    # Student t, two-sided 95 % (p = 0.975), from any statistics table
    for df, value in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (7, 2.3646), (23, 2.0687), (1000, 1.9623)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert stats.t_quantile(0.5, 5) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="df >= 1"):
        stats.t_quantile(0.975, 0)


def test_mean_interval_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.29099, se 0.645497, t(0.975, 3) = 3.182446
    iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert (iv.mean, iv.n) == (2.5, 4)
    assert iv.low == pytest.approx(2.5 - half, abs=1e-5) and iv.high == pytest.approx(2.5 + half, abs=1e-5)
    assert iv.high - iv.low == pytest.approx(4.10862, abs=1e-4)
    assert str(iv) == "2.500 [0.446, 4.554]"
    assert stats.mean_interval([0.3, 0.3, 0.3]).as_dict() == dict(mean=0.3, low=0.3, high=0.3, n=3, confidence=0.95)
    with pytest.raises(ValueError, match="at least 2 subjects"):
        stats.mean_interval([0.5])


def test_recipe_interval_averages_seeds_within_a_subject_first():
    # subject a: seeds 0.2, 0.4 -> 0.3; subject b: 0.5 (one seed); subject c: 0.6, 0.8, 1.0 -> 0.8.
    # Subject means 0.3, 0.5, 0.8: mean 0.53333, sd 0.251661, t(0.975, 2) = 4.302653 -> half 0.625161
    runs = [run("prior", "a", 0, sf=0.2), run("prior", "a", 1, sf=0.4), run("prior", "b", 0, sf=0.5),
            run("prior", "c", 0, sf=0.6), run("prior", "c", 1, sf=0.8), run("prior", "c", 2, sf=1.0),
            run("no_prior", "a", 0, sf=0.0), run("no_prior", "b", 0, sf=1.0)]
    iv = stats.recipe_interval(runs, "prior", "sf")
    assert iv.n == 3 and iv.mean == pytest.approx(0.533333, abs=1e-6)
    assert (iv.low, iv.high) == (pytest.approx(0.533333 - 0.625161, abs=1e-5), pytest.approx(0.533333 + 0.625161, abs=1e-5))
    summary = stats.summarize(runs)
    assert list(summary) == ["prior", "no_prior"] and list(summary["prior"]) == ["sf"]
    assert summary["prior"]["sf"] == iv
    # no_prior: 0.0 and 1.0 -> mean 0.5, sd 0.707107, t(0.975, 1) = 12.706205 -> half 6.353102
    assert summary["no_prior"]["sf"].high == pytest.approx(0.5 + 6.353102, abs=1e-5)
    with pytest.raises(ValueError, match="no runs of recipe 'lora'"):
        stats.recipe_interval(runs, "lora", "sf")


def test_paired_difference_uses_only_shared_subject_seed_runs():
    runs = [
        run("prior", "a", 0, pres=0.10), run("prior", "a", 1, pres=0.30), run("prior", "b", 0, pres=0.00),
        run("prior", "c", 0, pres=0.20), run("prior", "c", 1, pres=0.90),  # c seed 1: no partner
        run("no_prior", "a", 0, pres=0.50), run("no_prior", "a", 1, pres=0.50), run("no_prior", "b", 0, pres=0.60),
        run("no_prior", "c", 0, pres=0.40), run("no_prior", "d", 0, pres=1.00),  # d: no partner
    ]
    # differences no_prior - prior: a 0.4, 0.2 -> 0.3; b 0.6; c 0.2. Mean 0.366667, sd 0.208167,
    # t(0.975, 2) = 4.302653 -> half 0.517118
    iv = stats.paired_difference(runs, "prior", "no_prior", "pres")
    assert iv.n == 3 and iv.mean == pytest.approx(0.366667, abs=1e-6)
    assert iv.low == pytest.approx(0.366667 - 0.517118, abs=1e-5)
    assert iv.high == pytest.approx(0.366667 + 0.517118, abs=1e-5)
    reverse = stats.paired_difference(runs, "no_prior", "prior", "pres")
    assert (reverse.mean, reverse.low, reverse.high) == pytest.approx((-iv.mean, -iv.high, -iv.low))
    # the unpaired runs count in each recipe's own mean, not in the difference:
    # (0.5 + 0.6 + 0.4 + 1.0) / 4 - (0.2 + 0.0 + 0.55) / 3 = 0.375
    unpaired = stats.recipe_interval(runs, "no_prior", "pres").mean - stats.recipe_interval(runs, "prior", "pres").mean
    assert unpaired == pytest.approx(0.375, abs=1e-9)
    with pytest.raises(ValueError, match="share no"):
        stats.paired_difference(runs + [run("lora", "e", 0, pres=0.0)], "prior", "lora", "pres")


def test_bad_runs_are_refused_with_their_names():
    with pytest.raises(ValueError, match="two runs for recipe 'prior', subject 'a', seed 0"):
        stats.recipe_interval([run("prior", "a", 0, sf=0.1), run("prior", "a", 0, sf=0.2)], "prior", "sf")
    with pytest.raises(ValueError, match="lacks \\['seed'\\]"):
        stats.recipe_interval([dict(recipe="prior", subject="a", metrics={})], "prior", "sf")
    with pytest.raises(ValueError, match="subject 'b', seed 0\\) has no value for 'div'"):
        stats.recipe_interval([run("prior", "a", 0, div=0.1), run("prior", "b", 0, div=None)], "prior", "div")
