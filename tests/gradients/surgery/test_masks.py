"""ANDMask and SAND-mask as implemented in DomainBed, and their objects."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from domaingrad.gradients.surgery import ANDMask, SANDMask, and_mask, sand_mask

from .references import FAST, SHAPES, close, naive_and_mask, naive_sand_mask, random_grads, sparse_signs, t64

# ----------------------------------------------------------------- AND / SAND masks


def test_and_mask_hand():
    # D=2: comps (1,3) agree, (-1,2) no, (2,4) agree, (0,1) no (zero): mask 1,0,1,0,
    # kept fraction 1/2; mean (2, .5, 3, .5) -> (2, 0, 3, 0) / (1e-10 + 0.5) = (4, 0, 6, 0)
    g = t64([[1.0, -1.0, 2.0, 0.0], [3.0, 2.0, 4.0, 1.0]])
    res = and_mask([g])
    assert close(res.grads[0], t64([4.0, 0.0, 6.0, 0.0]), 1e-9)
    assert res.stats["mask_frac"] == pytest.approx(0.5)
    # tau=0.5: |mean sign| = 1, 0, 1, 0.5 -> mask 1,0,1,1, fraction 3/4
    res = and_mask([g], tau=0.5)
    assert close(res.grads[0], t64([2.0, 0.0, 3.0, 0.5]) / 0.75, 1e-9)
    assert res.stats["mask_frac"] == pytest.approx(0.75)


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # D = 1 in the dense reference
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.integers(1, 5),
    shapes=SHAPES,
    tau=st.sampled_from([0.0, 0.2, 0.5, 1.0, 1.5]),
    k=st.sampled_from([0.1, 10.0, 1e3]),
)
def test_and_and_sand_mask_match_the_dense_formulas(seed, num_domains, shapes, tau, k):
    gen = torch.Generator().manual_seed(seed)
    grads = [sparse_signs(gen, (num_domains, *s)) for s in shapes]
    for out, g in zip(and_mask(grads, tau=tau).grads, grads):
        assert close(out, naive_and_mask(g, tau), 1e-9)
    for out, g in zip(sand_mask(grads, tau=tau, k=k).grads, grads):
        assert close(out, naive_sand_mask(g, tau, k), 1e-9)


def test_sand_mask_hand_and_default_tau_is_a_zero_update():
    # D=2: g = [[1, -1], [3, 1]]: avg (2, 0); unbiased var (2, 2) -> lam 0.5;
    # |mean sign| (1, 0). tau = .5, k = 10: mask0 = tanh(10 * .5 * .5) = tanh(2.5),
    # mask1 = max(tanh(-2.5), 0) = 0; mask mean tanh(2.5)/2;
    # grad0 = tanh(2.5) * 2 / (tanh(2.5)/2) = 4 (up to the 1e-10), grad1 = 0
    g = t64([[1.0, -1.0], [3.0, 1.0]])
    res = sand_mask([g], tau=0.5, k=10.0)
    assert close(res.grads[0], t64([4.0, 0.0]), 1e-8)
    assert res.stats["mask_frac"] == pytest.approx(math.tanh(2.5) / 2)
    # DomainBed default tau = 1: tanh(k lam (|mean sign| - 1)) <= 0 -> mask 0 everywhere
    res = sand_mask(random_grads(0, 3, [(10,), (4, 4)]))
    assert res.stats["mask_frac"] == 0.0
    assert all(torch.all(out == 0) for out in res.grads)
    # ... except where all domains are equal (var 0, inf * 0 = NaN -> 1e-17):
    # grad = 1e-17 * 1 / (1e-10 + 1e-17) ~ 1e-7
    res = sand_mask([t64([[1.0], [1.0]])])
    assert res.grads[0].item() == pytest.approx(1e-17 / (1e-10 + 1e-17))


# ----------------------------------------------------------------------- the objects


def test_mask_objects_are_the_functions_with_the_same_options():
    grads = [sparse_signs(torch.Generator().manual_seed(4), (3, *s)) for s in [(9,), (3, 2)]]
    for rule, exp in (
        (ANDMask(), and_mask(grads)),
        (ANDMask(tau=0.3), and_mask(grads, tau=0.3)),
        (SANDMask(tau=0.4), sand_mask(grads, tau=0.4)),
        (SANDMask(tau=0.2, k=1e3), sand_mask(grads, tau=0.2, k=1e3)),
    ):
        res = rule(grads)
        assert all(torch.equal(a, b) for a, b in zip(res.grads, exp.grads)) and res.stats == exp.stats, rule
    g = t64([[1.0, -1.0, 2.0, 0.0], [3.0, 2.0, 4.0, 1.0]])
    assert close(ANDMask(tau=0.5)([g]).grads[0], t64([2.0, 0.0, 3.0, 0.5]) / 0.75, 1e-9)


def test_mask_objects_repr_and_errors():
    assert repr(ANDMask()) == "ANDMask(tau=1.0)"
    assert repr(SANDMask(tau=0.25, k=100)) == "SANDMask(tau=0.25, k=100.0)"
    for make, match in (
        (lambda: ANDMask(tau=float("nan")), "tau must be"),
        (lambda: SANDMask(k="10"), "k must be"),
        (lambda: SANDMask(tau=None), "tau must be"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
