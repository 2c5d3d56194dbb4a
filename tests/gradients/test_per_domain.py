"""Tests for domaingrad.gradients.per_domain.

Reference: plain per-domain autograd (model.zero_grad(); loss_d.backward(); copy .grad),
one domain at a time, as in Mansilla et al., "Domain Generalization via Gradient Surgery" (ICCV 2021, Sec. 3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import domaingrad.gradients.per_domain as pd_mod
from domaingrad import models
from domaingrad.gradients.per_domain import PerDomainGradients, per_domain_gradients

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from 2 threads, and on a loaded 2-core machine OpenMP
    oversubscription made this file 3x slower (33 s vs 11 s). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MNIST_CNN(models.MNIST_CNN):
    """DomainBed's MNIST_CNN featurizer (domaingrad.models) with a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__((in_channels, 28, 28))
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(super().forward(x))


class TinyBN(nn.Module):
    """Small conv net with BatchNorm2d, for the batch-statistics semantics tests."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_batches(
    sizes: Sequence[int], shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # a per-domain shift so that the domains really differ
    return [
        (
            torch.randn(b, *shape, generator=g) + 0.5 * d,
            torch.randint(0, num_classes, (b,), generator=g),
        )
        for d, b in enumerate(sizes)
    ]


def reference(
    model: nn.Module,
    minibatches: Sequence[tuple[Tensor, Tensor]],
    params: Sequence[nn.Parameter] | None = None,
    loss_fn=F.cross_entropy,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """Per-domain grads by plain backward(); leaves .grad as None afterwards."""
    plist = list(params) if params is not None else list(model.parameters())
    per_param: list[list[Tensor]] = [[] for _ in plist]
    losses, logits = [], []
    for x, y in minibatches:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        for acc, p in zip(per_param, plist):
            acc.append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        losses.append(loss.detach())
        logits.append(out.detach())
    model.zero_grad(set_to_none=True)
    return [torch.stack(a) for a in per_param], torch.stack(losses), logits


def assert_grads_close(got: Sequence[Tensor], want: Sequence[Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ equality with autograd
#
# Why float64 for the vmap path: vmap forwards the D domains as one batched computation,
# whose float32 rounding differs from the per-domain forwards. A ReLU pre-activation
# within rounding distance of 0 can then take the other sign, switching a whole
# gradient element on or off (a kink, not a rounding error): measured here, about one
# seed in three of the float32 MNIST_CNN cases has a few elements off by ~1e-3, in
# either path against float64 truth, and plain autograd is affected the same way. In
# float64 the paths agree to ~1e-16. The sequential path runs the very same kernels as
# plain autograd, so it is compared in float32 at rtol 1e-4 / atol 1e-6.


def _check_result(res, want_g, want_l, want_out, n_dom, n_cls, rtol, atol) -> None:
    assert isinstance(res, PerDomainGradients)
    assert len(res.grads) == len(want_g)
    for g, w in zip(res.grads, want_g):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    assert res.losses.shape == (n_dom,)
    torch.testing.assert_close(res.losses, want_l, rtol=rtol, atol=atol)
    assert len(res.logits) == n_dom
    for got, want in zip(res.logits, want_out):
        assert got.shape == (2, n_cls)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert not res.losses.requires_grad
    assert all(not t.requires_grad for t in [*res.grads, *res.logits])


@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("in_channels", [2, 1])
def test_matches_plain_autograd_float64(n_domains: int, in_channels: int) -> None:
    torch.manual_seed(n_domains * 10 + in_channels)
    n_cls = 2 if in_channels == 2 else 10
    model = MNIST_CNN(in_channels, n_cls).double()
    mbs = [(x.double(), y) for x, y in make_batches([2] * n_domains, (in_channels, 28, 28), n_cls)]
    want = reference(model, mbs)
    # (the sequential path is checked in float32 below, with the very same kernels)
    res = per_domain_gradients(model, mbs, method="vmap")
    _check_result(res, *want, n_domains, n_cls, rtol=1e-7, atol=1e-10)
    assert res.grads[0].shape == (n_domains, 64, in_channels, 3, 3)
    # gradients really differ between domains (the domain axis is not a broadcast)
    if n_domains > 1:
        assert not torch.allclose(res.grads[-1][0], res.grads[-1][1])


@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("in_channels", [2, 1])
def test_matches_plain_autograd_float32(n_domains: int, in_channels: int) -> None:
    torch.manual_seed(n_domains * 10 + in_channels)
    n_cls = 2 if in_channels == 2 else 10
    model = MNIST_CNN(in_channels, n_cls)
    mbs = make_batches([2] * n_domains, (in_channels, 28, 28), n_cls)
    want_g, want_l, want_out = reference(model, mbs)
    res = per_domain_gradients(model, mbs, method="sequential")
    _check_result(res, want_g, want_l, want_out, n_domains, n_cls, RTOL, ATOL)
    res = per_domain_gradients(model, mbs, method="vmap")
    assert [g.shape for g in res.grads] == [w.shape for w in want_g]
    assert all(g.dtype == torch.float32 for g in res.grads)
    torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)
    for got, want in zip(res.logits, want_out):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # ReLU kinks (see above): per-tensor relative L2 error; measured <= 1e-3 over 40 seeds
    for g, w in zip(res.grads, want_g):
        assert (g - w).norm() <= 1e-2 * w.norm()


def test_sequential_unequal_batch_sizes() -> None:
    torch.manual_seed(1)
    model = MNIST_CNN(1, 10)
    mbs = make_batches([2, 3, 1], (1, 28, 28), 10)
    want_g, want_l, _ = reference(model, mbs)
    res = per_domain_gradients(model, mbs, method="sequential")
    assert_grads_close(res.grads, want_g)
    torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)
    assert [o.shape[0] for o in res.logits] == [2, 3, 1]


def test_custom_loss_fn_both_paths() -> None:
    torch.manual_seed(2)
    model = MNIST_CNN(2, 2)
    model.double()
    mbs = [(x.double(), y) for x, y in make_batches([2, 2], (2, 28, 28), 2)]

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, label_smoothing=0.1) + 0.01 * (out**2).mean()

    want_g, want_l, _ = reference(model, mbs, loss_fn=loss_fn)
    for method in ("sequential", "vmap"):
        res = per_domain_gradients(model, mbs, loss_fn=loss_fn, method=method)
        assert_grads_close(res.grads, want_g)
        torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ params handling


@pytest.mark.parametrize("method", ["sequential", "vmap"])
def test_params_subset_classifier_only(method: str) -> None:
    torch.manual_seed(3)
    model = MNIST_CNN(2, 2)
    mbs = make_batches([2, 2], (2, 28, 28), 2)
    params = [model.classifier.bias, model.classifier.weight]  # non-default order
    want_g, want_l, _ = reference(model, mbs, params=params)
    res = per_domain_gradients(model, mbs, params=params, method=method)
    assert [tuple(g.shape) for g in res.grads] == [(2, 2), (2, 2, 128)]
    assert_grads_close(res.grads, want_g)
    torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)


def test_default_params_skip_frozen_ones_in_named_order() -> None:
    model = MNIST_CNN(1, 10)
    model.conv1.weight.requires_grad_(False)
    mbs = make_batches([2, 2], (1, 28, 28), 10)
    res = per_domain_gradients(model, mbs, method="sequential")
    expected = [p for p in model.parameters() if p.requires_grad]
    assert len(res.grads) == len(expected) == len(list(model.parameters())) - 1
    assert [g.shape[1:] for g in res.grads] == [p.shape for p in expected]


@pytest.mark.parametrize("method", ["sequential", "vmap"])
def test_unused_parameter_gets_zero_gradient(method: str) -> None:
    model = MNIST_CNN(1, 10)
    model.unused = nn.Linear(3, 3)
    mbs = make_batches([2, 2], (1, 28, 28), 10)
    res = per_domain_gradients(model, mbs, params=[model.unused.weight, model.classifier.bias], method=method)
    assert res.grads[0].shape == (2, 3, 3)
    assert torch.count_nonzero(res.grads[0]) == 0
    assert torch.count_nonzero(res.grads[1]) > 0


# ------------------------------------------------------------------ side effects


@pytest.mark.parametrize("method", ["sequential", "vmap", "auto"])
def test_grad_fields_untouched(method: str) -> None:
    model = MNIST_CNN(2, 2)
    mbs = make_batches([2, 2], (2, 28, 28), 2)
    per_domain_gradients(model, mbs, method=method)
    assert all(p.grad is None for p in model.parameters())
    # pre-existing .grad values are neither accumulated into nor replaced
    marker = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = marker
    per_domain_gradients(model, mbs, method=method)
    assert model.classifier.weight.grad is marker
    assert torch.all(marker == 7.0)
    assert model.conv1.weight.grad is None


@pytest.mark.parametrize("method", ["sequential", "vmap"])
def test_train_eval_mode_respected_and_kept(method: str) -> None:
    model = MNIST_CNN(1, 10).eval()
    per_domain_gradients(model, make_batches([2, 2], (1, 28, 28), 10), method=method)
    assert not model.training
    model.train()
    per_domain_gradients(model, make_batches([2, 2], (1, 28, 28), 10), method=method)
    assert model.training


def test_vmap_with_dropout_in_training_mode() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    mbs = make_batches([8, 8, 8], (16,), 3)
    res = per_domain_gradients(model, mbs, method="vmap")
    # the returned logits are the ones the loss was computed from (same dropout mask)
    for out, (_, y), loss in zip(res.logits, mbs, res.losses):
        torch.testing.assert_close(F.cross_entropy(out, y), loss, rtol=RTOL, atol=ATOL)
    assert all(torch.isfinite(g).all() for g in res.grads)
    # in eval mode (no dropout) both paths agree
    model.eval()
    a = per_domain_gradients(model, mbs, method="vmap")
    b = per_domain_gradients(model, mbs, method="sequential")
    assert_grads_close(a.grads, b.grads)


# ------------------------------------------------------------------ BatchNorm semantics


def test_sequential_batchnorm_uses_per_domain_batch_statistics() -> None:
    torch.manual_seed(5)
    model = TinyBN().train()
    mbs = make_batches([6, 6, 4], (1, 8, 8), 3)
    twin = copy.deepcopy(model)

    res = per_domain_gradients(model, mbs, method="sequential")

    # logits = per-domain forward of an identical model in training mode
    for d, (x, _) in enumerate(mbs):
        torch.testing.assert_close(res.logits[d], twin(x).detach(), rtol=RTOL, atol=ATOL)
    # ... which differs from normalising with the statistics of the concatenated batch
    pooled = copy.deepcopy(twin)(torch.cat([x for x, _ in mbs]))[:6].detach()
    assert not torch.allclose(res.logits[0], pooled, atol=1e-4)


def test_sequential_batchnorm_grads_and_running_stats_match_separate_forwards() -> None:
    torch.manual_seed(6)
    model = TinyBN().train()
    model.bn.momentum = 0.3
    mbs = make_batches([5, 7, 5], (1, 8, 8), 3)
    twin = copy.deepcopy(model)
    want_g, want_l, _ = reference(twin, mbs)  # D separate forwards, in domain order

    res = per_domain_gradients(model, mbs, method="sequential")

    assert_grads_close(res.grads, want_g)
    torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, twin.bn.running_var)
    assert int(model.bn.num_batches_tracked) == int(twin.bn.num_batches_tracked) == 3
    # one update on the concatenated batch would give different running stats
    concat = copy.deepcopy(TinyBN().train())
    concat.load_state_dict(copy.deepcopy(twin.state_dict()))
    concat.bn.reset_running_stats()
    concat(torch.cat([x for x, _ in mbs]))
    assert not torch.allclose(concat.bn.running_mean, model.bn.running_mean)


def test_vmap_refuses_batchnorm_in_training_mode() -> None:
    model = TinyBN().train()
    mbs = make_batches([4, 4], (1, 8, 8), 3)
    before = copy.deepcopy(model.bn.state_dict())
    with pytest.raises(ValueError, match=r"bn.*running statistics.*sequential"):
        per_domain_gradients(model, mbs, method="vmap")
    # refused before any forward: running stats untouched
    for k, v in before.items():
        torch.testing.assert_close(model.bn.state_dict()[k], v)


def test_auto_falls_back_to_sequential_with_batchnorm(monkeypatch) -> None:
    torch.manual_seed(7)
    model = TinyBN().train()
    mbs = make_batches([4, 4], (1, 8, 8), 3)
    twin = copy.deepcopy(model)
    want_g, _, _ = reference(twin, mbs)
    # auto must not even try vmap here, whatever the device
    monkeypatch.setattr(pd_mod, "_auto_method", lambda problem, device: "vmap" if problem is None else "sequential")
    monkeypatch.setattr(pd_mod, "_vmap_path", _fail)
    res = per_domain_gradients(model, mbs, method="auto")
    assert_grads_close(res.grads, want_g)
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
    assert int(model.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("track", [True, False])
def test_vmap_ok_with_batchnorm_in_eval_or_without_running_stats(track: bool) -> None:
    torch.manual_seed(8)
    model = TinyBN().double()
    if track:
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.eval()
    else:
        model.bn = nn.BatchNorm2d(4, track_running_stats=False).double()
        model.train()  # batch statistics, nothing updated in place
    mbs = [(x.double(), y) for x, y in make_batches([4, 4, 4], (1, 8, 8), 3)]
    stats = copy.deepcopy(model.bn.state_dict())
    want_g, want_l, _ = reference(copy.deepcopy(model), mbs)
    res = per_domain_gradients(model, mbs, method="vmap")
    assert_grads_close(res.grads, want_g)
    torch.testing.assert_close(res.losses, want_l, rtol=RTOL, atol=ATOL)
    for k, v in stats.items():
        torch.testing.assert_close(model.bn.state_dict()[k], v)


# ------------------------------------------------------------------ auto


def _fail(*args, **kwargs):
    raise AssertionError("this path must not be taken")


def test_auto_unequal_batch_sizes_uses_sequential(monkeypatch) -> None:
    model = MNIST_CNN(1, 10)
    mbs = make_batches([3, 2], (1, 28, 28), 10)
    want_g, _, _ = reference(model, mbs)
    monkeypatch.setattr(pd_mod, "_auto_method", lambda problem, device: "vmap" if problem is None else "sequential")
    monkeypatch.setattr(pd_mod, "_vmap_path", _fail)
    res = per_domain_gradients(model, mbs, method="auto")
    assert_grads_close(res.grads, want_g)


def test_auto_on_cpu_uses_sequential(monkeypatch) -> None:
    model = MNIST_CNN(1, 10)
    mbs = make_batches([2, 2], (1, 28, 28), 10)
    monkeypatch.setattr(pd_mod, "_vmap_path", _fail)
    res = per_domain_gradients(model, mbs, method="auto")
    assert res.grads[0].shape[0] == 2


def test_auto_method_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert pd_mod._auto_method(None, cpu) == "sequential"
    assert pd_mod._auto_method(None, cuda) == "vmap"
    assert pd_mod._auto_method("unequal batch sizes", cuda) == "sequential"


# ------------------------------------------------------------------ errors


@pytest.fixture
def small() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    return MNIST_CNN(1, 10), make_batches([2, 2], (1, 28, 28), 10)


@pytest.mark.parametrize("method", ["auto", "sequential", "vmap"])
def test_error_empty_minibatches(small, method: str) -> None:
    model, _ = small
    with pytest.raises(ValueError, match="minibatches is empty"):
        per_domain_gradients(model, [], method=method)


def test_error_mismatched_x_y(small) -> None:
    model, mbs = small
    bad = [mbs[0], (mbs[1][0], mbs[1][1][:1])]
    with pytest.raises(ValueError, match=r"minibatches\[1\].*2 samples but y has 1"):
        per_domain_gradients(model, bad)


def test_error_empty_domain_batch(small) -> None:
    model, mbs = small
    bad = [mbs[0], (mbs[1][0][:0], mbs[1][1][:0])]
    with pytest.raises(ValueError, match=r"minibatches\[1\] is an empty batch"):
        per_domain_gradients(model, bad, method="sequential")


def test_error_not_a_pair(small) -> None:
    model, mbs = small
    with pytest.raises(ValueError, match=r"minibatches\[0\] must be an \(x, y\) pair"):
        per_domain_gradients(model, [mbs[0][0]])


def test_error_vmap_unequal_batch_sizes() -> None:
    model = MNIST_CNN(1, 10)
    mbs = make_batches([3, 2], (1, 28, 28), 10)
    with pytest.raises(ValueError, match="equal batch sizes.*method='sequential'"):
        per_domain_gradients(model, mbs, method="vmap")


def test_error_param_not_in_model(small) -> None:
    model, mbs = small
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"params\[1\].*not a parameter of the model"):
        per_domain_gradients(model, mbs, params=[model.classifier.bias, stranger])


def test_error_duplicate_param(small) -> None:
    model, mbs = small
    b = model.classifier.bias
    with pytest.raises(ValueError, match="given twice"):
        per_domain_gradients(model, mbs, params=[b, b])


def test_error_param_without_grad(small) -> None:
    model, mbs = small
    model.classifier.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        per_domain_gradients(model, mbs, params=[model.classifier.bias])


def test_error_empty_params_and_unknown_method(small) -> None:
    model, mbs = small
    with pytest.raises(ValueError, match="params is empty"):
        per_domain_gradients(model, mbs, params=[])
    with pytest.raises(ValueError, match="method must be"):
        per_domain_gradients(model, mbs, method="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["sequential", "vmap"])
def test_error_non_scalar_loss(small, method: str) -> None:
    model, mbs = small

    def per_sample(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        per_domain_gradients(model, mbs, loss_fn=per_sample, method=method)
