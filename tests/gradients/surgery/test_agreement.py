"""Sign agreement, Agr-Sum and Agr-Rand (Mansilla, Echeveste, Milone, Ferrante, "Domain
Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(4)) and their objects.

Expected values are computed by hand (derivations in the comments) or by the loop
references of :mod:`tests.gradients.surgery.references`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from domaingrad.gradients.surgery import AgrRand, AgrSum, _agr_rand, _native, agr_rand, agr_sum, agreement_mask
from domaingrad.gradients.surgery._noise import ZIGGURAT_F, ZIGGURAT_X, counter_normals, draw_keys

from .references import F64, FAST, SHAPES, close, counter_normal_reference, naive_agree, sparse_signs, t64

STREAMS = ["counter", "parallel", "sequential"]

# ------------------------------------------------------------------ agreement, Agr-Sum


def test_agreement_hand_two_domains():
    # components: (+,+) agree; (-,+) no; (0,0) paper yes / official no; (+,-) no; (0,+) no
    g = t64([[1.0, -1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 0.0, -1.0, 5.0]])
    assert agreement_mask([g])[0].tolist() == [True, False, True, False, False]
    assert agreement_mask([g], rule="official")[0].tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("native", [True, False])
def test_nan_never_agrees(monkeypatch, native):
    # torch's sign(NaN) is 0, so a NaN minimum and maximum would look like an all-zero
    # component (which agrees under the paper rule): it must not
    if not native:
        monkeypatch.setattr(_native, "usable", lambda t: False)
    nan = float("nan")
    g = t64([[nan, 1.0, 0.0, nan], [1.0, 1.0, 0.0, nan]])
    for rule in ("paper", "official"):
        assert agreement_mask([g], rule=rule)[0].tolist() == [False, True, rule == "paper", False]
        res = agr_sum([g], rule=rule)
        assert res.stats["agree_frac"] == (0.5 if rule == "paper" else 0.25)
        assert math.isnan(res.grads[0][0].item()) and res.grads[0][1].item() == 2.0


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


def parallel_noise(seed: int, sizes: list[int], dtype=F64, chunk: int = 1 << 18) -> list[torch.Tensor]:
    """The standard-normal values of agr_rand's parallel stream, as its docstring states:
    chunks of ``chunk`` components over all tensors in input order, chunk ``c`` drawn by
    lane ``c mod 8``, the lanes seeded by ``torch.randint(0, 2**63 - 1, (8,))`` from the
    call's generator, each lane drawing its pieces in order."""
    seeds = torch.randint(0, 2**63 - 1, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    lanes = [torch.Generator().manual_seed(s) for s in seeds]
    noise = [torch.empty(n, dtype=dtype) for n in sizes]
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(8)]
    start = 0
    for t, n in enumerate(sizes):
        a = 0
        while a < n:  # tensor t's part [a, e) of chunk c
            c = (start + a) // chunk
            e = min(n, (c + 1) * chunk - start)
            pieces[c % 8].append((t, a, e))
            a = e
        start += n
    for lane, todo in zip(lanes, pieces):
        for t, a, e in todo:
            noise[t][a:e] = torch.randn(e - a, generator=lane, dtype=dtype)
    return noise


def counter_noise(seed: int, sizes: list[int], dtype=F64) -> list[torch.Tensor]:
    """The standard-normal values of agr_rand's counter stream, as its docstring states:
    keys from ``torch.randint(0, 2**62, (2,))`` of the call's generator, component ``i``
    of the network (all tensors in input order) gets value ``i``."""
    key0, key1 = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise, start = [], 0
    for n in sizes:
        noise.append(counter_normals(key0, key1, start, n, dtype=dtype))
        start += n
    return noise


