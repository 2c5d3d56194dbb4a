"""PCGrad over domains (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS
2020, Alg. 1; Mansilla et al., ICCV 2021, sec. 4), the float64 Gram engine and its tie
band, and the PCGrad object.

Expected values are computed by hand (derivations in the comments) or by the loop
references of :mod:`tests.gradients.surgery.references`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from domaingrad.gradients.surgery import PCGrad, _gram, corgrad, pcgrad

from .references import F64, FAST, SHAPES, close, naive_pcgrad, orthogonal_pair, random_grads, t64

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


# ------------------------------------------------------------ ties and precision


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
    run = _gram._gram_run(x.unsqueeze(1))[0]
    assert run.dtype == F64
    assert torch.all((run - exact).abs() <= bound)
    packed = torch.zeros(1, 3, 3, dtype=F64)
    _gram._segment_gram(x, torch.zeros(x.shape[1], dtype=torch.int64), packed)
    assert torch.all((packed[0] - exact).abs() <= bound)
    pieces = _gram._gram_run(x.reshape(3, 50, 4000))  # many pieces: batched path
    exact_p = torch.einsum("dpk,epk->pde", x.double().reshape(3, 50, 4000), x.double().reshape(3, 50, 4000))
    assert torch.allclose(pieces, exact_p, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("gram_chunk", [7, 50, 120, 1000])
def test_gram_blocks_of_any_length_give_the_same_gram_matrices(monkeypatch, gram_chunk):
    # 6 pieces of 50 elements: gram_chunk 7 -> each piece in 8 column blocks (ragged last);
    # 50 -> piece by piece; 120 -> two pieces per batched block; 1000 -> one batched block
    monkeypatch.setattr(_gram, "_GRAM_CHUNK", gram_chunk)
    x = torch.randn(3, 6, 50, generator=torch.Generator().manual_seed(1))
    exact = torch.einsum("dpk,epk->pde", x.double(), x.double())
    assert torch.allclose(_gram._gram_run(x), exact, rtol=1e-12, atol=1e-12)
    assert torch.allclose(_gram._gram_run(x[:, :1]), exact[:1], rtol=1e-12, atol=1e-12)  # one piece


def set_splits(monkeypatch, gram_split: int, combine_split: int, gram_chunk: int | None = None) -> None:
    """Columns per part of the batched Gram products and of the batched combination of a
    long run (small: many batch items, which torch spreads over the threads)."""
    monkeypatch.setattr(_gram, "_GRAM_SPLIT", gram_split)
    monkeypatch.setattr(_gram, "_COMBINE_SPLIT", combine_split)
    if gram_chunk is not None:
        monkeypatch.setattr(_gram, "_GRAM_CHUNK", gram_chunk)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 99, 100, 257, 1000])
def test_long_runs_in_batched_parts_give_the_float64_gram_and_the_combination(monkeypatch, n):
    # blocks of 100 columns cut in parts of 16 (ragged last part, blocks shorter than a
    # part, a ragged last block) and the combination in parts of 32: the Gram matrix is
    # the float64 one, the combination the float64 one to float32 rounding
    set_splits(monkeypatch, 16, 32, gram_chunk=100)
    x = torch.randn(4, 1, n, generator=torch.Generator().manual_seed(n))
    exact = x[:, 0].double() @ x[:, 0].double().T
    assert torch.allclose(_gram._gram_run(x)[0], exact, rtol=1e-13, atol=1e-13)
    coef = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = torch.full((1, n), float("nan"))
    _gram._combine_run(x, coef, out)
    assert torch.allclose(out.double(), coef @ x[:, 0].double(), rtol=1e-5, atol=1e-5)


def test_conflict_decisions_do_not_depend_on_the_thread_count(monkeypatch):
    # many batch items (parts of 64 and 128 columns), so that two threads share the Gram
    # and combination passes; a pair made orthogonal by construction sits on the tie band.
    # The decisions (conflicts, statistics) are identical, the update equal to rounding.
    set_splits(monkeypatch, 64, 128, gram_chunk=512)
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(5, 3000, generator=gen)
    big[1] = -big[0] + 0.1 * torch.randn(3000, generator=gen)  # a strong conflict
    big[2], big[3] = orthogonal_pair(7, 3000)  # <g_2, g_3> = 0 up to rounding: a tie
    grads = [big.reshape(5, 30, 100), torch.randn(5, 7, generator=gen)]
    rules = {
        "pcgrad": lambda g: pcgrad(g, order=[4, 0, 2, 1, 3]),
        "pcgrad projected": lambda g: pcgrad(g, order=[2, 3, 0, 1, 4], reference="projected"),
        "corgrad slices=1": lambda g: corgrad(g, slices=1, smoothing=None, order=[0, 1, 2, 3, 4]),
    }
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = {name: rule(grads) for name, rule in rules.items()}
    finally:
        torch.set_num_threads(before)
    for name in rules:
        one, two = runs[1][name], runs[2][name]
        assert one.stats == two.stats, name
        assert one.stats["conflict_pairs"] > 0, name
        for a, b in zip(one.grads, two.grads):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name


# ------------------------------------------------------------------- PCGrad object


def test_pcgrad_object_is_the_function_with_the_same_options():
    grads = random_grads(3, 4, [(6,), (2, 3)])
    for kwargs in ({}, {"order": [2, 0, 3, 1]}, {"reference": "projected", "eps": 0.0, "reduction": "mean"}):
        res = PCGrad(generator=torch.Generator().manual_seed(5), **kwargs)(grads)
        exp = pcgrad(grads, generator=torch.Generator().manual_seed(5), **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(res.grads, exp.grads)), kwargs
        assert res.stats == exp.stats, kwargs


def test_pcgrad_object_draws_a_fresh_order_per_call_from_its_generator():
    # the hand case whose result depends on the order: consecutive calls follow the
    # generator's stream, as consecutive function calls sharing one generator
    g = [t64([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -1.0, 1.0]])]
    rule = PCGrad(generator=torch.Generator().manual_seed(0))
    shared = torch.Generator().manual_seed(0)
    outs = set()
    for _ in range(8):
        out = rule(g).grads[0]
        assert torch.equal(out, pcgrad(g, generator=shared).grads[0])
        outs.add(tuple(out.tolist()))
    assert len(outs) > 1
    fixed = PCGrad(order=[2, 1, 0], eps=0.0)
    assert close(fixed(g).grads[0], t64([1 / 3, 5 / 6, 1.5])) and close(fixed(g).grads[0], t64([1 / 3, 5 / 6, 1.5]))


def test_pcgrad_object_repr_and_errors():
    assert repr(PCGrad()) == "PCGrad(order='random', generator=None, reference='original', eps=1e-12, reduction='sum')"
    assert repr(PCGrad(order=(1, 0), generator=torch.Generator(), eps=0)) == (
        "PCGrad(order=[1, 0], generator=torch.Generator(device='cpu'), reference='original', eps=0.0, reduction='sum')"
    )
    for kwargs, match in [
        ({"order": "index"}, "order must be 'random' or a permutation"),
        ({"order": [0, 0]}, "permutation"),
        ({"order": 3}, "permutation"),
        ({"generator": 1}, "torch.Generator or None"),
        ({"reference": "aliased"}, "reference"),
        ({"eps": -1.0}, "eps"),
        ({"reduction": "avg"}, "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            PCGrad(**kwargs)
    with pytest.raises(ValueError, match=r"permutation of range\(3\)"):
        PCGrad(order=[1, 0])([torch.ones(3, 2)])  # the length is checked against D at the call
