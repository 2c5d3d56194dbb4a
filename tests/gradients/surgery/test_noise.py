"""domaingrad's counter noise stream (``domaingrad.gradients.surgery._noise``): its table,
its values against a scalar reference written from the docstring, the native kernel
against the torch implementation, and its distribution."""

from __future__ import annotations

import math

import pytest
import torch

from domaingrad.gradients.surgery import _native
from domaingrad.gradients.surgery._noise import (
    ZIGGURAT_F,
    ZIGGURAT_RATIO,
    ZIGGURAT_T,
    ZIGGURAT_W,
    ZIGGURAT_X,
    counter_normals,
    draw_keys,
)

from .references import F64, counter_normal_reference

KEY0, KEY1 = 0x0123456789ABCDEF, 0x2545F4914F6CDD1D


def native_normals(start: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    if _native.library() is None:
        pytest.skip(f"the native kernels are not available here: {_native._state.get('reason')}")
    out = torch.empty(n, dtype=dtype)
    _native.kernel("dg_normals", dtype)(out.data_ptr(), n, KEY0, KEY1, start)
    return out


def test_the_table_is_a_ziggurat_of_equal_layers():
    # f(x) = exp(-x^2 / 2); every layer k >= 1 is a box of width x[k] between f(x[k]) and
    # f(x[k + 1]) of area v, the base is r f(r) plus the tail beyond r, and the top layer
    # closes at f(0) = 1
    x, f = ZIGGURAT_X, ZIGGURAT_F
    assert len(x) == len(f) == 513 and x[512] == 0.0 and f[512] == 1.0 and all(a > b for a, b in zip(x, x[1:]))
    assert max(abs(fk - math.exp(-0.5 * t * t)) / fk for fk, t in zip(f, x)) < 1e-14
    r = x[1]
    v = r * f[1] + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    assert x[0] * f[1] == pytest.approx(v, rel=1e-14)
    areas = [x[k] * (f[k + 1] - f[k]) for k in range(1, 512)]
    assert max(abs(a - v) / v for a in areas) < 1e-9
    assert ZIGGURAT_RATIO == tuple(x[k + 1] / x[k] for k in range(512))
    # the float32 widths and the integer thresholds of the tries, from x
    w32 = torch.tensor(x[:512], dtype=F64).mul(2.0**-22).float()
    assert torch.equal(torch.tensor(ZIGGURAT_W, dtype=torch.float32), w32)
    assert ZIGGURAT_T[511] == 0 and all(0 < t <= 2**22 for t in ZIGGURAT_T[:511])
    assert all(t - 1 < q * 2**22 <= t for t, q in zip(ZIGGURAT_T, ZIGGURAT_RATIO))


def test_values_follow_the_documented_definition():
    # 100,000 values from an index near 2**40 (the index arithmetic wraps), among them
    # values that end in a later try's rectangle, in a wedge and in the tail: the scalar
    # reference, the torch implementation and the native kernel give the same values
    n, start = 100_000, (1 << 40) - 7
    want = [counter_normal_reference(KEY0, KEY1, start + i, ZIGGURAT_X, ZIGGURAT_F) for i in range(n)]
    torch_values = counter_normals(KEY0, KEY1, start, n, dtype=F64).tolist()
    native_values = native_normals(start, n, F64).tolist()
    hows = [how for _, how in want]
    assert min(hows.count(how) for how in ("rect", "wedge", "tail")) >= 3
    for (value, how), a, b in zip(want, torch_values, native_values):
        if how != "tail":  # integer tests and float32 products: the same bits everywhere
            assert a == value and b == value
        else:  # through log: the C library and torch may differ by a float32 rounding
            assert a == pytest.approx(value, rel=2**-23) and b == pytest.approx(value, rel=2**-23)
    assert all(v == torch.tensor(v, dtype=torch.float32).item() for v, _ in want)  # float32 numbers
    # a first try fails with probability 1 - mean(x[k + 1] / x[k]) = 0.80%
    expected = 1 - sum(ZIGGURAT_RATIO) / 512
    assert sum(how != "first" for how in hows) / n == pytest.approx(expected, abs=4 * math.sqrt(expected / n))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_and_torch_values_agree_on_a_long_range(dtype):
    start, n = 123_456, 300_000
    a = counter_normals(KEY0, KEY1, start, n, dtype=dtype)
    b = native_normals(start, n, dtype)
    assert torch.allclose(a, b, rtol=2**-23, atol=0)  # float32 numbers for both dtypes
    assert (a != b).sum().item() <= n // 1000  # at most the rare exp/log values differ at all
    # a value depends on its index only: any sub-range gives the same values
    assert torch.equal(counter_normals(KEY0, KEY1, start + 1000, 5000, dtype=dtype), a[1000:6000])


def test_the_stream_is_standard_normal():
    # fixed keys: deterministic, the tests cannot flake; 2 M values, with the tail beyond
    # r = 3.85 (about 234 values expected) checked on its own
    from scipy import stats

    n = 2_000_000
    z = native_normals(0, n, F64).numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01
    r = ZIGGURAT_X[1]
    tail = abs(z) > r
    assert stats.binomtest(int(tail.sum()), n, 2 * stats.norm.sf(r)).pvalue > 0.01
    excess = abs(z[tail]) - r

    def tail_cdf(t):
        return 1 - stats.norm.sf(r + t) / stats.norm.sf(r)

    assert stats.kstest(excess, tail_cdf).pvalue > 0.01
    # the two halves of the stream are uncorrelated, and so are neighbours
    assert abs(float(torch.corrcoef(torch.from_numpy(z).view(2, -1))[0, 1])) < 4 / math.sqrt(n / 2)
    assert abs(float(torch.corrcoef(torch.from_numpy(z).view(-1, 2).T)[0, 1])) < 4 / math.sqrt(n / 2)


def test_keys_come_from_the_generator():
    a = draw_keys(torch.Generator().manual_seed(3))
    b = draw_keys(torch.Generator().manual_seed(3))
    c = draw_keys(torch.Generator().manual_seed(4))
    assert a == b and a != c and all(0 <= k < 2**62 for k in a + c)
    with pytest.raises(ValueError, match="start and n must be >= 0"):
        counter_normals(1, 2, -1, 3, dtype=F64)
