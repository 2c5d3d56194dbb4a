"""Tests of domaingrad.gradients.surgery.

Expected values are computed by hand (derivations in the comments) or by the slow,
loop-based reference implementations at the top of this file, which follow the papers'
definitions literally (explicit Python loops over domain pairs and slices on flattened
vectors) and share no code with the module.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domaingrad.gradients import surgery
from domaingrad.gradients.surgery import (
    SurgeryResult,
    agr_rand,
    agr_sum,
    agreement_mask,
    and_mask,
    corgrad,
    pcgrad,
    sand_mask,
)

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)


def t64(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10, atol: float | None = None) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol if atol is None else atol)


def sparse_signs(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Values in {-2,...,2} times a positive scale: many exact zeros and sign ties."""
    ints = torch.randint(-2, 3, shape, generator=gen).to(F64)
    return ints * torch.rand(shape, generator=gen, dtype=F64)


def random_grads(seed: int, num_domains: int, shapes: list[tuple[int, ...]], dtype=F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((num_domains, *s), generator=gen, dtype=dtype) for s in shapes]


SHAPES = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 9)),
        st.tuples(st.integers(1, 5), st.integers(1, 4)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
        st.just(()),
    ),
    min_size=1,
    max_size=4,
)


# ------------------------------------------------------------- naive loop references


def naive_project(
    vecs: list[torch.Tensor],
    order: list[int],
    reference: str,
    eps: float,
    j_orders: list[list[int]] | None = None,
) -> list[torch.Tensor]:
    """Literal PCGrad loop (Yu et al. Alg. 1) on flat vectors.

    Domains ``i`` in ``order``; domain ``i`` against the others in ``j_orders[i]``
    (default: ``order`` without ``i``). Conflict: ``dot < -1e-10 ||pc_i|| ||ref||`` (the
    module's documented tie band, with the vectors' own norms as scales).
    """
    pc = [v.clone() for v in vecs]
    for i in order:
        others = j_orders[i] if j_orders is not None else [j for j in order if j != i]
        for j in others:
            ref = pc[j] if reference == "projected" else vecs[j]
            dot = torch.dot(pc[i], ref)
            nrm = torch.dot(ref, ref)
            if dot < -1e-10 * pc[i].norm() * ref.norm() and nrm > 0:
                pc[i] = pc[i] - dot / (nrm + eps) * ref
    return pc


