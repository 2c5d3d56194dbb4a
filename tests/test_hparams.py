"""The seeded hyperparameter registry."""
from __future__ import annotations

import pytest

from domaingrad import hparams as H
from domaingrad.algorithms import ERM
from domaingrad.errors import DomainGradError


def test_defaults_are_domainbeds_small_image_values():
    hp = H.resolve_hparams("ERM", "ColoredMNIST", hparams_seed=0, trial_seed=3)
    assert hp == H.default_hparams("ERM", "ColoredMNIST")
    assert (hp["lr"], hp["batch_size"], hp["weight_decay"]) == (1e-3, 64, 0.0)
    assert hp["nonlinear_classifier"] is False and hp["class_balanced"] is False


def test_random_draws_are_seeded_and_inside_domainbeds_ranges():
    draws = [H.resolve_hparams("ERM", "RotatedMNIST", s, t) for s in range(1, 21) for t in range(3)]
    assert draws[0] == H.resolve_hparams("ERM", "RotatedMNIST", 1, 0)
    assert len({d["lr"] for d in draws}) == len(draws)  # every (hparams_seed, trial_seed) differs
    for d in draws:
        assert 10 ** -4.5 <= d["lr"] <= 10 ** -2.5
        assert 8 <= d["batch_size"] < 512 and isinstance(d["batch_size"], int)
        assert d["resnet_dropout"] in (0.0, 0.1, 0.5)


def test_each_hyperparameter_has_its_own_generator(monkeypatch):
    before = H.random_hparams("ERM", "ColoredMNIST", seed=123)
    extra = H.HParam("aaa_new", 1.0, lambda r: r.uniform())
    monkeypatch.setattr(ERM, "hparam_specs", classmethod(lambda cls, small: [extra]))
    after = H.random_hparams("ERM", "ColoredMNIST", seed=123)
    assert set(after) == set(before) | {"aaa_new"}
    assert all(after[k] == v for k, v in before.items())


def test_overrides_are_type_checked():
    hp = H.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {"lr": 1, "batch_size": 16})
    assert hp["lr"] == 1.0 and isinstance(hp["lr"], float) and hp["batch_size"] == 16
    with pytest.raises(DomainGradError, match="unknown hyperparameter 'learning_rate'.*valid names: .*lr"):
        H.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {"learning_rate": 1e-3})
    for name, bad in [("lr", "fast"), ("batch_size", 16.5), ("nonlinear_classifier", 1), ("batch_size", True)]:
        with pytest.raises(DomainGradError, match=f"'{name}' must be of type"):
            H.resolve_hparams("ERM", "ColoredMNIST", 0, 0, {name: bad})


@pytest.mark.parametrize("text", ["{lr: 1}", "{\"lr\": }", "[1, 2]", "3"])
def test_bad_hparams_json_is_explained(text):
    with pytest.raises(DomainGradError, match="--hparams"):
        H.parse_hparams_json(text)


def test_batch_size_draws_follow_domainbeds_registry_per_dataset():
    """DomainBed's ``hparams_registry``: int(2**U(3, 5)) on DomainNet, int(2**U(3, 5.5)) on
    the other image datasets, each from ``RandomState(seed_hash(seed, "batch_size"))``."""
    import numpy as np

    from domaingrad.rng import seed_hash

    for dataset, high in (("DomainNet", 5.0), ("PACS", 5.5), ("OfficeHome", 5.5)):
        draws = []
        for seed in range(1, 401):
            expected = int(2 ** np.random.RandomState(seed_hash(seed, "batch_size")).uniform(3, high))
            got = H.random_hparams("ERM", dataset, seed)["batch_size"]
            assert got == expected, (dataset, seed)
            draws.append(got)
        assert min(draws) >= 8
        if dataset == "DomainNet":
            assert max(draws) == 31  # 2**U(3, 5) < 32
        else:
            assert 32 < max(draws) <= 45  # 2**U(3, 5.5) < 45.25: a fifth of the draws lie above 32
    assert H.default_hparams("ERM", "DomainNet")["batch_size"] == 32
