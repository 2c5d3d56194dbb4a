"""Sign agreement, Agr-Sum and Agr-Rand (Mansilla, Echeveste, Milone, Ferrante, "Domain
Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(4)) and their objects.

Expected values are computed by hand (derivations in the comments) or by the loop
references of :mod:`tests.gradients.surgery.references`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from domaingrad.gradients.surgery import AgrRand, AgrSum, agr_rand, agr_sum, agreement_mask

from .references import F64, FAST, SHAPES, close, naive_agree, random_grads, sparse_signs, t64

# ------------------------------------------------------------------ agreement, Agr-Sum


def test_agreement_hand_two_domains():
    # components: (+,+) agree; (-,+) no; (0,0) paper yes / official no; (+,-) no; (0,+) no
    g = t64([[1.0, -1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 0.0, -1.0, 5.0]])
    assert agreement_mask([g])[0].tolist() == [True, False, True, False, False]
    assert agreement_mask([g], rule="official")[0].tolist() == [True, False, False, False, False]


def test_agr_sum_hand_two_domains_and_stats():
    g = t64([[1.0, -1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 0.0, -1.0, 5.0]])
    res = agr_sum([g])
    # sums (4, 1, 0, 1, 5), kept only at components 0 and 2 (2 = all zero, agrees)
    assert res.grads[0].tolist() == [4.0, 0.0, 0.0, 0.0, 0.0]
    assert res.stats["agree_frac"] == pytest.approx(2 / 5)
    assert agr_sum([g], rule="official").stats["agree_frac"] == pytest.approx(1 / 5)
    assert agr_sum([g], reduction="mean").grads[0].tolist() == [2.0, 0.0, 0.0, 0.0, 0.0]


def test_agr_sum_hand_three_domains_two_tensors():
    # tensor A: comp0 (1, 2, .5) all + -> 3.5; comp1 (2, -3, 1) mixed -> 0
    # tensor B (2x1): comp0 (-1, -2, -4) all - -> -7; comp1 (0, 0, 1) mixed -> 0
    a = t64([[1.0, 2.0], [2.0, -3.0], [0.5, 1.0]])
    b = t64([[[-1.0], [0.0]], [[-2.0], [0.0]], [[-4.0], [1.0]]])
    res = agr_sum([a, b])
    assert res.grads[0].tolist() == [3.5, 0.0]
    assert res.grads[1].tolist() == [[-7.0], [0.0]]
    assert res.stats["agree_frac"] == pytest.approx(2 / 4)
    mean = agr_sum([a, b], reduction="mean")
    assert close(mean.grads[0], t64([3.5 / 3, 0.0]))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.integers(1, 4),
    shapes=SHAPES,
    rule=st.sampled_from(["paper", "official"]),
)
def test_agr_sum_zeroes_exactly_the_disagreeing_components(seed, num_domains, shapes, rule):
    # values in {-2,...,2} * positive scale: many zeros and sign ties
    gen = torch.Generator().manual_seed(seed)
    grads = [sparse_signs(gen, (num_domains, *s)) for s in shapes]
    res = agr_sum(grads, rule=rule)
    agree_total = 0
    for g, out in zip(grads, res.grads):
        agree = naive_agree(g, rule)
        assert out.shape == g.shape[1:]
        assert torch.all(out[~agree] == 0)
        assert close(out[agree], g.sum(0)[agree])
        agree_total += int(agree.sum())
    total = sum(g[0].numel() for g in grads)
    assert res.stats["agree_frac"] == pytest.approx(agree_total / total)


@FAST
@given(seed=st.integers(0, 2**31 - 1), num_domains=st.integers(1, 4), shapes=SHAPES)
def test_paper_and_official_agreement_differ_exactly_at_all_zero_components(seed, num_domains, shapes):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randint(-1, 2, (num_domains, *s), generator=gen).to(torch.float32) for s in shapes]
    paper = agreement_mask(grads, rule="paper")
    official = agreement_mask(grads, rule="official")
    for g, p, o in zip(grads, paper, official):
        assert p.dtype == torch.bool and p.shape == g.shape[1:]
        all_zero = (g == 0).all(0)
        assert torch.equal(p != o, all_zero)
        assert torch.equal(p, naive_agree(g, "paper"))
        assert torch.equal(o, naive_agree(g, "official"))


# ------------------------------------------------------------------------ Agr-Rand


def test_agr_rand_hand_case_uses_the_documented_noise():
    # comp0: (1, 3) agree, sum 4; comps 1, 2 disagree. sigma = mean |g*| over A = 4.
    g = t64([[1.0, 2.0, -1.0], [3.0, -1.0, 1.0]])
    res = agr_rand([g], generator=torch.Generator().manual_seed(7))
    z = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert res.stats["sigma"] == pytest.approx(4.0)
    assert res.stats["agree_frac"] == pytest.approx(1 / 3)
    assert res.grads[0][0].item() == 4.0
    assert close(res.grads[0][1:], 4.0 * z[1:])
    # mean reduction: everything (noise included) divided by D = 2, sigma reported 2
    mean = agr_rand([g], generator=torch.Generator().manual_seed(7), reduction="mean")
    assert mean.stats["sigma"] == pytest.approx(2.0)
    assert close(mean.grads[0], res.grads[0] / 2)


def test_agr_rand_sigma_is_network_wide():
    # tensor A agrees everywhere: sums (2, 6) -> |g*| 2, 6; tensor B: comp0 sum -4
    # agrees, comp1 disagrees. sigma = (2 + 6 + 4) / 3 = 4. Only B gets noise.
    a = t64([[1.0, 3.0], [1.0, 3.0]])
    b = t64([[-1.0, 1.0], [-3.0, -1.0]])
    res = agr_rand([a, b], generator=torch.Generator().manual_seed(3))
    assert res.stats["sigma"] == pytest.approx(4.0)
    assert res.grads[0].tolist() == [2.0, 6.0]
    z = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert res.grads[1][0].item() == -4.0
    assert res.grads[1][1].item() == pytest.approx(4.0 * z[1].item())


@pytest.mark.parametrize("rule", ["paper", "official"])
def test_agr_rand_never_nan_even_when_nothing_agrees(rule):
    g = t64([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]])
    res = agr_rand([g, g[:, :1].clone()], generator=torch.Generator().manual_seed(0), rule=rule)
    assert res.stats["agree_frac"] == 0.0
    assert res.stats["sigma"] == 0.0
    for out in res.grads:
        assert not torch.isnan(out).any()
        assert torch.all(out == 0)


def test_agr_rand_official_all_zero_gradients_is_zero_not_nan():
    res = agr_rand([torch.zeros(3, 4)], generator=torch.Generator().manual_seed(0), rule="official")
    assert torch.equal(res.grads[0], torch.zeros(4))


def test_agr_rand_is_reproducible_with_the_same_seed():
    grads = random_grads(0, 3, [(50,), (4, 5)], dtype=torch.float32)
    a = agr_rand(grads, generator=torch.Generator().manual_seed(11))
    b = agr_rand(grads, generator=torch.Generator().manual_seed(11))
    c = agr_rand(grads, generator=torch.Generator().manual_seed(12))
    assert all(torch.equal(x, y) for x, y in zip(a.grads, b.grads))
    assert not all(torch.equal(x, y) for x, y in zip(a.grads, c.grads))


def test_agr_rand_noise_std_matches_sigma_on_a_large_tensor():
    n, n_agree = 200_000, 1_000
    d0 = torch.ones(n, dtype=torch.float32)
    d1 = -torch.ones(n, dtype=torch.float32)
    d1[:n_agree] = 1.0  # agreeing components sum to 2 -> sigma = 2
    res = agr_rand([torch.stack([d0, d1])], generator=torch.Generator().manual_seed(5))
    out = res.grads[0]
    assert res.stats["sigma"] == pytest.approx(2.0)
    assert torch.all(out[:n_agree] == 2.0)
    noise = out[n_agree:].double()
    assert noise.std().item() == pytest.approx(2.0, rel=0.02)
    assert abs(noise.mean().item()) < 0.03


# ----------------------------------------------------------------------- the objects


def test_agr_sum_object_is_the_function_with_the_same_options():
    grads = [sparse_signs(torch.Generator().manual_seed(2), (3, *s)) for s in [(7,), (2, 3)]]
    for kwargs in ({}, {"rule": "official"}, {"reduction": "mean"}, {"rule": "official", "reduction": "mean"}):
        res, exp = AgrSum(**kwargs)(grads), agr_sum(grads, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(res.grads, exp.grads)) and res.stats == exp.stats, kwargs
    # the hand case: official rule, an all-zero component disagrees
    g = t64([[1.0, -1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 0.0, -1.0, 5.0]])
    assert AgrSum(rule="official")([g]).stats["agree_frac"] == pytest.approx(1 / 5)


def test_agr_rand_object_advances_its_generator_call_by_call():
    g = t64([[1.0, 2.0, -1.0, 4.0], [3.0, -1.0, 1.0, -2.0]])
    rule = AgrRand(generator=torch.Generator().manual_seed(7), reduction="mean")
    shared = torch.Generator().manual_seed(7)
    first, second = rule([g]), rule([g])
    assert torch.equal(first.grads[0], agr_rand([g], generator=shared, reduction="mean").grads[0])
    assert torch.equal(second.grads[0], agr_rand([g], generator=shared, reduction="mean").grads[0])
    assert not torch.equal(first.grads[0], second.grads[0])  # fresh noise on components 1-3
    assert first.grads[0][0].item() == second.grads[0][0].item() == 2.0  # agreeing: (1 + 3) / 2


def test_agreement_objects_repr_and_errors():
    assert repr(AgrSum()) == "AgrSum(rule='paper', reduction='sum')"
    assert repr(AgrRand(generator=torch.Generator(), rule="official")) == (
        "AgrRand(generator=torch.Generator(device='cpu'), rule='official', reduction='sum')"
    )
    with pytest.raises(ValueError, match="rule must be one of"):
        AgrSum(rule="strict")
    with pytest.raises(ValueError, match="reduction must be one of"):
        AgrSum(reduction="avg")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        AgrRand(generator=0)
    with pytest.raises(TypeError):
        AgrRand()  # the generator is required, as for the function