def naive_simultaneous(vecs: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    out = []
    for i, gi in enumerate(vecs):
        new = gi.clone()
        for j, gj in enumerate(vecs):
            if j == i:
                continue
            dot = torch.dot(gi, gj)
            nrm = torch.dot(gj, gj)
            if dot < -1e-10 * gi.norm() * gj.norm() and nrm > 0:
                new = new - dot / (nrm + eps) * gj
        out.append(new)
    return out


def naive_pcgrad(
    grads: list[torch.Tensor], order: list[int], reference: str, eps: float
) -> list[torch.Tensor]:
    num_domains = grads[0].shape[0]
    flat = torch.cat([g.reshape(num_domains, -1) for g in grads], dim=1)
    pc = naive_project([flat[d] for d in range(num_domains)], order, reference, eps)
    total = sum(pc)
    out, start = [], 0
    for g in grads:
        n = g[0].numel()
        out.append(total[start : start + n].reshape(g.shape[1:]))
        start += n
    return out


def naive_auto(numel: int) -> int:
    return min(100, max(5, int(math.floor(math.sqrt(numel) + 0.5))))


def naive_pieces(
    grads: list[torch.Tensor], layerwise: bool, slices: int | str, slicing: str, min_slice: int = 1
) -> list[list[torch.Tensor]]:
    """Element indices of every piece of every unit (torch.tensor_split / torch.chunk),
    at most ``numel // min_slice`` pieces; dim0: fewer chunks until the last is long enough."""
    numels = [g[0].numel() for g in grads] if layerwise else [sum(g[0].numel() for g in grads)]
    out = []
    for u, numel in enumerate(numels):
        n = naive_auto(numel) if slices == "auto" else slices
        n = min(n, max(1, numel // min_slice))
        index = torch.arange(numel)
        if slicing == "dim0" and layerwise and grads[u].dim() > 1:
            while True:
                pieces = [c.reshape(-1) for c in torch.chunk(index.view(grads[u].shape[1:]), n, dim=0)]
                if n == 1 or not pieces or len(pieces[-1]) >= min_slice:
                    break
                n -= 1
        else:
            pieces = list(torch.tensor_split(index, min(n, numel))) if numel else []
        out.append(pieces)
    return out


def drawn_orders(num_domains: int, seed: int) -> list[list[int]]:
    """The documented random orders: per domain i (index order), the others permuted by
    one torch.randperm(D - 1) of a generator seeded with ``seed`` (none when D <= 2)."""
    gen = torch.Generator().manual_seed(seed)
    orders = []
    for i in range(num_domains):
        others = [j for j in range(num_domains) if j != i]
        if len(others) > 1:
            others = [others[k] for k in torch.randperm(len(others), generator=gen).tolist()]
        orders.append(others)
    return orders


def naive_corgrad(
    grads: list[torch.Tensor],
    *,
    layerwise: bool = True,
    slices: int | str = "auto",
    min_slice: int = 16,
    slicing: str = "flat",
    projection: str = "sequential",
    reference: str = "original",
    smoothing: str | None = "dominant",
    alpha: float = 0.75,
    eps: float = 1e-12,
    reduction: str = "sum",
    order: list[int] | None = None,
    j_orders: list[list[int]] | None = None,
) -> list[torch.Tensor]:
    """CorGrad with explicit loops over units, slices and domain pairs.

    Sequential projection: domains in ``order`` (default index order), domain ``i``
    against ``j_orders[i]`` (default: ``order`` without ``i``).
    """
    num_domains = grads[0].shape[0]
    order = list(range(num_domains)) if order is None else order
    if layerwise:
        units = [g.reshape(num_domains, -1) for g in grads]
    else:
        units = [torch.cat([g.reshape(num_domains, -1) for g in grads], dim=1)]
    sums = []
    for unit, pieces in zip(units, naive_pieces(grads, layerwise, slices, slicing, min_slice)):
        corrected = unit.clone()
        for idx in pieces:
            vecs = [unit[d, idx] for d in range(num_domains)]
            if projection == "simultaneous":
                pc = naive_simultaneous(vecs, eps)
            else:
                pc = naive_project(vecs, order, reference, eps, j_orders)
            for d in range(num_domains):
                corrected[d, idx] = pc[d]
        if smoothing is not None and num_domains > 1:
            norms = torch.stack([corrected[d].norm() for d in range(num_domains)])
            mean = norms.mean()
            std = ((norms - mean) ** 2).mean().sqrt()
            # documented tie margin: exceed the threshold by 1e-9 * max norm
            std = std + 1e-9 * norms.max()
            if smoothing == "dominant":
                flagged = [bool(norms[d] - mean > std) for d in range(num_domains)]
                target = corrected.mean(0)
            else:
                flagged = [bool((norms[d] - mean).abs() > std) for d in range(num_domains)]
                inl = [d for d in range(num_domains) if not flagged[d]]
                target = corrected[inl].mean(0)
            smoothed = corrected.clone()
            for d in range(num_domains):
                if flagged[d]:
                    smoothed[d] = alpha * corrected[d] + (1 - alpha) * target
            corrected = smoothed
        total = corrected.sum(0)
        sums.append(total / num_domains if reduction == "mean" else total)
    if layerwise:
        return [s.reshape(g.shape[1:]) for s, g in zip(sums, grads)]
    out, start = [], 0
    for g in grads:
        n = g[0].numel()
        out.append(sums[0][start : start + n].reshape(g.shape[1:]))
        start += n
    return out


def naive_agree(g: torch.Tensor, rule: str) -> torch.Tensor:
    signs = torch.sign(g)
    if rule == "paper":
        return (signs == signs[0]).all(0)
    return signs.sum(0).abs() == g.shape[0]


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


# -------------------------------------------------------------------------- PCGrad


def test_pcgrad_hand_two_domains_across_two_tensors():
    # g1 = (1, 0), g2 = (-1, 1) with the two components in two tensors; <g1, g2> = -1.
    # g1pc = g1 - (-1)/2 g2 = (0.5, 0.5); g2pc = g2 - (-1)/1 g1 = (0, 1); sum (0.5, 1.5).
    a = t64([[1.0], [-1.0]])
    b = t64([[0.0], [1.0]])
    for order in ([0, 1], [1, 0]):
        res = pcgrad([a, b], order=order, eps=0.0)
        assert close(res.grads[0], t64([0.5])) and close(res.grads[1], t64([1.5]))
        assert res.stats["conflict_pairs"] == 2.0
        assert res.stats["mod_freq"] == pytest.approx(1.0)
        # |cos| = 1 / (1 * sqrt(2)) for both projections
        assert res.stats["mod_ratio"] == pytest.approx(1 / math.sqrt(2))
    mean = pcgrad([a, b], order=[0, 1], reduction="mean")
    assert close(mean.grads[1], t64([0.75]))


def test_pcgrad_hand_three_domains_references_and_order():
    # g1 = (1,0,0), g2 = (0,1,0), g3 = (-2,-1,1); <g1,g2> = 0, <g1,g3> = -2, <g2,g3> = -1,
    # ||g3||^2 = 6.
    # reference="original", order 0,1,2:
    #   g1pc = g1 + 2/6 g3 = (1/3, -1/3, 1/3)
    #   g2pc = g2 + 1/6 g3 = (-1/3, 5/6, 1/6)
    #   g3pc = g3 + 2 g1 = (0,-1,1); <(0,-1,1), g2> = -1 -> + g2 = (0, 0, 1)
    #   sum = (0, 1/2, 3/2), 4 projections
    # reference="projected", order 0,1,2:
    #   g1pc = (1/3,-1/3,1/3); g2 vs g1pc: -1/3 < 0, ||g1pc||^2 = 1/3 -> g2 + g1pc =
    #   (1/3, 2/3, 1/3); vs g3: -2/3-2/3+1/3 = -1 -> + 1/6 g3 = (0, 1/2, 1/2);
    #   g3 vs g1pc: -2/3+1/3+1/3 = 0, vs g2pc: -1/2+1/2 = 0 -> unchanged;
    #   sum = (1/3 + 0 - 2, -1/3 + 1/2 - 1, 1/3 + 1/2 + 1) = (-5/3, -5/6, 11/6)
    # reference="original", order 2,1,0:
    #   g3: vs g2 -1 -> g3 + g2 = (-2,0,1); vs g1 -2 -> + 2 g1 = (0,0,1)
    #   g2: vs g3 -1 -> g2 + 1/6 g3 = (-1/3,5/6,1/6); vs g1 -1/3 -> + 1/3 g1 = (0,5/6,1/6)
    #   g1: vs g3 -2 -> (1/3,-1/3,1/3); vs g2 -1/3 -> + 1/3 g2 = (1/3,0,1/3)
    #   sum = (1/3, 5/6, 3/2): the order matters
    g = t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -1.0, 1.0]])
    orig = pcgrad([g], order=[0, 1, 2], reference="original", eps=0.0)
    assert close(orig.grads[0], t64([0.0, 0.5, 1.5]))
    assert orig.stats["conflict_pairs"] == 4.0
    assert orig.stats["mod_freq"] == pytest.approx(4 / 6)
    proj = pcgrad([g], order=[0, 1, 2], reference="projected", eps=0.0)
    assert close(proj.grads[0], t64([-5 / 3, -5 / 6, 11 / 6]))
    rev = pcgrad([g], order=[2, 1, 0], eps=0.0)
    assert close(rev.grads[0], t64([1 / 3, 5 / 6, 1.5]))
    assert rev.stats["conflict_pairs"] == 6.0


