"""The champion decision on plain values (no MLflow): which numbers compare, and who wins."""

from __future__ import annotations

from vaedist.champion import Verdict, judge

SET = "mnist/val5000/binarized"


def test_no_champion_yet_promotes():
    assert judge(120.0, SET, None, "1") is Verdict.PROMOTE


def test_on_the_same_validation_set_lower_neg_elbo_wins_and_a_tie_keeps():
    assert judge(99.0, SET, ("3", 100.0, SET), "4") is Verdict.PROMOTE
    assert judge(100.0, SET, ("3", 100.0, SET), "4") is Verdict.KEEP
    assert judge(101.0, SET, ("3", 100.0, SET), "4") is Verdict.KEEP


def test_the_champion_itself_is_never_re_promoted():
    assert judge(1.0, SET, ("4", 100.0, SET), "4") is Verdict.KEEP


def test_numbers_from_another_validation_set_are_never_compared_directly():
    """A smoke run's 1,000 images or 8-bit pixels: both models must be re-scored on the new set."""
    assert judge(1.0, SET, ("2", 500.0, "mnist/val1000/binarized"), "3") is Verdict.RESCORE
    assert judge(900.0, SET, ("2", 500.0, "mnist/val5000/8-bit"), "3") is Verdict.RESCORE
