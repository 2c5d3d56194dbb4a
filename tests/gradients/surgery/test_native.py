"""Building and loading the native kernels (``domaingrad.gradients.surgery._native``):
the cache, a machine without a compiler, turning them off, and the rules' results
being the same either way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from domaingrad.gradients.surgery import _native, agr_rand, agr_sum

from .references import sparse_signs

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler on PATH: the torch fallback is tested"
)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A fresh load of the library, built into a cache folder of this test."""
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("DOMAINGRAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [sparse_signs(gen, (3, 50, 20)).float(), sparse_signs(gen, (3, 7)).float()]


@needs_compiler
def test_the_library_is_built_once_into_the_cache(fresh_native):
    assert _native.library() is not None
    (built,) = fresh_native.glob("surgery-*.so")
    stamp = built.stat().st_mtime_ns
    _native._state.clear()
    assert _native.library() is not None
    assert list(fresh_native.glob("*")) == [built] and built.stat().st_mtime_ns == stamp  # reused, no temporaries


@needs_compiler
def test_a_damaged_cached_library_is_built_again(fresh_native):
    assert _native.library() is not None
    (built,) = fresh_native.glob("surgery-*.so")
    damaged = built.with_suffix(".damaged")  # a new file: the loaded one stays mapped intact
    damaged.write_bytes(b"not a shared library")
    os.replace(damaged, built)
    # a fresh process (this one has the library loaded: dlopen would return it again)
    code = "from domaingrad.gradients.surgery import _native; assert _native.library() is not None"
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, env={**os.environ})
    assert built.read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_without_a_compiler_the_rules_use_torch_with_one_warning(fresh_native, monkeypatch):
    want_sum = agr_sum(grads())
    want_rand = agr_rand(grads(), generator=torch.Generator().manual_seed(1))
    _native._state.clear()
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C compiler: 'no-such-compiler-here' is not on PATH"):
        assert _native.library() is None
    assert not _native.usable(torch.zeros(3))
    got_sum = agr_sum(grads())  # no second warning: the reason is remembered
    got_rand = agr_rand(grads(), generator=torch.Generator().manual_seed(1))
    assert "no C compiler" in _native._state["reason"]
    assert all(torch.equal(a, b) for a, b in zip(got_sum.grads, want_sum.grads)) and got_sum.stats == want_sum.stats
    assert got_rand.stats["agree_frac"] == want_rand.stats["agree_frac"]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got_rand.grads, want_rand.grads))


def test_a_failing_build_falls_back_and_leaves_nothing(fresh_native, monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: this compiler fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="this compiler fails"):
        assert _native.library() is None
    assert not list(fresh_native.glob("*"))


def test_domaingrad_native_0_turns_the_kernels_off(fresh_native, monkeypatch, recwarn):
    monkeypatch.setenv("DOMAINGRAD_NATIVE", "0")
    assert _native.library() is None
    assert _native._state["reason"] == "turned off by DOMAINGRAD_NATIVE=0"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert agr_sum(grads()).stats["agree_frac"] > 0


@needs_compiler
def test_which_tensors_the_kernels_take():
    assert _native.usable(torch.zeros(3)) and _native.usable(torch.zeros(3, dtype=torch.float64))
    assert not _native.usable(torch.zeros(3, dtype=torch.bfloat16))
    assert not _native.usable(torch.zeros(3, dtype=torch.float16))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_domains", [1, 2, 3, 5, 7, 8, 9, 12])
def test_native_gram_is_the_float64_gram(dtype, num_domains):
    # the register-blocked kernels (D <= 8) and the pair loop (D > 8), lengths with and
    # without a tail after the last multiple of 8 and of the 2,048-element block, a run
    # that starts inside the rows, several pieces of one Gram array
    from domaingrad.gradients.surgery._gram import _native_grams

    x = torch.randn(num_domains, 6001, generator=torch.Generator().manual_seed(num_domains), dtype=dtype)
    runs = [(x, 0, 1, 0), (x, 3, 7, 1), (x, 10, 2049, 2), (x, 0, 6001, 3), (x, 2100, 8, 1)]
    gram = torch.zeros(4, num_domains, num_domains, dtype=torch.float64)
    _native_grams(runs, gram)
    x64 = x.double()
    want = torch.zeros_like(gram)
    for _, start, length, p in runs:
        part = x64[:, start : start + length]
        want[p] += part @ part.T
    scale = x64.norm(dim=1)
    assert torch.allclose(gram, want, rtol=0, atol=1e-13 * float(scale.max() ** 2))
    assert torch.equal(gram, gram.transpose(1, 2))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_domains", [1, 3, 8, 11])
def test_native_combination_is_the_float64_sum_rounded_once(monkeypatch, restore_threads, dtype, num_domains):
    # pieces of 5,000 columns (cut into ranges of 4,096 and a tail not a multiple of 8):
    # out = sum_d c[p, d] x[d], c the coefficients rounded to the dtype (as the torch path
    # rounds them), every product and sum in float64, in domain order, rounded once
    from domaingrad.gradients.surgery._gram import _combine_run

    monkeypatch.setattr(_native, "RANGE", 4096)
    gen = torch.Generator().manual_seed(num_domains)
    x = torch.randn(num_domains, 3 * 5000 + 4, generator=gen, dtype=dtype)[:, 4:].view(num_domains, 3, 5000)
    coef = torch.randn(3, num_domains, generator=gen, dtype=torch.float64)
    c = coef.to(dtype).double()
    want = x[0].double() * c[:, :1]
    for d in range(1, num_domains):
        want = want + x[d].double() * c[:, d : d + 1]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = torch.empty(3, 5000, dtype=dtype)
        _combine_run(x, coef, out)
        assert torch.equal(out, want.to(dtype))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcgrad_and_corgrad_native_gram_against_torch_and_threads(monkeypatch, restore_threads, dtype):
    # ranges of 4,096 columns: the 50 x 200 tensor is cut into three; one and two threads
    # give the same bits, and the torch Gram products the same decisions and results
    from domaingrad.gradients.surgery import corgrad, pcgrad

    monkeypatch.setattr(_native, "RANGE", 4096)

    def seeded():
        return torch.Generator().manual_seed(5)

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 50, 200, generator=gen, dtype=dtype), torch.randn(4, 9000, generator=gen, dtype=dtype)]
    grads[1][:2] *= -1  # some conflicts
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(
            [pcgrad(grads, order=[2, 0, 3, 1]), corgrad(grads, slices=2, smoothing=None, generator=seeded())]
        )
    monkeypatch.setattr(_native, "usable", lambda t: False)
    results.append([pcgrad(grads, order=[2, 0, 3, 1]), corgrad(grads, slices=2, smoothing=None, generator=seeded())])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for one, two, torch_path in zip(*results):
        assert one.stats == two.stats and all(torch.equal(a, b) for a, b in zip(one.grads, two.grads))
        assert one.stats["conflict_pairs"] > 0
        assert torch_path.stats["conflict_pairs"] == one.stats["conflict_pairs"]
        assert all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(one.grads, torch_path.grads))