def test_pcgrad_order_comes_from_the_generator():
    # the permutation is torch.randperm(D, generator=generator); different seeds give
    # different orders and so (for this order-dependent case) different results
    g = t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -1.0, 1.0]])
    distinct = set()
    for seed in range(12):
        out = pcgrad([g], generator=torch.Generator().manual_seed(seed)).grads[0]
        perm = torch.randperm(3, generator=torch.Generator().manual_seed(seed)).tolist()
        assert close(out, naive_pcgrad([g], perm, "original", 1e-12)[0])
        distinct.add(tuple(round(v, 9) for v in out.tolist()))
    assert len(distinct) > 1


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.sampled_from([2, 3, 5]),
    shapes=SHAPES,
    reference=st.sampled_from(["original", "projected"]),
    eps=st.sampled_from([0.0, 1e-12, 0.5]),
)
def test_pcgrad_matches_the_loop_reference(seed, num_domains, shapes, reference, eps):
    grads = random_grads(seed, num_domains, shapes)
    if reference == "projected":
        # fewer elements than domains: projected references become rounding noise (the
        # module then skips them, the loop reference projects on noise); see CorGrad test
        assume(sum(g[0].numel() for g in grads) >= num_domains)
    order = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed)).tolist()
    res = pcgrad(grads, order=order, reference=reference, eps=eps)
    expected = naive_pcgrad(grads, order, reference, eps)
    for out, exp, g in zip(res.grads, expected, grads):
        assert out.shape == g.shape[1:]
        assert close(out, exp, 1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), num_domains=st.integers(1, 5), shapes=SHAPES)
def test_no_conflict_gives_the_plain_sum(seed, num_domains, shapes):
    # nonnegative gradients: every dot product (whole network or any slice) is >= 0
    grads = [g.abs() for g in random_grads(seed, num_domains, shapes)]
    plain = [g.sum(0) for g in grads]
    rules = [
        pcgrad(grads, order=list(range(num_domains))),
        pcgrad(grads, generator=torch.Generator().manual_seed(seed), reference="projected"),
        corgrad(grads, smoothing=None),
        corgrad(grads, smoothing=None, projection="sequential", reference="projected", slices=3),
        corgrad(grads, smoothing=None, layerwise=False, slices="auto", slicing="dim0"),
    ]
    for res in rules:
        assert res.stats["conflict_pairs"] == 0.0
        assert res.stats["mod_ratio"] == 0.0
        for out, exp in zip(res.grads, plain):
            assert close(out, exp)


# ------------------------------------------------------------------------- CorGrad


def test_corgrad_hand_slicing_reveals_a_hidden_conflict():
    # g1 = (1, 0, 1, 1), g2 = (-1, 1, 1, 1). Whole vector: <g1, g2> = 1 >= 0, no conflict.
    # slices=2 -> pieces [0:2], [2:4]; piece 0: <(1,0), (-1,1)> = -1:
    #   g1 -> (1,0) - (-1)/2 (-1,1) = (0.5, 0.5); g2 -> (-1,1) - (-1)/1 (1,0) = (0, 1)
    # piece 1: <(1,1), (1,1)> = 2, untouched. Sum = (0.5, 1.5, 2, 2).
    g = t64([[1.0, 0.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0]])
    whole = corgrad([g], slices=1, smoothing=None)
    assert close(whole.grads[0], t64([0.0, 1.0, 2.0, 2.0]))
    assert whole.stats["conflict_pairs"] == 0.0
    sliced = corgrad([g], slices=2, min_slice=1, smoothing=None, eps=0.0)
    assert close(sliced.grads[0], t64([0.5, 1.5, 2.0, 2.0]))
    assert sliced.stats["conflict_pairs"] == 2.0
    assert sliced.stats["pieces"] == 2.0
    # 2 conflicting (i, j, piece) of 2 * 1 * 2 = 4 considered
    assert sliced.stats["mod_freq"] == pytest.approx(0.5)
    assert sliced.stats["mod_ratio"] == pytest.approx(1 / math.sqrt(2))
    mean = corgrad([g], slices=2, min_slice=1, smoothing=None, reduction="mean")
    # the default min_slice (16) keeps a 4-element unit whole: no hidden conflict found
    assert corgrad([g], slices=2, smoothing=None).stats["pieces"] == 1.0
    assert close(mean.grads[0], t64([0.25, 0.75, 1.0, 1.0]))


def test_corgrad_hand_simultaneous_vs_sequential_three_domains():
    # Same vectors as the PCGrad hand case, one unit, one slice.
    # simultaneous: g1pc = g1 + 2/6 g3, g2pc = g2 + 1/6 g3, g3pc = g3 + 2 g1 + 1 g2
    #   = (1/3,-1/3,1/3) + (-1/3,5/6,1/6) + (0,0,1) = (0, 1/2, 3/2)
    # sequential + projected: (-5/3, -5/6, 11/6) as computed for PCGrad.
    g = t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -1.0, 1.0]])
    sim = corgrad([g], slices=1, smoothing=None, eps=0.0, projection="simultaneous")
    assert close(sim.grads[0], t64([0.0, 0.5, 1.5]))
    assert sim.stats["conflict_pairs"] == 4.0  # (1,3), (2,3), (3,1), (3,2)
    # mod ratios |cos|: (1,3),(3,1): 2/sqrt(6); (2,3),(3,2): 1/sqrt(6)
    assert sim.stats["mod_ratio"] == pytest.approx((2 * 2 + 2 * 1) / 4 / math.sqrt(6))
    seq = corgrad([g], slices=1, smoothing=None, order="index", reference="projected", eps=0.0)
    assert close(seq.grads[0], t64([-5 / 3, -5 / 6, 11 / 6]))
    # the default is sequential against original references: order 2,1,0 gives the PCGrad
    # hand value (1/3, 5/6, 3/2), which the simultaneous rule cannot give
    rev = corgrad([g], slices=1, smoothing=None, order=[2, 1, 0], eps=0.0)
    assert close(rev.grads[0], t64([1 / 3, 5 / 6, 1.5]))