def test_agr_rand_hand_case_uses_the_documented_noise():
    # comp0: (1, 3) agree, sum 4; comps 1, 2 disagree. sigma = mean |g*| over A = 4.
    g = t64([[1.0, 2.0, -1.0], [3.0, -1.0, 1.0]])
    res = agr_rand([g], generator=torch.Generator().manual_seed(7))
    key0, key1 = draw_keys(torch.Generator().manual_seed(7))
    z = [counter_normal_reference(key0, key1, i, ZIGGURAT_X, ZIGGURAT_F)[0] for i in range(3)]
    assert res.stats["sigma"] == pytest.approx(4.0)
    assert res.stats["agree_frac"] == pytest.approx(1 / 3)
    assert res.grads[0][0].item() == 4.0
    assert close(res.grads[0][1:], 4.0 * t64(z[1:]))
    # mean reduction: everything (noise included) divided by D = 2, sigma reported 2
    mean = agr_rand([g], generator=torch.Generator().manual_seed(7), reduction="mean")
    assert mean.stats["sigma"] == pytest.approx(2.0)
    assert close(mean.grads[0], res.grads[0] / 2)
    # the previous default, the parallel stream
    par = agr_rand([g], generator=torch.Generator().manual_seed(7), noise="parallel")
    (zp,) = parallel_noise(7, [3])
    assert par.grads[0][0].item() == 4.0 and close(par.grads[0][1:], 4.0 * zp[1:])


def test_agr_rand_sequential_stream_is_the_earlier_one():
    # the stream of domaingrad 0.1.0: torch.randn(param.shape) per tensor with noise
    g = t64([[1.0, 2.0, -1.0], [3.0, -1.0, 1.0]])
    res = agr_rand([g], generator=torch.Generator().manual_seed(7), noise="sequential")
    z = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert res.grads[0][0].item() == 4.0
    assert close(res.grads[0][1:], 4.0 * z[1:])
    # a tensor without disagreement draws nothing: B's noise is the first draw
    a = t64([[1.0, 3.0], [1.0, 3.0]])
    b = t64([[-1.0, 1.0], [-3.0, -1.0]])
    res = agr_rand([a, b], generator=torch.Generator().manual_seed(3), noise="sequential")
    z = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert res.grads[1][1].item() == pytest.approx(4.0 * z[1].item())


def test_agr_rand_sigma_is_network_wide():
    # tensor A agrees everywhere: sums (2, 6) -> |g*| 2, 6; tensor B: comp0 sum -4
    # agrees, comp1 disagrees. sigma = (2 + 6 + 4) / 3 = 4. Only B gets noise.
    a = t64([[1.0, 3.0], [1.0, 3.0]])
    b = t64([[-1.0, 1.0], [-3.0, -1.0]])
    res = agr_rand([a, b], generator=torch.Generator().manual_seed(3))
    assert res.stats["sigma"] == pytest.approx(4.0)
    assert res.grads[0].tolist() == [2.0, 6.0]
    _, z = counter_noise(3, [2, 2])  # B's component 1 is the network's component 3
    assert res.grads[1][0].item() == -4.0
    assert res.grads[1][1].item() == pytest.approx(4.0 * z[1].item())


def set_noise_chunk(monkeypatch, chunk: int) -> None:
    """Chunks of ``chunk`` components in the parallel stream (small: many lanes at work)."""
    monkeypatch.setattr(_agr_rand, "_NOISE_CHUNK", chunk)


