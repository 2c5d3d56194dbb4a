"""CorGrad (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
Perspective of Gradient Granularity", ECAI 2024) and the CorGrad object.

Expected values are computed by hand (derivations in the comments), by the loop
references of :mod:`tests.gradients.surgery.references`, or by a re-expression of the
authors' code (libzwo/CorGrad).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domaingrad.gradients import surgery
from domaingrad.gradients.surgery import CorGrad, corgrad, pcgrad

from .references import (
    FAST,
    SHAPES,
    close,
    drawn_orders,
    naive_corgrad,
    naive_pieces,
    official_corgrad_loop,
    random_grads,
    t64,
)

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
        res = corgrad(
            hand, slices=1, smoothing=None, reference="projected", generator=torch.Generator().manual_seed(seed)
        )
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
def test_corgrad_simultaneous_is_invariant_to_domain_order(seed, num_domains, shapes, layerwise, slices, smoothing):
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
    mode=st.sampled_from([("simultaneous", "original"), ("sequential", "original"), ("sequential", "projected")]),
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


# ---------------------------------------------------------------------- the object


def same_result(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.grads, b.grads)) and a.stats == b.stats


def test_corgrad_object_counts_steps_for_the_alpha_decay():
    # call k is corgrad(step=k): alpha_t = 0.8 (1 - log(k + 1) / log(10)), smoothing fires
    # on the dominant third domain (norms 1, 1, 4), so the result changes with the step
    g = [t64([[1.0, 0.0], [0.0, 1.0], [4.0, 0.0]])]
    rule = CorGrad(slices=1, alpha=0.8, total_steps=10, generator=torch.Generator().manual_seed(0))
    shared = torch.Generator().manual_seed(0)
    outs = []
    for k in range(4):
        assert rule.step == k
        res = rule(g)
        exp = corgrad(g, slices=1, alpha=0.8, step=k, total_steps=10, generator=shared)
        assert same_result(res, exp)
        assert res.stats["alpha"] == pytest.approx(0.8 * (1 - math.log(k + 1) / math.log(10)))
        outs.append(tuple(res.grads[0].tolist()))
    assert len(set(outs)) == 4 and rule.step == 4
    rule.reset()
    assert rule.step == 0 and rule(g).stats["alpha"] == 0.8
    rule.step = 9  # resume at the last step: alpha 0
    assert rule(g).stats["alpha"] == 0.0 and rule.step == 10


def test_corgrad_object_needs_the_run_length_to_decay_past_the_first_call():
    g = [t64([[1.0, 0.0], [0.0, 1.0], [4.0, 0.0]])]
    rule = CorGrad()
    assert rule(g).stats["alpha"] == 0.75 and rule.step == 1
    with pytest.raises(ValueError, match="total_steps=T"):
        rule(g)
    assert rule.step == 1  # a call that raises does not advance
    constant = CorGrad(alpha=0.6, alpha_schedule="constant")
    assert [constant(g).stats["alpha"] for _ in range(3)] == [0.6, 0.6, 0.6]
    with pytest.raises(ValueError, match="total_steps >= 2"):
        CorGrad(total_steps=1)


def test_corgrad_object_is_the_function_with_the_same_options():
    grads = random_grads(8, 4, [(20, 3), (40,), (7,)])
    cases = [
        ({}, {}),
        ({"order": "index"}, {"order": "index"}),
        ({"order": [3, 1, 0, 2], "slices": 3, "min_slice": 2}, {"order": [3, 1, 0, 2], "slices": 3, "min_slice": 2}),
        (dict(surgery.OFFICIAL_CORGRAD_OPTIONS), dict(surgery.OFFICIAL_CORGRAD_OPTIONS)),
        (
            {"layerwise": False, "projection": "simultaneous", "smoothing": None, "reduction": "mean"},
            {"layerwise": False, "projection": "simultaneous", "smoothing": None, "reduction": "mean"},
        ),
    ]
    for obj_kwargs, fn_kwargs in cases:
        res = CorGrad(generator=torch.Generator().manual_seed(2), **obj_kwargs)(grads)
        exp = corgrad(grads, generator=torch.Generator().manual_seed(2), **fn_kwargs)
        assert same_result(res, exp), obj_kwargs


def test_corgrad_object_repr_and_errors():
    assert repr(CorGrad(**surgery.OFFICIAL_CORGRAD_OPTIONS)) == (
        "CorGrad(generator=None, order='index', layerwise=True, slices=10, min_slice=1, slicing='dim0', "
        "projection='sequential', reference='projected', smoothing='two_sided', alpha=0.6, "
        "alpha_schedule='constant', total_steps=None, eps=0.0, reduction='sum')"
    )
    for kwargs, match in [
        ({"order": None}, "order must be 'random', 'index' or a permutation"),
        ({"order": [1, 1]}, "permutation"),
        ({"slices": 0}, "slices"),
        ({"smoothing": "both"}, "smoothing must be one of"),
        ({"alpha": 1.5}, "alpha"),
        ({"total_steps": 0}, "total_steps"),
        ({"generator": 0}, "torch.Generator"),
        ({"reduction": "avg"}, "reduction"),
        ({"eps": -1.0}, "eps"),
        ({"layerwise": "yes"}, "layerwise"),
    ]:
        with pytest.raises(ValueError, match=match):
            CorGrad(**kwargs)
    with pytest.raises(TypeError):
        CorGrad(step=3)  # the step is the object's own counter, not an option
