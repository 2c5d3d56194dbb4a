"""MixStyle (Zhou, Yang, Qiao, Xiang, "Domain Generalization with MixStyle", ICLR 2021):
the mixed statistics follow Eq. 4-5, cross-domain partners come from other domains (for
two domains exactly as the authors' code draws them), nothing is mixed at test time, and
an update is one Adam step on the hand-mixed forward pass."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad import models
from domaingrad.algorithms.erm import ERM
from domaingrad.algorithms.mixstyle import MIXSTYLE_EPS, MixStyle, crossdomain_permutation, mixstyle
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.staged import SHAPE as STAGED_SHAPE
from tests.algorithms.test_baselines import adam_step, batches, build


@pytest.mark.parametrize("unbiased", [False, True], ids=["paper", "authors_code"])
def test_mixed_maps_have_the_mixed_mean_and_std(unbiased):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 2
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    lam = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0, 0.3], dtype=torch.float64)
    out = mixstyle(x, perm, lam, unbiased=unbiased)
    mu = x.mean(dim=(2, 3))  # (N, C)
    # the paper's instance variance mean((x - mu)**2) over 20 positions, or the authors' x.var (/ 19)
    var = ((x - mu[:, :, None, None]) ** 2).sum(dim=(2, 3)) / (19 if unbiased else 20)
    sig = (var + MIXSTYLE_EPS).sqrt()
    lam_ = lam[:, None]
    mu_mix = lam_ * mu + (1 - lam_) * mu[perm]
    sig_mix = lam_ * sig + (1 - lam_) * sig[perm]
    assert torch.allclose(out.mean(dim=(2, 3)), mu_mix, atol=1e-12, rtol=0)
    # x_normed = (x - mu) / sig has variance (of the same kind) var / (var + eps)
    out_std = out.var(dim=(2, 3), correction=1 if unbiased else 0).sqrt()
    assert torch.allclose(out_std, sig_mix * (var / (var + MIXSTYLE_EPS)).sqrt(), atol=1e-12, rtol=0)
    # the two variances differ by the factor 20/19, which cancels in sig_mix / sig: only eps differs
    other = mixstyle(x, perm, lam, unbiased=not unbiased)
    assert torch.allclose(other, out, atol=1e-5) and not torch.equal(other, out)
    # lam = 1 keeps an example's own style: the example itself up to eps
    assert torch.allclose(out[4], x[4], atol=1e-5)
    # lam = 0 takes its partner's style entirely
    assert torch.allclose(out[3].mean(dim=(1, 2)), mu[1], atol=1e-12)
    # the statistics are detached: gradients flow through the normalised maps only
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixstyle(xr, perm, lam, unbiased=unbiased).sum(), xr)
    assert torch.allclose(grad, (sig_mix / sig)[:, :, None, None].expand_as(x), atol=1e-12)


def test_two_domain_partners_are_the_authors_swapped_halves():
    """The authors' crossdomain branch, written out: reversed indices, split in halves,
    each indexed by randperm(B // 2), concatenated."""
    for n in (1, 4, 7):
        ours = crossdomain_permutation([n, n], torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        perm_b, perm_a = torch.arange(2 * n - 1, -1, -1).chunk(2)
        theirs = torch.cat([perm_b[torch.randperm(n, generator=g)], perm_a[torch.randperm(n, generator=g)]])
        assert torch.equal(ours, theirs)
        assert (ours[:n] >= n).all() and (ours[n:] < n).all()
        assert sorted(ours.tolist()) == list(range(2 * n))


@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 5, 4, 1], [5, 2]])
def test_crossdomain_partners_come_from_one_other_domain(sizes):
    domain = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])
    shifts = set()
    for seed in range(12):
        perm = crossdomain_permutation(sizes, torch.Generator().manual_seed(seed))
        assert perm.shape == (sum(sizes),)
        partner = domain[perm]
        assert (partner != domain).all(), (seed, perm)
        # every domain takes its partners from one domain, shifted by the same s
        shift = {int((partner[domain == d][0] - d) % len(sizes)) for d in range(len(sizes))}
        assert len(shift) == 1
        shifts |= shift
        for d, n in enumerate(sizes):  # no partner repeats while the partner domain has fresh ones
            picked = perm[domain == d].tolist()
            assert len(set(picked)) == min(n, sizes[int(partner[domain == d][0])])
    assert shifts == set(range(1, len(sizes)))  # every shift 1..K-1 occurs over the seeds


def test_crossdomain_needs_two_domains(staged_cnn):
    with pytest.raises(DomainGradError, match="two"):
        crossdomain_permutation([4], torch.Generator())
    with pytest.raises(DomainGradError, match="two training domains"):
        build(MixStyle, num_domains=1, shape=STAGED_SHAPE, mixstyle_mix="crossdomain")


def test_unknown_stage_and_flat_maps_are_refused(staged_cnn):
    with pytest.raises(DomainGradError, match="conv9"):
        build(MixStyle, shape=STAGED_SHAPE, mixstyle_layers="conv1,conv9")
    with pytest.raises(DomainGradError, match="at least 2 positions"):
        mixstyle(torch.randn(4, 3, 1, 1), torch.arange(4), torch.ones(4))