# sizes 23 + 24 + 1 + 0 + 12 + 40 = 100 components: in chunks of 5, 20 chunks over all 8
# lanes, several chunks spanning two or three tensors
CHUNKED_SHAPES = [(23,), (4, 6), (1,), (0,), (2, 2, 3), (40,)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_agr_rand_parallel_stream_across_chunks_lanes_and_threads(monkeypatch, restore_threads, dtype):
    set_noise_chunk(monkeypatch, 5)
    grads = [sparse_signs(torch.Generator().manual_seed(t), (3, *s)).to(dtype) for t, s in enumerate(CHUNKED_SHAPES)]
    consensus = agr_sum(grads)
    sizes = [g[0].numel() for g in grads]
    noise = parallel_noise(11, sizes, dtype=dtype, chunk=5)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(agr_rand(grads, generator=torch.Generator().manual_seed(11), noise="parallel"))
    one, two = results
    sigma = one.stats["sigma"]
    assert sigma > 0 and one.stats == two.stats
    for g, out, out2, cons, z in zip(grads, one.grads, two.grads, consensus.grads, noise):
        assert torch.equal(out, out2)  # the same bits with one thread or two
        agree = naive_agree(g, "paper")
        assert torch.equal(out[agree], cons[agree])  # the agreeing components are Agr-Sum's
        assert torch.allclose(out.flatten()[~agree.flatten()], sigma * z[~agree.flatten()], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_agr_rand_counter_stream_across_ranges_threads_and_implementations(monkeypatch, restore_threads, dtype):
    # ranges of 5 components for the native kernel: 20 ranges, cut inside tensors; one
    # and two threads, and the torch implementation, give the documented values
    monkeypatch.setattr(_native, "RANGE", 5)
    grads = [sparse_signs(torch.Generator().manual_seed(t), (3, *s)).to(dtype) for t, s in enumerate(CHUNKED_SHAPES)]
    consensus = agr_sum(grads)
    noise = counter_noise(11, [g[0].numel() for g in grads], dtype=dtype)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(agr_rand(grads, generator=torch.Generator().manual_seed(11)))
    monkeypatch.setattr(_native, "usable", lambda t: False)
    results.append(agr_rand(grads, generator=torch.Generator().manual_seed(11)))
    one, two, torch_path = results
    sigma = one.stats["sigma"]
    assert sigma > 0 and one.stats == two.stats
    assert torch_path.stats["agree_frac"] == one.stats["agree_frac"]
    assert torch_path.stats["sigma"] == pytest.approx(sigma, rel=1e-6 if dtype == torch.float32 else 1e-12)
    for g, out, out2, out3, cons, z in zip(grads, one.grads, two.grads, torch_path.grads, consensus.grads, noise):
        assert torch.equal(out, out2)  # the same bits with one thread or two
        agree = naive_agree(g, "paper")
        assert torch.equal(out[agree], cons[agree]) and torch.equal(out3[agree], cons[agree])
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(out.flatten()[~agree.flatten()], sigma * z[~agree.flatten()], rtol=tol, atol=0)
        assert torch.allclose(out3, out, rtol=tol, atol=0)


def test_agr_rand_counter_stream_on_long_ranges(monkeypatch):
    # an odd-sized tensor first (the second starts at an odd index), then one range of
    # 2**18 components, about 196,000 disagreeing: some 1,600 of their values need
    # further tries, more than the native kernel lists at once (it does them in batches)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(3, 7, generator=gen), torch.randn(3, 300_000, generator=gen)]
    consensus = agr_sum(grads)
    native = agr_rand(grads, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(_native, "usable", lambda t: False)
    torch_path = agr_rand(grads, generator=torch.Generator().manual_seed(2))
    sigma = native.stats["sigma"]
    assert torch_path.stats["agree_frac"] == native.stats["agree_frac"]
    for g, out, out_torch, cons, z in zip(
        grads, native.grads, torch_path.grads, consensus.grads, counter_noise(2, [7, 300_000])
    ):
        agree = naive_agree(g, "paper")
        assert torch.equal(out[agree], cons[agree])
        assert torch.allclose(out[~agree].double(), sigma * z[~agree], rtol=1e-6, atol=0)
        assert torch.allclose(out_torch, out, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("single_thread")  # the values do not depend on it (tested above)
@pytest.mark.parametrize("noise", STREAMS)
def test_agr_rand_noise_is_normal_with_sd_sigma(monkeypatch, noise):
    # 400,000 components, the first 1,000 agree with sum 2 -> sigma = 2 exactly; the other
    # 399,000 are sigma * N(0, 1). Chunks of 2^14: 25 chunks, every lane draws 3 or 4.
    from scipy import stats

    set_noise_chunk(monkeypatch, 1 << 14)
    n, n_agree = 400_000, 1_000
    d0 = torch.ones(n, dtype=torch.float32)
    d1 = -torch.ones(n, dtype=torch.float32)
    d1[:n_agree] = 1.0
    res = agr_rand([torch.stack([d0, d1])], generator=torch.Generator().manual_seed(5), noise=noise)
    out = res.grads[0]
    assert res.stats["sigma"] == 2.0
    assert torch.all(out[:n_agree] == 2.0)
    z = (out[n_agree:] / 2.0).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01  # fixed seed: deterministic, cannot flake
    assert abs(z.mean()) < 5 / n**0.5 and abs(z.std() - 1) < 0.01


@pytest.mark.parametrize("noise", STREAMS)
@pytest.mark.parametrize("rule", ["paper", "official"])
def test_agr_rand_noise_only_where_the_domains_disagree(noise, rule):
    # many zeros and ties; a NaN-free input: agreeing components are exactly Agr-Sum's, every
    # disagreeing one carries noise (nonzero), and only those change with the seed
    gen = torch.Generator().manual_seed(4)
    grads = [sparse_signs(gen, (3, *s)) for s in [(300,), (20, 7), (3,)]]
    first = agr_rand(grads, generator=torch.Generator().manual_seed(1), rule=rule, noise=noise)
    again = agr_rand(grads, generator=torch.Generator().manual_seed(1), rule=rule, noise=noise)
    other = agr_rand(grads, generator=torch.Generator().manual_seed(2), rule=rule, noise=noise)
    consensus = agr_sum(grads, rule=rule)
    assert first.stats == again.stats
    for g, a, b, c, s in zip(grads, first.grads, again.grads, other.grads, consensus.grads):
        agree = naive_agree(g, rule)
        assert torch.equal(a, b)  # same seed, same bits
        assert torch.equal(a[agree], s[agree]) and torch.equal(c[agree], s[agree])
        assert torch.all(a[~agree] != 0) and torch.all(a[~agree] != c[~agree])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_agr_rand_streams_agree_on_nan_input(reduction):
    # a NaN sum disagrees and makes sigma NaN: no noise in either stream, the other
    # disagreeing components are 0, the NaN stays NaN, the agreeing sums are kept
    g = t64([[1.0, float("nan"), -1.0, 2.0], [3.0, 1.0, 1.0, 2.0]])
    results = [agr_rand([g], generator=torch.Generator().manual_seed(0), noise=n, reduction=reduction) for n in STREAMS]
    scale = 0.5 if reduction == "mean" else 1.0
    for res in results:
        assert math.isnan(res.stats["sigma"])
        out = res.grads[0]
        assert out[0].item() == 4.0 * scale and out[3].item() == 4.0 * scale
        assert math.isnan(out[1].item()) and out[2].item() == 0.0


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


# ----------------------------------------------------------------------- the objects


def test_agr_sum_object_is_the_function_with_the_same_options():
    grads = [sparse_signs(torch.Generator().manual_seed(2), (3, *s)) for s in [(7,), (2, 3)]]
    for kwargs in ({}, {"rule": "official"}, {"reduction": "mean"}, {"rule": "official", "reduction": "mean"}):
        res, exp = AgrSum(**kwargs)(grads), agr_sum(grads, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(res.grads, exp.grads)) and res.stats == exp.stats, kwargs
    # the hand case: official rule, an all-zero component disagrees
    g = t64([[1.0, -1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 0.0, -1.0, 5.0]])
    assert AgrSum(rule="official")([g]).stats["agree_frac"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("noise", STREAMS)
def test_agr_rand_object_is_the_function_with_the_same_options(noise):
    grads = [sparse_signs(torch.Generator().manual_seed(2), (3, *s)) for s in [(7,), (2, 3)]]
    for kwargs in ({}, {"rule": "official"}, {"reduction": "mean"}):
        res = AgrRand(generator=torch.Generator().manual_seed(4), noise=noise, **kwargs)(grads)
        exp = agr_rand(grads, generator=torch.Generator().manual_seed(4), noise=noise, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(res.grads, exp.grads)) and res.stats == exp.stats, kwargs


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
        "AgrRand(generator=torch.Generator(device='cpu'), rule='official', reduction='sum', noise='counter')"
    )
    with pytest.raises(ValueError, match=r"noise must be one of \['counter', 'parallel', 'sequential'\]"):
        AgrRand(generator=torch.Generator(), noise="exact")
    with pytest.raises(ValueError, match="noise must be one of"):
        agr_rand([torch.ones(2, 3)], generator=torch.Generator(), noise="fast")
    with pytest.raises(ValueError, match="rule must be one of"):
        AgrSum(rule="strict")
    with pytest.raises(ValueError, match="reduction must be one of"):
        AgrSum(reduction="avg")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        AgrRand(generator=0)
    with pytest.raises(TypeError):
        AgrRand()  # the generator is required, as for the function
