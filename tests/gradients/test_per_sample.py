"""Per-sample gradients (torch.func path and the linear cross-entropy closed form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad.gradients.per_sample import linear_cross_entropy_per_sample_gradients, per_sample_gradients


def ce(out, y):
    return F.cross_entropy(out, y)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(n: int = 5, features: int = 4, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))


def loop_gradients(module, x, y, names, create_graph=False):
    """Brute force: one autograd.grad per sample, each sample forwarded alone."""
    params = dict(module.named_parameters())
    out = {n: [] for n in names}
    for i in range(len(x)):
        loss = F.cross_entropy(module(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        for n, g in zip(names, gs):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def test_generic_path_equals_a_loop_over_samples():
    model = mlp()
    x, y = data()
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, x, y, ce)
    want = loop_gradients(model, x, y, names)
    assert list(got) == names
    for n in names:
        assert got[n].shape == (5, *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)
    # the samples really differ (a broadcast mean would fail the comparison above too)
    assert not torch.allclose(got["2.weight"][0], got["2.weight"][1])


def test_subset_of_parameters_and_order():
    model = mlp()
    x, y = data()
    got = per_sample_gradients(model, x, y, ce, params=["2.bias", "0.weight"])
    assert list(got) == ["2.bias", "0.weight"]
    want = loop_gradients(model, x, y, ["2.bias", "0.weight"])
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)


def test_conv_groupnorm_network_equals_loop():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(2, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, x, y, ce)
    want = loop_gradients(model, x, y, names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7])
def test_chunked_equals_unchunked(chunk_size):
    model = mlp()
    x, y = data()
    full = per_sample_gradients(model, x, y, ce)
    chunked = per_sample_gradients(model, x, y, ce, chunk_size=chunk_size)
    for n in full:
        torch.testing.assert_close(chunked[n], full[n], rtol=1e-12, atol=1e-14)


def test_linear_fast_path_equals_loop_and_generic_path():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x, y = data(n=6)
    logits = layer(x)
    gw, gb = linear_cross_entropy_per_sample_gradients(x, logits, y, has_bias=True)
    assert gw.shape == (6, 3, 4) and gb.shape == (6, 3)
    want = loop_gradients(layer, x, y, ["weight", "bias"])
    torch.testing.assert_close(gw, want["weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, want["bias"], rtol=1e-12, atol=1e-12)
    generic = per_sample_gradients(layer, x, y, ce)
    torch.testing.assert_close(gw, generic["weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, generic["bias"], rtol=1e-12, atol=1e-12)

    nobias = nn.Linear(4, 3, bias=False).double()
    gw2, gb2 = linear_cross_entropy_per_sample_gradients(x, nobias(x), y, has_bias=False)
    assert gb2 is None
    torch.testing.assert_close(gw2, loop_gradients(nobias, x, y, ["weight"])["weight"], rtol=1e-12, atol=1e-12)


def _weights_like(grads, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in grads.items()}


def test_differentiable_wrt_inputs_and_parameters_like_a_create_graph_loop():
    model = mlp()
    x, y = data()
    x = x.requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    got = per_sample_gradients(model, x, y, ce)
    c = _weights_like(got)
    # a nonlinear scalar of the per-sample gradients (as Fishr's squared variances are)
    s_got = sum((c[n] * got[n]).sum() ** 2 for n in names)
    d_got = torch.autograd.grad(s_got, [x, *params])

    want = loop_gradients(model, x, y, names, create_graph=True)
    s_want = sum((c[n] * want[n]).sum() ** 2 for n in names)
    d_want = torch.autograd.grad(s_want, [x, *params])
    assert d_got[0].abs().sum() > 0
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_wrt_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    y = torch.tensor([0, 1, 1])
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        g = per_sample_gradients(model, inp, y, ce)
        return torch.cat([v.flatten(1) for v in g.values()], dim=1)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_fast_path_is_differentiable_like_the_generic_path():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x, y = data()
    x = x.requires_grad_()
    gw, gb = linear_cross_entropy_per_sample_gradients(x, layer(x), y, has_bias=True)
    generic = per_sample_gradients(layer, x, y, ce)
    c = _weights_like(generic)
    s_fast = (c["weight"] * gw).sum() ** 2 + (c["bias"] * gb).pow(3).sum()
    s_gen = (c["weight"] * generic["weight"]).sum() ** 2 + (c["bias"] * generic["bias"]).pow(3).sum()
    wrt = [x, layer.weight, layer.bias]
    for a, b in zip(torch.autograd.grad(s_fast, wrt), torch.autograd.grad(s_gen, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_create_graph_false_gives_detached_equal_values():
    model = mlp()
    x, y = data()
    x = x.requires_grad_()
    with_graph = per_sample_gradients(model, x, y, ce)
    without = per_sample_gradients(model, x, y, ce, create_graph=False)
    for n in with_graph:
        assert with_graph[n].requires_grad
        assert not without[n].requires_grad and without[n].grad_fn is None
        torch.testing.assert_close(without[n], with_graph[n].detach(), rtol=0, atol=0)


def test_unused_parameter_gets_zeros():
    model = mlp()
    model.extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    x, y = data()
    got = per_sample_gradients(model, x, y, ce, params=["extra", "2.bias"])
    assert got["extra"].shape == (5, 2) and torch.equal(got["extra"], torch.zeros(5, 2, dtype=torch.float64))


def test_errors_are_clear():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="5 samples but targets has 4"):
        per_sample_gradients(model, x, y[:4], ce)
    with pytest.raises(ValueError, match="empty"):
        per_sample_gradients(model, x[:0], y[:0], ce)
    with pytest.raises(ValueError, match="not a parameter"):
        per_sample_gradients(model, x, y, ce, params=["nope"])
    with pytest.raises(ValueError, match="twice"):
        per_sample_gradients(model, x, y, ce, params=["0.bias", "0.bias"])
    with pytest.raises(ValueError, match="params is empty"):
        per_sample_gradients(model, x, y, ce, params=[])
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_gradients(model, x, y, ce, chunk_size=0)
    with pytest.raises(ValueError, match="scalar"):
        per_sample_gradients(model, x, y, lambda out, t: out)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        per_sample_gradients(model, x, y, ce, params=["0.bias"])
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    with pytest.raises(ValueError, match="running statistics"):
        per_sample_gradients(bn, x, y, ce)
    bn.eval()  # fine in eval mode
    assert per_sample_gradients(bn, x, y, ce)["0.weight"].shape == (5, 3, 4)


def test_fast_path_errors_are_clear():
    x, y = data()
    logits = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cross_entropy_per_sample_gradients(x, logits[:4], y, True)
    with pytest.raises(ValueError, match="expected features"):
        linear_cross_entropy_per_sample_gradients(x[0], logits, y, True)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        linear_cross_entropy_per_sample_gradients(x, logits, y + 3, True)
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy_per_sample_gradients(x, logits, y.double(), True)
