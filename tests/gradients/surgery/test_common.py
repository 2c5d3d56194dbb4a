"""Properties shared by every gradient-surgery rule: shapes, dtypes, blocking and
packing, errors; and the configured objects against their functions."""

from __future__ import annotations

import inspect

import pytest
import torch

from domaingrad.gradients import surgery
from domaingrad.gradients.surgery import (
    SurgeryResult,
    _gram,
    _native,
    _plumbing,
    agr_rand,
    agr_sum,
    agreement_mask,
    and_mask,
    corgrad,
    pcgrad,
    sand_mask,
)

from .references import close, random_grads

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


def set_blocking(monkeypatch, chunk: int, small: int, gram_chunk: int) -> None:
    """Patch the block and packing constants in the private modules that read them."""
    monkeypatch.setattr(_plumbing, "_CHUNK", chunk)  # blocks of the elementwise kernels
    monkeypatch.setattr(_plumbing, "_SMALL", small)  # tensors below this size are packed
    monkeypatch.setattr(_gram, "_GRAM_CHUNK", gram_chunk)  # blocks of the Gram products


DEFAULT_BLOCKING = (_plumbing._CHUNK, _plumbing._SMALL, _gram._GRAM_CHUNK)


@pytest.mark.parametrize("num_domains", [3, 5])
@pytest.mark.parametrize(
    "chunk, small, gram_chunk",
    [(5, 0, None), (None, 10**9, None), (5, 10**9, None), (3, 30, 7), (None, 0, 4), (None, None, None)],
)
def test_blocking_and_packing_do_not_change_results(monkeypatch, chunk, small, gram_chunk, num_domains):
    # Baseline: one block per tensor and no packing. Then: chunk, elements per block of the
    # blocked kernels (tiny -> every tensor spans several blocks, with a ragged last one);
    # small, tensors below this size are packed together (0 -> no packing, huge ->
    # everything packed; 30 -> all but the 40-element tensor); gram_chunk, elements per
    # block of the float64 Gram products (tiny -> long pieces are blocked, short ones
    # batched several per block). None keeps the module's default.
    grads = random_grads(5, num_domains, [(23,), (4, 6), (1,), (0,), (2, 2, 3), (40,)])
    set_blocking(monkeypatch, 1 << 30, 0, 1 << 30)
    before = {name: rule(grads) for name, rule in ALL_RULES.items()}
    chunk, small, gram_chunk = (d if v is None else v for v, d in zip((chunk, small, gram_chunk), DEFAULT_BLOCKING))
    set_blocking(monkeypatch, chunk, small, gram_chunk)
    # the patches are seen where the constants are read: packing ...
    groups = _plumbing._make_groups(grads, num_domains)
    assert any(grp.packed for grp in groups) == (small > 1)
    assert len(groups) == (6 if small == 0 else 2 if small == 30 else 1)
    # ... and blocking (every block of the elementwise kernels takes its scratch buffers;
    # counted on the torch kernel, which the native one replaces for CPU float tensors)
    blocks = []
    get = _plumbing._Scratch.get
    with monkeypatch.context() as patch:
        patch.setattr(_plumbing._Scratch, "get", lambda self, *a, **k: blocks.append(1) or get(self, *a, **k))
        patch.setattr(_native, "usable", lambda t: False)
        agr_sum(grads)
    assert len(blocks) == sum(-(-grp.out.numel() // chunk) for grp in groups)
    assert (len(blocks) > len(groups)) == (chunk < 40)
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
    a = corgrad(
        g,
        slices=np.int64(3),
        min_slice=np.int64(2),
        alpha=np.float32(0.5),
        step=np.int64(2),
        total_steps=np.int64(10),
        alpha_schedule="decay",
        eps=np.float64(1e-12),
        order="index",
    )
    b = corgrad(g, slices=3, min_slice=2, alpha=0.5, step=2, total_steps=10, alpha_schedule="decay", order="index")
    assert all(close(x, y) for x, y in zip(a.grads, b.grads))
    assert close(and_mask(g, tau=np.float32(0.5)).grads[0], and_mask(g, tau=0.5).grads[0])


# ------------------------------------------------------------------- the objects


OBJECTS = {
    surgery.AgrSum: agr_sum,
    surgery.AgrRand: agr_rand,
    surgery.PCGrad: pcgrad,
    surgery.CorGrad: corgrad,
    surgery.ANDMask: and_mask,
    surgery.SANDMask: sand_mask,
}


@pytest.mark.parametrize("cls", list(OBJECTS), ids=lambda c: c.__name__)
def test_objects_take_the_functions_options_with_the_same_defaults(cls):
    fn = inspect.signature(OBJECTS[cls]).parameters
    obj = inspect.signature(cls).parameters
    # every option of the function but the step, which CorGrad counts itself
    assert set(obj) == set(fn) - {"grads", "step"}
    for name, param in obj.items():
        if name == "order":  # the functions' None is the objects' "random"
            assert fn[name].default is None and param.default == "random"
        else:
            assert param.default == fn[name].default, (cls.__name__, name)
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
    # the repr names every option, in the constructor's order
    shown = repr(cls(generator=torch.Generator()) if "generator" in obj else cls())
    assert shown.startswith(f"{cls.__name__}(") and shown.endswith(")")
    assert [part.split("=")[0] for part in shown[len(cls.__name__) + 1 : -1].split(", ")] == list(obj)


def test_the_package_keeps_its_public_names():
    # `from domaingrad.gradients import surgery; surgery.corgrad` and the README's imports
    for name in surgery.__all__:
        assert getattr(surgery, name) is not None
    from domaingrad import gradients

    assert gradients.surgery_backward is surgery.surgery_backward
    assert sorted(surgery.RULES) == ["agr_rand", "agr_sum", "and_mask", "corgrad", "pcgrad", "sand_mask"]