def test_corgrad_default_is_a_projection_where_simultaneous_is_not():
    # One 1-element piece, g = (2, -1, -1) over three domains. Sequential, any order:
    # g1 = 2 is projected off the first negative other -> 0; each -1 is projected off
    # 2 -> 0 (its dot with the other -1 is positive). Sum 0 in every order.
    # Simultaneous: g1 -> 2 - 2 - 2 = -2 (reversed), g2, g3 -> 0: sum -2.
    g = t64([[2.0], [-1.0], [-1.0]])
    for seed in range(6):
        res = corgrad([g], smoothing=None, eps=0.0, generator=torch.Generator().manual_seed(seed))
        assert res.grads[0].item() == pytest.approx(0.0, abs=1e-12)
    for perm in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        assert corgrad([g], smoothing=None, eps=0.0, order=perm).grads[0].item() == pytest.approx(0.0, abs=1e-12)
    sim = corgrad([g], smoothing=None, eps=0.0, projection="simultaneous")
    assert sim.grads[0].item() == pytest.approx(-2.0)


def test_corgrad_random_orders_are_drawn_per_domain_from_the_generator():
    # Four domains, whole network: the default order (per domain i, the others in the
    # order of one torch.randperm(3)) matches the loop reference fed the same draws, the
    # same seed gives the same result, and different seeds reach different results.
    grads = random_grads(21, 4, [(5,), (3,)])
    results = set()
    for seed in range(8):
        kwargs = dict(layerwise=False, slices=1, smoothing=None)
        a = corgrad(grads, generator=torch.Generator().manual_seed(seed), **kwargs)
        b = corgrad(grads, generator=torch.Generator().manual_seed(seed), **kwargs)
        expected = naive_corgrad(grads, j_orders=drawn_orders(4, seed), **kwargs)
        for x, y, e in zip(a.grads, b.grads, expected):
            assert torch.equal(x, y)
            assert close(x, e, 1e-9)
        results.add(tuple(round(v, 9) for v in torch.cat([x.reshape(-1) for x in a.grads]).tolist()))
    assert len(results) > 1
    # the projected-reference (official aliasing) mode takes random orders too
    hand = [t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -1.0, 1.0]])]  # order-dependent
    proj = set()
    for seed in range(8):
        res = corgrad(hand, slices=1, smoothing=None, reference="projected",
                      generator=torch.Generator().manual_seed(seed))
        exp = naive_corgrad(hand, slices=1, smoothing=None, reference="projected", j_orders=drawn_orders(3, seed))
        assert close(res.grads[0], exp[0])
        proj.add(tuple(round(v, 9) for v in res.grads[0].tolist()))
    assert len(proj) > 1


