"""The champion decision on plain values (no MLflow): which numbers compare, and who wins; and what a
validation set is (the split's identity: the data's fingerprint with the split rule, and the pixel coding)."""

from __future__ import annotations

import pytest

from vaedist.champion import Verdict, judge, validation_set
from vaedist.data import get_spec
from vaedist.data.spec import split_digest
from vaedist.models import build_model

SET = f"{split_digest('0123456789abcdef', 'validation', 5000)}/binarized"


def test_no_champion_yet_promotes():
    assert judge(120.0, SET, None, "1") is Verdict.PROMOTE


def test_on_the_same_validation_set_lower_neg_elbo_wins_and_a_tie_keeps():
    assert judge(99.0, SET, ("3", 100.0, SET), "4") is Verdict.PROMOTE
    assert judge(100.0, SET, ("3", 100.0, SET), "4") is Verdict.KEEP
    assert judge(101.0, SET, ("3", 100.0, SET), "4") is Verdict.KEEP


def test_the_champion_itself_is_never_re_promoted():
    assert judge(1.0, SET, ("4", 100.0, SET), "4") is Verdict.KEEP


def test_numbers_from_another_validation_set_are_never_compared_directly():
    """A smoke run's 1,000 images, 8-bit pixels, or other data: both models must be re-scored on the new set."""
    smaller = f"{split_digest('0123456789abcdef', 'validation', 1000)}/binarized"
    other_data = f"{split_digest('fedcba9876543210', 'validation', 5000)}/binarized"
    assert judge(1.0, SET, ("2", 500.0, smaller), "3") is Verdict.RESCORE
    assert judge(900.0, SET, ("2", 500.0, SET.replace("binarized", "8-bit")), "3") is Verdict.RESCORE
    assert judge(1.0, SET, ("2", 500.0, other_data), "3") is Verdict.RESCORE


def test_a_version_tagged_the_old_way_is_re_scored():
    """Versions registered before the fingerprint named their set "dataset/valN/coding": never equal, so
    the verdict re-scores them rather than comparing numbers of unknown data."""
    assert judge(1.0, SET, ("2", 500.0, "mnist/val5000/binarized"), "3") is Verdict.RESCORE
    assert judge(1.0, SET, ("2", 500.0, ""), "3") is Verdict.RESCORE  # no tag at all


@pytest.fixture(scope="module")
def bernoulli_model():
    from vaedist.config import ModelConfig

    return build_model(ModelConfig(arch="dense", width=16, depth=1, latent_dim=2), (28, 28, 1), 10, "bernoulli")


def test_the_validation_set_is_the_checkpoint_s_fingerprint_with_the_split_rule(bernoulli_model):
    """The checkpoint's facts name the set, whatever its config says: the data is not reopened."""
    ckpt = {"dataset": {"fingerprint": "0123456789abcdef", "validation": {"val_size": 5000}},
            "config": {"data.dataset": "/gone/folder", "data.val_size": 1}}  # fmt: skip
    assert validation_set(ckpt, bernoulli_model) == SET
    # A checkpoint with the fingerprint but not the rule: the config's val_size is the rule it trained with.
    ckpt = {"dataset": {"fingerprint": "0123456789abcdef"}, "config": {"data.val_size": 1000}}
    assert validation_set(ckpt, bernoulli_model) == f"{split_digest('0123456789abcdef', 'validation', 1000)}/binarized"


def test_an_old_checkpoint_s_set_comes_from_its_config_s_dataset(bernoulli_model):
    """Before checkpoints kept a fingerprint: the dataset named in the config gives it (a built-in's spec
    reads no data), and the digest equals the one its run logged the validation split under."""
    ckpt = {"config": {"data.dataset": "mnist", "data.val_size": 2000}}
    digest = split_digest(get_spec("mnist").fingerprint, "validation", 2000)
    assert validation_set(ckpt, bernoulli_model) == f"{digest}/binarized"