def test_defaults_are_the_papers_and_auto_is_the_first_three_stages_of_mnist_cnn():
    specs = {s.name: s for s in MixStyle.hparam_specs(True)}
    assert {k: specs[k].default for k in specs} == {
        "mixstyle_layers": "auto",
        "mixstyle_p": 0.5,
        "mixstyle_alpha": 0.1,
        "mixstyle_mix": "random",
        "mixstyle_variance": "biased",
    }
    for spec in specs.values():  # no search range in the paper: the value is kept
        assert {spec.draw(np.random.RandomState(s)) for s in range(10)} == {spec.default}
    algo = build(MixStyle, shape=(2, 28, 28), num_classes=2)
    assert isinstance(algo.featurizer, models.MNIST_CNN)
    assert algo.stages == ("conv1", "conv2", "conv3")


def test_auto_is_resnet_layer1_to_layer3():
    algo = build(MixStyle, shape=(3, 32, 32), num_classes=2, backbone="resnet18")
    assert algo.stages == ("layer1", "layer2", "layer3")


def test_update_is_adam_on_the_hand_mixed_forward_pass(staged_cnn):
    algo = build(MixStyle, shape=STAGED_SHAPE, mixstyle_p=1.0, mixstyle_layers="conv2", mixstyle_alpha=0.5)
    ref = copy.deepcopy(algo.network)
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    mb = batches(2, seed=3, n=4, shape=STAGED_SHAPE)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])

    def objective(net):
        featurizer, classifier = net[0], net[1]

        def stage_fn(name, out):
            if name != "conv2":
                return out
            assert float(torch.rand((), generator=g)) <= 1.0  # p = 1: never skipped
            seed = int(torch.randint(2**31, (1,), generator=g))
            lam = torch.tensor(np.random.RandomState(seed).beta(0.5, 0.5, size=8), dtype=out.dtype)[:, None, None, None]
            perm = torch.randperm(8, generator=g)
            mu = out.mean(dim=(2, 3), keepdim=True).detach()
            sig = (((out - mu) ** 2).mean(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()  # the paper's
            return (out - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]

        return F.cross_entropy(classifier(featurizer(x, stage_fn=stage_fn)), y)

    expected = adam_step(ref, objective)
    out = algo.update(mb)
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    plain = F.cross_entropy(ref(x), y).item()  # differs from the mixed loss: mixing happened
    assert abs(plain - expected) > 1e-4
    for p, q in zip(algo.network.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert torch.equal(algo.generator.get_state(), g.get_state())


def test_p_zero_is_erm_and_eval_mode_mixes_nothing(staged_cnn):
    algo = build(MixStyle, shape=STAGED_SHAPE, mixstyle_p=0.0)
    erm = build(ERM, shape=STAGED_SHAPE)
    for step in range(2):
        mb = batches(2, seed=step, shape=STAGED_SHAPE)
        assert algo.update(mb) == erm.update(mb)
    for p, q in zip(algo.network.parameters(), erm.network.parameters()):
        assert torch.equal(p, q)
    # with p = 1 the hook mixes in training mode, and is the identity in eval mode
    algo.hparams["mixstyle_p"] = 1.0
    maps = torch.randn(8, 4, 9, 9)
    hook = algo.stage_hook([4, 4])
    assert not torch.allclose(hook("conv1", maps), maps)
    algo.eval()
    state = algo.generator.get_state()
    assert hook("conv1", maps) is maps
    assert torch.equal(algo.generator.get_state(), state)  # nothing drawn
    x = torch.randn(5, *STAGED_SHAPE)
    assert torch.equal(algo.predict(x), algo.classifier(algo.featurizer(x)))


def test_skip_probability_follows_mixstyle_p(staged_cnn):
    algo = build(MixStyle, shape=STAGED_SHAPE, mixstyle_p=0.3)
    hook = algo.stage_hook([4, 4])
    maps = torch.randn(8, 4, 9, 9)
    mixed = sum(not torch.equal(hook("conv1", maps), maps) for _ in range(400))
    # Binomial(400, 0.3): mean 120, sd 9.2; 6 sd either side
    assert 65 < mixed < 175
    assert hook("conv9", maps) is maps  # a stage not chosen is never touched


def test_training_state_round_trip_continues_identically(staged_cnn):
    a = build(MixStyle, num_domains=3, shape=STAGED_SHAPE, mixstyle_mix="crossdomain")
    for step in range(3):
        a.update(batches(3, seed=step, shape=STAGED_SHAPE))
    b = build(MixStyle, num_domains=3, seed=99, shape=STAGED_SHAPE, mixstyle_mix="crossdomain")
    b.load_training_state(a.training_state())
    for step in range(3, 6):
        mb = batches(3, seed=step, shape=STAGED_SHAPE)
        assert a.update(mb) == b.update(mb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    """Cross-domain MixStyle at every step (p = 1): the two training environments pair up."""
    out = tmp_path / "run"
    record = train_by_spec(
        run_cli,
        tiny_mnist_dir,
        out,
        "domaingrad.algorithms.mixstyle:MixStyle",
        '{"batch_size": 8, "mixstyle_mix": "crossdomain", "mixstyle_p": 1.0}',
    )
    assert math.isfinite(record["loss"]) and (out / "done").exists()