def test_corgrad_smoothing_dominant_vs_two_sided_hand():
    # Case 1: g1 = (1,0), g2 = (0,1), g3 = (4,0): no conflicts (dots 0, 4, 0).
    # norms 1, 1, 4: mean 2, population std sqrt((1+1+4)/3) = sqrt(2) ~ 1.414.
    # dominant: 4 - 2 = 2 > 1.414 -> g3 flagged; g_mean = (5/3, 1/3);
    #   g3' = 0.6 (4,0) + 0.4 (5/3,1/3) = (46/15, 2/15); sum = (61/15, 17/15)
    # two_sided: |1-2| = 1 < 1.414, |4-2| = 2 -> only g3; mean of non-outliers (1/2,1/2);
    #   g3' = (2.4, 0) + 0.4 (0.5, 0.5) = (2.6, 0.2); sum = (3.6, 1.2)
    g = t64([[1.0, 0.0], [0.0, 1.0], [4.0, 0.0]])
    dom = corgrad([g], slices=1, smoothing="dominant", alpha=0.6)
    assert close(dom.grads[0], t64([61 / 15, 17 / 15]))
    assert dom.stats["smoothed"] == 1.0
    two = corgrad([g], slices=1, smoothing="two_sided", alpha=0.6)
    assert close(two.grads[0], t64([3.6, 1.2]))
    assert two.stats["smoothed"] == 1.0
    # Case 2: g1 = (1,0), g2 = (0,4), g3 = (4,0): norms 1, 4, 4, mean 3, std sqrt(2).
    # dominant: 4 - 3 = 1 < 1.414 -> nothing; sum = (5, 4)
    # two_sided: |1 - 3| = 2 > 1.414 -> g1 flagged (a LOW outlier); mean of g2, g3 = (2, 2);
    #   g1' = 0.6 (1,0) + 0.4 (2,2) = (1.4, 0.8); sum = (5.4, 4.8)
    g = t64([[1.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    dom = corgrad([g], slices=1, smoothing="dominant", alpha=0.6)
    assert close(dom.grads[0], t64([5.0, 4.0]))
    assert dom.stats["smoothed"] == 0.0
    two = corgrad([g], slices=1, smoothing="two_sided", alpha=0.6)
    assert close(two.grads[0], t64([5.4, 4.8]))
    assert two.stats["smoothed"] == 1.0
    # smoothing is per unit: with layerwise=True each tensor has its own statistics
    assert corgrad([g], slices=1, smoothing="two_sided", alpha=1.0).grads[0].tolist() == [5.0, 4.0]


def test_corgrad_two_domains_never_smooth():
    # with D = 2 the larger norm equals mean + std exactly: never flagged
    g = random_grads(1, 2, [(7,), (3, 3)])
    res = corgrad(g, smoothing="dominant", alpha=0.0)
    assert res.stats["smoothed"] == 0.0
    assert corgrad(g, smoothing="two_sided", alpha=0.0).stats["smoothed"] == 0.0


def test_corgrad_alpha_decay_schedule():
    g = [t64([[1.0, 0.0], [0.0, 1.0], [4.0, 0.0]])]
    # alpha_t = 0.8 (1 - log(t+1)/log(100)): t=0 -> 0.8; t=9 -> 0.8 (1 - 1/2) = 0.4;
    # t=99 -> 0; t=500 -> negative, clipped to 0
    for step, expected in ((0, 0.8), (9, 0.4), (99, 0.0), (500, 0.0)):
        res = corgrad(g, slices=1, alpha=0.8, alpha_schedule="decay", step=step, total_steps=100)
        assert res.stats["alpha"] == pytest.approx(expected, abs=1e-12)
    assert corgrad(g, alpha=0.8, step=50, total_steps=100, alpha_schedule="constant").stats["alpha"] == 0.8
    # the default schedule is the paper's decay; at step 0 it needs no run length
    assert corgrad(g, alpha=0.8, step=9, total_steps=100).stats["alpha"] == pytest.approx(0.4)
    assert corgrad(g, alpha=0.8).stats["alpha"] == 0.8
    with pytest.raises(ValueError, match="needs total_steps"):
        corgrad(g, step=3)
    # alpha = 0 replaces the dominant g3 by g_mean = (5/3, 1/3): sum = (1 + 5/3, 1 + 1/3)
    res = corgrad(g, slices=1, alpha=0.8, alpha_schedule="decay", step=99, total_steps=100)
    assert close(res.grads[0], t64([8 / 3, 4 / 3]))


@FAST
@given(seed=st.integers(0, 2**31 - 1), num_domains=st.integers(1, 5), shapes=SHAPES)
def test_corgrad_sequential_whole_network_equals_pcgrad(seed, num_domains, shapes):
    grads = random_grads(seed, num_domains, shapes)
    perm = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed)).tolist()
    for order in (list(range(num_domains)), perm):
        a = corgrad(grads, layerwise=False, slices=1, smoothing=None, order=order)
        b = pcgrad(grads, order=order, reference="original")
        for x, y in zip(a.grads, b.grads):
            assert close(x, y, 1e-12)
        for key in ("conflict_pairs", "mod_freq", "mod_ratio"):
            assert a.stats[key] == pytest.approx(b.stats[key])


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.integers(2, 5),
    shapes=SHAPES,
    layerwise=st.booleans(),
    slices=st.sampled_from([1, 2, 3, 10, "auto"]),
    smoothing=st.sampled_from(["dominant", "two_sided", None]),
)
def test_corgrad_simultaneous_is_invariant_to_domain_order(
    seed, num_domains, shapes, layerwise, slices, smoothing
):
    grads = random_grads(seed, num_domains, shapes)
    perm = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed + 1))
    kwargs = dict(layerwise=layerwise, slices=slices, smoothing=smoothing, projection="simultaneous")
    a = corgrad(grads, **kwargs)
    b = corgrad([g[perm] for g in grads], **kwargs)
    for x, y in zip(a.grads, b.grads):
        assert close(x, y, 1e-9)
    assert a.stats == pytest.approx(b.stats)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_domains=st.sampled_from([2, 3, 5]),
    shapes=SHAPES,
    layerwise=st.booleans(),
    slices=st.sampled_from([1, 2, 3, 4, 10, "auto"]),
    min_slice=st.sampled_from([1, 2, 5, 16]),
    slicing=st.sampled_from(["flat", "dim0"]),
    mode=st.sampled_from(
        [("simultaneous", "original"), ("sequential", "original"), ("sequential", "projected")]
    ),
    order=st.sampled_from(["index", "perm", "random"]),
    smoothing=st.sampled_from(["dominant", "two_sided", None]),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_corgrad_matches_the_per_slice_loop_reference(
    seed, num_domains, shapes, layerwise, slices, min_slice, slicing, mode, order, smoothing, reduction
):
    grads = random_grads(seed, num_domains, shapes)
    if mode[1] == "projected":
        # In a piece of fewer than D elements sequential projections against projected
        # references drive vectors to (numerically) zero, and which noise-level dot
        # products count as conflicts is arbitrary (the module skips such references).
        pieces = naive_pieces(grads, layerwise, slices, slicing, min_slice)
        assume(all(len(idx) >= num_domains for unit in pieces for idx in unit))
    kwargs = dict(
        layerwise=layerwise,
        slices=slices,
        min_slice=min_slice,
        slicing=slicing,
        projection=mode[0],
        reference=mode[1],
        smoothing=smoothing,
        alpha=0.3,
        reduction=reduction,
    )
    perm = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed + 7)).tolist()
    if order == "index":
        res = corgrad(grads, order="index", **kwargs)
        expected = naive_corgrad(grads, **kwargs)
    elif order == "perm":
        res = corgrad(grads, order=perm, **kwargs)
        expected = naive_corgrad(grads, order=perm, **kwargs)
    else:
        res = corgrad(grads, generator=torch.Generator().manual_seed(seed), **kwargs)
        expected = naive_corgrad(grads, j_orders=drawn_orders(num_domains, seed), **kwargs)
    for out, exp, g in zip(res.grads, expected, grads):
        assert out.shape == g.shape[1:]
        # atol: a unit whose corrected gradients are all ~0 (e.g. one element, every
        # domain projected away; eps leaves ~1e-9 residues) is smoothed on rounding-level
        # norms in the loop reference and not in the module; both results are ~1e-9.
        assert close(out, exp, 1e-9, atol=1e-7)


def test_corgrad_slices_across_tensor_boundaries_when_not_layerwise():
    # 3 tensors of sizes 5, 2, 6 -> 13 elements; slices=4 -> tensor_split sizes 4,3,3,3:
    # pieces [0:4], [4:7], [7:10], [10:13] cross the tensor boundaries 5 and 7.
    grads = random_grads(3, 3, [(5,), (2,), (2, 3)])
    res = corgrad(grads, layerwise=False, slices=4, min_slice=1, smoothing=None, order="index")
    assert res.stats["pieces"] == 4.0
    expected = naive_corgrad(grads, layerwise=False, slices=4, min_slice=1, smoothing=None)
    for out, exp in zip(res.grads, expected):
        assert close(out, exp)


