"""Every registered algorithm's own hyperparameters: new names (no common one repeated, no
name twice) whose random-search draws have the type of the default (a float drawn for an
int hyperparameter is what broke DomainBed's EQRM burn-in in a search)."""

from __future__ import annotations

import numpy as np
import pytest

from domaingrad.algorithms import ALGORITHMS
from domaingrad.hparams import common_hparams


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_hparam_specs_are_new_names_with_defaults_of_their_draws_type(name):
    cls = ALGORITHMS[name]
    for small in (True, False):
        common = {s.name for s in common_hparams(small)}
        specs = cls.hparam_specs(small)
        names = [s.name for s in specs]
        assert len(set(names)) == len(names) and not set(names) & common
        for spec in specs:
            draws = [spec.draw(np.random.RandomState(seed)) for seed in range(20)]
            assert all(type(d) is type(spec.default) for d in draws), spec.name
