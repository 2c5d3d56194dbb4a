"""The seeded hyperparameter registry: HParam (domaingrad.hparams) and the resolution of
names to hyperparameters (domaingrad.registry)."""

from __future__ import annotations

import pytest

from domaingrad import hparams as H
from domaingrad import registry as R
from domaingrad.algorithms import ERM
from domaingrad.errors import DomainGradError
from domaingrad.rng import seed_hash


def test_defaults_are_domainbeds_small_image_values():
    hp = R.resolve_hparams("ERM", "ColoredMNIST", hparams_seed=0, trial_seed=3)
    assert hp == R.default_hparams("ERM", "ColoredMNIST")
    assert (hp["lr"], hp["batch_size"], hp["weight_decay"]) == (1e-3, 64, 0.0)
    assert hp["nonlinear_classifier"] is False and hp["class_balanced"] is False


def test_random_draws_are_seeded_and_inside_domainbeds_ranges():
    draws = [R.resolve_hparams("ERM", "RotatedMNIST", s, t) for s in range(1, 21) for t in range(3)]
    assert draws[0] == R.resolve_hparams("ERM", "RotatedMNIST", 1, 0)
    assert len({d["lr"] for d in draws}) == len(draws)  # every (hparams_seed, trial_seed) differs
    for d in draws:
        assert 10**-4.5 <= d["lr"] <= 10**-2.5
        assert 8 <= d["batch_size"] < 512 and isinstance(d["batch_size"], int)
        assert d["resnet_dropout"] in (0.0, 0.1, 0.5)


def test_each_hyperparameter_has_its_own_generator(monkeypatch):
    before = R.draw_hparams("ERM", "ColoredMNIST", seed=123)
    extra = H.HParam("aaa_new", 1.0, lambda r: r.uniform())
    monkeypatch.setattr(ERM, "hparam_specs", classmethod(lambda cls, small: [extra]))
    after = R.draw_hparams("ERM", "ColoredMNIST", seed=123)
    assert set(after) == set(before) | {"aaa_new"}
    assert all(after[k] == v for k, v in before.items())


def test_overrides_are_type_checked():
    hp = R.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {"lr": 1, "batch_size": 16})
    assert hp["lr"] == 1.0 and isinstance(hp["lr"], float) and hp["batch_size"] == 16
    with pytest.raises(DomainGradError, match="unknown hyperparameter 'learning_rate'.*valid names: .*lr"):
        R.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {"learning_rate": 1e-3})
    for name, bad in [("lr", "fast"), ("batch_size", 16.5), ("nonlinear_classifier", 1), ("batch_size", True)]:
        with pytest.raises(DomainGradError, match=f"'{name}' must be of type"):
            R.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {name: bad})


@pytest.mark.parametrize("text", ["{lr: 1}", '{"lr": }', "[1, 2]", "3"])
def test_bad_hparams_json_is_explained(text):
    with pytest.raises(DomainGradError, match="--hparams"):
        H.parse_hparams_json(text)


def test_batch_size_draws_follow_domainbeds_registry_per_dataset():
    """DomainBed's ``hparams_registry``: int(2**U(3, 5)) on DomainNet, int(2**U(3, 5.5)) on
    the other image datasets, each from ``RandomState(seed_hash(seed, "batch_size"))``."""
    import numpy as np

    for dataset, high in (("DomainNet", 5.0), ("PACS", 5.5), ("OfficeHome", 5.5)):
        draws = []
        for seed in range(1, 401):
            expected = int(2 ** np.random.RandomState(seed_hash(seed, "batch_size")).uniform(3, high))
            got = R.draw_hparams("ERM", dataset, seed)["batch_size"]
            assert got == expected, (dataset, seed)
            draws.append(got)
        assert min(draws) >= 8
        if dataset == "DomainNet":
            assert max(draws) == 31  # 2**U(3, 5) < 32
        else:
            assert 32 < max(draws) <= 45  # 2**U(3, 5.5) < 45.25: a fifth of the draws lie above 32
    assert R.default_hparams("ERM", "DomainNet")["batch_size"] == 32


def test_random_hparams_takes_the_two_seeds_of_a_run():
    """``random_hparams(algorithm, dataset, hparams_seed, trial_seed)`` is the draw a run with
    those seeds trains with (DomainBed's ``train.py``: ``seed_hash(hparams_seed, trial_seed)``)."""
    import domaingrad as dg

    for hparams_seed, trial_seed in ((1, 0), (3, 2), (7, 1)):
        drawn = dg.random_hparams("ERM", "RotatedMNIST", hparams_seed, trial_seed)
        assert drawn == R.draw_hparams("ERM", "RotatedMNIST", seed_hash(hparams_seed, trial_seed))
        assert drawn == dg.resolve_hparams("ERM", "RotatedMNIST", hparams_seed, trial_seed)
    assert dg.random_hparams("ERM", "RotatedMNIST", 1, 0) != dg.random_hparams("ERM", "RotatedMNIST", 1, 1)
    assert dg.default_hparams("ERM", "PACS")["lr"] == 5e-5 and dg.default_hparams("ERM", "ColoredMNIST")["lr"] == 1e-3


def test_hyperparameters_are_a_dict_not_json_text():
    with pytest.raises(TypeError, match="dict of name -> value"):
        R.resolve_hparams("ERM", "ColoredMNIST", 0, 0, '{"lr": 1e-3}')


def test_an_algorithm_declaring_a_hyperparameter_twice_is_a_programming_error(monkeypatch):
    monkeypatch.setattr(ERM, "hparam_specs", classmethod(lambda cls, small: [H.HParam("lr", 1.0, lambda r: 1.0)]))
    with pytest.raises(ValueError, match="'lr' declared twice for ERM"):
        R.hparam_specs("ERM", "ColoredMNIST")