def test_corgrad_piece_counts_flat_dim0_and_auto():
    g = torch.zeros(2, 7, 3)  # 21 elements, 7 rows
    one = {"min_slice": 1}  # the official code's pieces, down to single elements
    assert corgrad([g], slices=10, **one).stats["pieces"] == 10.0  # tensor_split: 10 pieces
    # chunk(7 rows, 10) -> chunks of ceil(7/10) = 1 row -> 7 pieces
    assert corgrad([g], slices=10, slicing="dim0", **one).stats["pieces"] == 7.0
    # chunk(7 rows, 3) -> ceil(7/3) = 3 rows -> 3 + 3 + 1 -> 3 pieces
    assert corgrad([g], slices=3, slicing="dim0", **one).stats["pieces"] == 3.0
    # chunk(7 rows, 4) -> 2 rows -> 2+2+2+1 -> 4 pieces
    assert corgrad([g], slices=4, slicing="dim0", **one).stats["pieces"] == 4.0
    # fewer elements than slices -> numel pieces
    assert corgrad([torch.zeros(2, 3)], slices=10, **one).stats["pieces"] == 3.0
    # auto: clamp(round(sqrt(numel)), 5, 100)
    assert corgrad([g], slices="auto", **one).stats["pieces"] == 5.0  # sqrt(21) = 4.6 -> 5
    assert corgrad([torch.zeros(2, 1000)], slices="auto").stats["pieces"] == 32.0  # 31.6 -> 32
    assert corgrad([torch.zeros(2, 10**6)], slices="auto").stats["pieces"] == 100.0
    assert surgery.auto_slices(3) == 5 and surgery.auto_slices(400) == 20


def test_corgrad_min_slice_keeps_every_piece_long_enough():
    # default min_slice = 16: a unit of m elements gets min(n, max(1, m // 16)) pieces
    assert corgrad([torch.zeros(2, 21)], slices="auto").stats["pieces"] == 1.0  # 21 // 16 = 1
    assert corgrad([torch.zeros(2, 10)], slices=10).stats["pieces"] == 1.0
    assert corgrad([torch.zeros(2, 64)], slices="auto").stats["pieces"] == 4.0  # auto 8, 64 // 16 = 4
    assert corgrad([torch.zeros(2, 1000)], slices=100).stats["pieces"] == 62.0  # 1000 // 16
    assert corgrad([torch.zeros(2, 64)], slices=10, min_slice=5).stats["pieces"] == 10.0
    # dim0: 7 rows of 3 (21 elements), min_slice 5 -> at most 4 chunks; chunk(7, 4) ends
    # with a 1-row (3-element) chunk, chunk(7, 3) with 1 row too, chunk(7, 2) = 4 + 3 rows
    assert corgrad([torch.zeros(2, 7, 3)], slices=10, slicing="dim0", min_slice=5).stats["pieces"] == 2.0
    for numel, n in ((21, "auto"), (64, 10), (1000, 100), (5, 3)):
        for min_slice in (2, 5, 16):
            pieces = naive_pieces([torch.zeros(2, numel)], True, n, "flat", min_slice)[0]
            assert min(len(p) for p in pieces) >= min(min_slice, numel)


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


def naive_and_mask(g: torch.Tensor, tau: float) -> torch.Tensor:
    mask = (torch.sign(g).mean(0).abs() >= tau).to(g.dtype)
    return mask * g.mean(0) / (1e-10 + mask.mean())


def naive_sand_mask(g: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    avg = g.mean(0)
    var = g.var(dim=0)
    var[torch.isnan(var)] = 1e-17
    lam = var.pow(-1)
    mask = torch.tanh(k * lam * (torch.sign(g).mean(0).abs() - tau))
    mask = torch.max(mask, torch.zeros_like(mask))
    mask[torch.isnan(mask)] = 1e-17
    return mask * avg / (1e-10 + mask.mean())


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


# ------------------------------------------------------------ shapes, dtypes, blocks


ALL_RULES = {
    "agr_sum": lambda g: agr_sum(g),
    "agr_sum_official": lambda g: agr_sum(g, rule="official", reduction="mean"),
    "agr_rand": lambda g: agr_rand(g, generator=torch.Generator().manual_seed(0)),
    "pcgrad": lambda g: pcgrad(g, generator=torch.Generator().manual_seed(0)),
    "corgrad": lambda g: corgrad(g, generator=torch.Generator().manual_seed(0)),
    "corgrad_dim0_seq": lambda g: corgrad(
        g, slices=10, min_slice=1, slicing="dim0", order="index", reference="projected", smoothing="two_sided"
    ),
    "corgrad_global_auto": lambda g: corgrad(
        g, layerwise=False, slices="auto", min_slice=2, generator=torch.Generator().manual_seed(1)
    ),
    "corgrad_simultaneous": lambda g: corgrad(g, slices=3, min_slice=2, projection="simultaneous"),
    "corgrad_official": lambda g: corgrad(g, **surgery.OFFICIAL_CORGRAD_OPTIONS),
    "and_mask": lambda g: and_mask(g),
    "sand_mask": lambda g: sand_mask(g, tau=0.3),
}


@pytest.mark.parametrize("name", sorted(ALL_RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_have_param_shapes_and_input_dtype(name, dtype):
    shapes = [(4, 3, 2, 2), (4,), (), (7, 5), (1,)]
    grads = random_grads(0, 3, shapes, dtype=dtype)
    res = ALL_RULES[name](grads)
    assert isinstance(res, SurgeryResult)
    assert len(res.grads) == len(shapes)
    for out, s in zip(res.grads, shapes):
        assert out.shape == torch.Size(s)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
    assert all(type(v) is float for v in res.stats.values())


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_single_domain(name):
    grads = random_grads(4, 1, [(6,), (2, 3)])
    res = ALL_RULES[name](grads)
    for out, g in zip(res.grads, grads):
        assert out.shape == g.shape[1:]
        if name == "pcgrad" or name.startswith("corgrad"):
            assert close(out, g[0])  # nothing to project or smooth


def test_float32_results_agree_with_float64():
    grads = random_grads(9, 3, [(40,), (6, 7)])
    for name, rule in ALL_RULES.items():
        if name == "agr_rand":
            continue
        r64 = rule(grads)
        r32 = rule([g.float() for g in grads])
        for a, b in zip(r64.grads, r32.grads):
            assert torch.allclose(a.float(), b, rtol=1e-4, atol=1e-5), name


def test_half_precision_inputs_run_and_keep_dtype():
    grads = random_grads(2, 3, [(8,), (3, 4)], dtype=torch.float32)
    half = [g.to(torch.bfloat16) for g in grads]
    for rule in (
        agr_sum,
        lambda g: pcgrad(g, order=[2, 0, 1]),
        lambda g: corgrad(g, min_slice=2, generator=torch.Generator().manual_seed(0)),
        and_mask,
    ):
        res = rule(half)
        ref = rule([h.float() for h in half])  # same (rounded) inputs in float32
        for a, b in zip(res.grads, ref.grads):
            assert a.dtype == torch.bfloat16
            assert torch.allclose(a.float(), b, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("num_domains", [3, 5])
@pytest.mark.parametrize("chunk, small", [(5, None), (None, 0), (5, 0), (3, 10**9)])
def test_blocking_and_packing_do_not_change_results(monkeypatch, chunk, small, num_domains):
    # chunk: elements per block of the blocked kernels (tiny -> every tensor spans several
    # blocks, with a ragged last one); small: tensors below this size are packed together
    # (0 -> no packing, huge -> everything packed, including the big tensors).
    grads = random_grads(5, num_domains, [(23,), (4, 6), (1,), (0,), (2, 2, 3)])
    before = {name: rule(grads) for name, rule in ALL_RULES.items()}
    if chunk is not None:
        monkeypatch.setattr(surgery, "_CHUNK", chunk)
    if small is not None:
        monkeypatch.setattr(surgery, "_SMALL", small)
    for name, rule in ALL_RULES.items():
        after = rule(grads)
        for a, b in zip(before[name].grads, after.grads):
            assert a.shape == b.shape
            assert close(a, b, 1e-9), name
        assert after.stats == pytest.approx(before[name].stats), name


def test_inputs_are_not_modified():
    grads = random_grads(6, 3, [(10,), (3, 3)])
    copies = [g.clone() for g in grads]
    for rule in ALL_RULES.values():
        rule(grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, copies))


def test_zero_size_parameter():
    grads = [torch.zeros(3, 0), torch.ones(3, 2)]
    for name, rule in ALL_RULES.items():
        res = rule(grads)
        assert res.grads[0].shape == (0,), name
        assert res.grads[1].shape == (2,), name


# --------------------------------------------------------------------------- errors


GOOD = [torch.ones(2, 3)]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: agr_sum([]), "empty"),
        (lambda: agr_sum(torch.ones(2, 3)), "sequence of tensors"),
        (lambda: pcgrad([torch.ones(2, 3), torch.ones(3, 3)]), "inconsistent number of domains"),
        (lambda: corgrad([torch.ones(0, 3)]), "D >= 1"),
        (lambda: agr_sum([torch.tensor(1.0)]), "0-dimensional"),
        (lambda: and_mask([torch.ones(2, 3, dtype=torch.int64)]), "floating point"),
        (lambda: agr_sum([[1.0, 2.0]]), "torch.Tensor"),
        (lambda: agreement_mask(GOOD, rule="strict"), "rule must be one of"),
        (lambda: agr_sum(GOOD, reduction="avg"), "reduction must be one of"),
        (lambda: agr_rand(GOOD, generator=0), "torch.Generator"),
        (lambda: pcgrad(GOOD, reference="aliased"), "reference must be one of"),
        (lambda: pcgrad(GOOD, order=[0, 0]), "permutation"),
        (lambda: pcgrad(GOOD, eps=-1.0), "eps"),
        (lambda: corgrad(GOOD, slices=0), "slices"),
        (lambda: corgrad(GOOD, slices="many"), "slices"),
        (lambda: corgrad(GOOD, slices=True), "slices"),
        (lambda: corgrad(GOOD, slicing="rows"), "slicing must be one of"),
        (lambda: corgrad(GOOD, projection="parallel"), "projection must be one of"),
        (lambda: corgrad(GOOD, smoothing="both"), "smoothing must be one of"),
        (lambda: corgrad(GOOD, alpha=1.5), "alpha"),
        (lambda: corgrad(GOOD, alpha_schedule="linear"), "alpha_schedule must be one of"),
        (lambda: corgrad(GOOD, alpha_schedule="decay", total_steps=1), "total_steps >= 2"),
        (lambda: corgrad(GOOD, step=-1), "step"),
        (lambda: corgrad(GOOD, layerwise="yes"), "layerwise"),
        (lambda: corgrad(GOOD, min_slice=0), "min_slice must be an int >= 1"),
        (lambda: corgrad(GOOD, min_slice=2.5), "min_slice must be an int >= 1"),
        (lambda: corgrad(GOOD, order="random"), "order must be one of"),
        (lambda: corgrad(GOOD, order=[1, 1]), "permutation"),
        (lambda: corgrad(GOOD, generator=0), "torch.Generator"),
        (lambda: corgrad(GOOD, step=1), "needs total_steps"),
        (lambda: and_mask(GOOD, tau=float("nan")), "tau"),
        (lambda: sand_mask(GOOD, k="10"), "k must be"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_scalars_are_accepted_for_numeric_options():
    np = pytest.importorskip("numpy")
    g = random_grads(8, 3, [(12,)])
    a = corgrad(g, slices=np.int64(3), min_slice=np.int64(2), alpha=np.float32(0.5), step=np.int64(2),
                total_steps=np.int64(10), alpha_schedule="decay", eps=np.float64(1e-12), order="index")
    b = corgrad(g, slices=3, min_slice=2, alpha=0.5, step=2, total_steps=10, alpha_schedule="decay",
                order="index")
    assert all(close(x, y) for x, y in zip(a.grads, b.grads))
    assert close(and_mask(g, tau=np.float32(0.5)).grads[0], and_mask(g, tau=0.5).grads[0])


# ------------------------------------------------------------ ties and precision


def orthogonal_pair(seed: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """(2, n): a and b = c - <a, c>/<a, a> a, so <a, b> = 0 up to rounding only."""
    gen = torch.Generator().manual_seed(seed)
    a, c = torch.randn(2, n, generator=gen, dtype=F64)
    b = c - (a @ c) / (a @ a) * a
    return torch.stack([a, b]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conflict_decisions_do_not_depend_on_summation_order(dtype):
    # <a, b> = 0 up to rounding. In float64 it stays inside the tie band: no conflict. In
    # float32 the cast leaves a real |cos| ~ 1e-8, whose sign a float32 accumulation gets
    # wrong about half the time; with float64 Gram matrices the decision is the same for
    # every element order and packing (and, for PCGrad and CorGrad, the same decision).
    for seed in range(12):
        g = orthogonal_pair(seed, 3000, dtype)
        variants = {
            "plain": [g],
            "reversed": [g.flip(1)],
            "split": list(g.split([7, 993, 2000], dim=1)),  # small tensors are packed
        }
        counts = set()
        for name, grads in variants.items():
            res = pcgrad(grads, order=[0, 1], eps=0.0)
            cg = corgrad(grads, layerwise=False, slices=1, smoothing=None, order=[0, 1])
            assert cg.stats["conflict_pairs"] == res.stats["conflict_pairs"], (seed, name)
            counts.add(res.stats["conflict_pairs"])
        assert len(counts) == 1, seed
        if dtype == torch.float64:
            assert counts == {0.0}, seed


def test_a_conflict_needs_a_dot_product_beyond_the_tie_band():
    # cos = -1e-12: inside the 1e-10 band, no projection (the official code projects);
    # cos = -1e-6: a conflict, projected exactly as PCGrad says.
    for cos, conflicts in ((-1e-12, 0.0), (-1e-6, 2.0)):
        g = t64([[1.0, 0.0], [cos, math.sqrt(1 - cos * cos)]])
        res = pcgrad([g], order=[0, 1], eps=0.0)
        assert res.stats["conflict_pairs"] == conflicts
        assert corgrad([g], slices=1, smoothing=None, order=[0, 1], eps=0.0).stats["conflict_pairs"] == conflicts
        assert corgrad([g], slices=1, smoothing=None, projection="simultaneous").stats["conflict_pairs"] == conflicts


def test_gram_matrices_are_float64_whatever_the_input_dtype_or_packing():
    # float32 inputs: products and sums in float64, so the Gram equals the float64 Gram of
    # the same (upcast) values to float64 rounding, packed (segment path) or not (BLAS)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 200_000, generator=gen) * torch.rand(200_000, generator=gen) * 100).float()
    exact = x.double() @ x.double().T
    scale = x.double().norm(dim=1)
    bound = 1e-12 * scale[:, None] * scale[None, :]
    run = surgery._gram_run(x.unsqueeze(1))[0]
    assert run.dtype == F64
    assert torch.all((run - exact).abs() <= bound)
    packed = torch.zeros(1, 3, 3, dtype=F64)
    surgery._segment_gram(x, torch.zeros(x.shape[1], dtype=torch.int64), packed)
    assert torch.all((packed[0] - exact).abs() <= bound)
    pieces = surgery._gram_run(x.reshape(3, 50, 4000))  # many pieces: batched path
    exact_p = torch.einsum("dpk,epk->pde", x.double().reshape(3, 50, 4000), x.double().reshape(3, 50, 4000))
    assert torch.allclose(pieces, exact_p, rtol=1e-12, atol=0.0)


def official_corgrad_loop(grads: list[torch.Tensor], n_parts: int = 10, alpha: float = 0.6) -> list[torch.Tensor]:
    """The authors' correct_grad (libzwo/CorGrad, domainbed/gradient.py) re-expressed:
    per tensor, torch.chunk(dim 0) views of per-domain copies, projected IN PLACE in index
    order (later domains see projected references), no epsilon; two-sided outliers of the
    tensor norms replaced by alpha g + (1 - alpha) mean(non-outliers); summed."""
    out = []
    for g in grads:
        num_domains = g.shape[0]
        bufs = [g[d].clone() for d in range(num_domains)]
        chunks = [torch.chunk(b, n_parts) for b in bufs]
        for i in range(num_domains):
            for c in range(len(chunks[i])):
                gi = chunks[i][c]
                for p in range(num_domains):
                    if p == i:
                        continue
                    gj = chunks[p][c]
                    dot = torch.dot(gi.flatten(), gj.flatten())
                    if dot < 0:
                        gi -= dot / (gj**2).sum() * gj
        norms = torch.stack([b.norm() for b in bufs])
        mean, std = norms.mean(), ((norms - norms.mean()) ** 2).mean().sqrt()
        outliers = [d for d in range(num_domains) if (norms[d] - mean).abs() > std]
        inliers = torch.stack([bufs[d] for d in range(num_domains) if d not in outliers]).mean(0)
        for d in outliers:
            bufs[d] = alpha * bufs[d] + (1 - alpha) * inliers
        out.append(torch.stack(bufs).sum(0))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_domains", [3, 4])
def test_official_options_reproduce_the_authors_loop(seed, num_domains):
    # Every chunk holds at least D elements: in shorter ones the authors' code projects
    # on references that earlier projections reduced to rounding noise, which domaingrad
    # treats as zero vectors (documented), so the two legitimately differ there.
    grads = random_grads(seed, num_domains, [(20, 3, 2, 2), (40,), (7, 5), (10, 4)])
    res = corgrad(grads, **surgery.OFFICIAL_CORGRAD_OPTIONS)
    for out, exp in zip(res.grads, official_corgrad_loop(grads)):
        assert close(out, exp, 1e-9, atol=1e-12)
