"""RSC (Huang, Wang, Xing, Huang, "Self-Challenging Improves Cross-Domain Generalization",
ECCV 2020): DomainBed's update against a literal re-expression of DomainBed's code, the
authors' official variant against per-sample references, bad hyperparameters and exact
resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from domaingrad import models
from domaingrad.algorithms.erm import ERM
from domaingrad.algorithms.rsc import RSC, rsc_official_feature_mask, rsc_official_muted_samples
from domaingrad.errors import DomainGradError
from domaingrad.hparams import common_hparams
from tests.algorithms.staged import (
    SHAPE,
    batches,
    build,
    check_hparams_registered,
    check_round_trip,
    check_trains_on_mnist_cnn,
    concat,
)
from tests.conftest import train_on_pacs_sample

#: one torch thread (tests/conftest.py); StagedCNN as the featurizer (tests/algorithms/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread", "staged_cnn")


# -- RSC ---------------------------------------------------------------------------------


class TinyFeaturizer(nn.Module):
    n_outputs = 12

    def __init__(self, input_shape):
        super().__init__()
        self.lin = nn.Linear(math.prod(input_shape), self.n_outputs)

    def forward(self, x):
        return torch.tanh(self.lin(x.flatten(1)))


def domainbed_rsc_loss(algo, minibatches, f_factor, b_factor):
    """DomainBed's RSC.update (algorithms.py) up to the loss, with np.percentile."""
    drop_f, drop_b = (1 - f_factor) * 100, (1 - b_factor) * 100
    all_x, all_y = concat(minibatches)
    all_o = torch.nn.functional.one_hot(all_y, algo.num_classes)
    all_f = algo.featurizer(all_x)
    all_p = algo.classifier(all_f)
    all_g = autograd.grad((all_p * all_o).sum(), all_f)[0]
    percentiles = np.percentile(all_g.cpu(), drop_f, axis=1)
    percentiles = torch.Tensor(percentiles)
    percentiles = percentiles.unsqueeze(1).repeat(1, all_g.size(1))
    mask_f = all_g.lt(percentiles).float()
    all_f_muted = all_f * mask_f
    all_p_muted = algo.classifier(all_f_muted)
    all_s = F.softmax(all_p, dim=1)
    all_s_muted = F.softmax(all_p_muted, dim=1)
    changes = (all_s * all_o).sum(1) - (all_s_muted * all_o).sum(1)
    percentile = np.percentile(changes.detach().cpu(), drop_b)
    mask_b = changes.lt(percentile).float().view(-1, 1)
    mask = torch.logical_or(mask_f, mask_b).float()
    return F.cross_entropy(algo.classifier(all_f * mask), all_y), mask


@pytest.mark.parametrize("f_factor,b_factor", [(1 / 3, 1 / 3), (0.1, 0.45)])
def test_rsc_update_matches_domainbed(monkeypatch, f_factor, b_factor):
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))
    kw = dict(rsc_f_drop_factor=f_factor, rsc_b_drop_factor=b_factor)
    algo, ref = build(RSC, **kw), build(RSC, **kw)
    mbs = batches(n=6, shape=SHAPE)
    ref_loss, mask = domainbed_rsc_loss(ref, mbs, f_factor, b_factor)
    assert 0 < mask.mean() < 1 and (mask.sum(1) < 12).any() and (mask.sum(1) == 12).any()
    ref.optimizer.zero_grad()
    ref_loss.backward()
    ref.optimizer.step()
    assert algo.update(mbs)["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    for p, q in zip(algo.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_rsc_loss_gap_is_the_unmasked_minus_the_masked_loss(monkeypatch):
    """The supplement's Gamma (Michalkiewicz et al., ICCV 2023, Fig. 1) of DomainBed's RSC:
    |CE of the unmasked features - CE of the features the step trained on|, both before
    the step's update."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))
    algo, ref = build(RSC), build(RSC)
    mbs = batches(n=6, shape=SHAPE)
    masked, mask = domainbed_rsc_loss(ref, mbs, 1 / 3, 1 / 3)
    x, y = concat(mbs)
    with torch.no_grad():
        unmasked = F.cross_entropy(ref.classifier(ref.featurizer(x)), y)
    expected = abs(unmasked.item() - masked.item())
    assert expected > 1e-3 and (mask < 1).any()
    out = algo.update(mbs)
    assert out["loss"] == pytest.approx(masked.item(), rel=1e-6)
    assert out["loss_gap"] == pytest.approx(expected, abs=1e-6)


# -- RSC, the official variant ---------------------------------------------------------


def test_rsc_default_variant_is_domainbed():
    """DomainBed's tables used DomainBed's RSC: it stays the default, with no state of the
    official variant (so checkpoints and random streams of DomainBed runs are unchanged)."""
    spec = {s.name: s for s in RSC.hparam_specs(False)}["rsc_variant"]
    assert spec.default == "domainbed" and spec.choices == ("domainbed", "official")
    algo = build(RSC)
    assert algo.hparams["rsc_variant"] == "domainbed"
    assert not hasattr(algo, "generator") and "update_count" not in algo.state_dict()
    build(ERM, seed=3)
    after_erm = torch.get_rng_state()
    build(RSC, seed=3)  # same network, no further global draws
    assert torch.equal(torch.get_rng_state(), after_erm)
    official = build(RSC, rsc_variant="official")
    assert isinstance(official.generator, torch.Generator) and "update_count" in official.state_dict()


def test_rsc_official_feature_mask_on_a_hand_checked_example():
    """2 samples, 4 channels, 3x3 maps. Spatial: ceil(9/3) = 3 positions muted in every
    channel; channel: ceil(4/3.2) = 2 channels muted at every position."""
    features = torch.zeros(2, 4, 3, 3)
    features[0, 0] = torch.tensor([[5.0, 0.0, 8.0], [1.0, 7.0, 2.0], [6.0, 3.0, 4.0]])
    features[1, 3] = torch.tensor([[2.0, 9.0, 1.0], [0.0, 3.0, 8.0], [7.0, 4.0, 6.0]])
    features[1, 1] = 100.0  # its channel weight below is 0: no effect on sample 1's spatial score
    # gradient constant over each map: its spatial mean is that constant
    weights = torch.tensor([[2.0, 1.0, 3.0, -1.0], [-1.0, 0.0, 0.5, 3.0]])
    grads = weights[:, :, None, None].expand(2, 4, 3, 3).clone()
    grads[0, 1, 0, 0] += 9.0  # a spatial pattern with mean 1 more: channel 1's mean is 2
    grads[0, 1, 0, 1] -= 9.0  # ... back to 1 (mean unchanged)
    spatial = rsc_official_feature_mask(features, grads, spatial=True)
    assert spatial.shape == (2, 1, 3, 3)
    # sample 0: score = 2 * features[0, 0]; top 3 are 8, 7, 6; sample 1: 3 * features[1, 3]: 9, 8, 7
    expected = torch.ones(2, 1, 3, 3)
    expected[0, 0, 0, 2] = expected[0, 0, 1, 1] = expected[0, 0, 2, 0] = 0
    expected[1, 0, 0, 1] = expected[1, 0, 1, 2] = expected[1, 0, 2, 0] = 0
    assert torch.equal(spatial, expected)
    channel = rsc_official_feature_mask(features, grads, spatial=False)
    assert channel.shape == (2, 4, 1, 1)
    # sample 0: weights 2, 1, 3, -1 -> channels 2 and 0 muted; sample 1: -1, 0, .5, 3 -> 3 and 2
    assert torch.equal(channel.flatten(1), torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))
    # other fractions; a count reaching the row length mutes everything (a 1x1 map)
    assert torch.equal(
        rsc_official_feature_mask(features, grads, True, spatial_drop_factor=0.0), torch.ones(2, 1, 3, 3)
    )
    assert int((rsc_official_feature_mask(features, grads, True, spatial_drop_factor=0.5) == 0).sum()) == 2 * 5
    assert torch.equal(
        rsc_official_feature_mask(features[:, :, :1, :1], grads[:, :, :1, :1], True), torch.zeros(2, 1, 1, 1)
    )
    with pytest.raises(DomainGradError, match="same shape"):
        rsc_official_feature_mask(features, grads[:, :3], True)


def test_rsc_official_muted_samples_take_the_batch_percentage():
    """Drops d = max(change - 1e-4, 0); the round(N * percent) largest are muted, never a
    sample whose probability did not drop by more than 1e-4."""
    change = torch.tensor([0.5, 0.1, 0.00005, 0.3, -0.2, 0.2])
    assert rsc_official_muted_samples(change, 0.5).tolist() == [True, False, False, True, False, True]
    assert rsc_official_muted_samples(change, 0.3).tolist() == [True, False, False, True, False, False]  # round(1.8)
    assert rsc_official_muted_samples(change, 0.25).tolist() == [True, False, False, True, False, False]  # round(1.5)
    # Python's round, half to even, as the official code: 4 * 0.625 = 2.5 exactly -> 2
    assert rsc_official_muted_samples(torch.tensor([0.4, 0.1, 0.3, 0.2]), 0.625).tolist() == [True, False, True, False]
    assert not rsc_official_muted_samples(change, 0.0).any()
    # k >= N (the official code indexes past the end): every sample that lost probability
    assert rsc_official_muted_samples(change, 1.0).tolist() == [True, True, False, True, False, True]


def mnist_cnn_rsc(**overrides):
    """RSC on DomainBed's MNIST_CNN at 14x14 inputs: conv4 maps (N, 128, 7, 7), the 7x7 of the
    official code's layer4."""
    hp = {s.name: s.default for s in common_hparams(True) + RSC.hparam_specs(True)}
    hp.update(backbone="mnist_cnn", rsc_variant="official", **overrides)
    torch.manual_seed(0)
    return RSC((2, 14, 14), 3, 2, hp)


def official_rsc_reference_mask(algo, x, y, spatial, percent):
    """The official rule sample by sample, with top-k index sets (no thresholds), the layers
    after conv4 run on the whole batch, the network in eval mode."""
    net = copy.deepcopy(algo.network).eval()
    featurizer, classifier = net[0], net[1]
    outs = {}

    def capture(name, out):
        outs[name] = out
        return out

    featurizer(x, stage_fn=capture)
    a = outs["conv4"].detach().requires_grad_()

    def head(z):
        return classifier(featurizer(x, stage_fn=lambda n, o: z if n == "conv4" else o))

    logits = head(a)
    grads = autograd.grad(logits.gather(1, y[:, None]).sum(), a)[0]
    n, c, h, w = a.shape
    masks = []
    for i in range(n):
        weights = grads[i].mean(dim=(1, 2))
        m = torch.ones(c, h * w)
        if spatial:
            score = (a[i].detach() * weights[:, None, None]).sum(0).flatten()
            m[:, score.argsort(descending=True)[: math.ceil(h * w / 3)]] = 0
        else:
            m[weights.argsort(descending=True)[: math.ceil(c / 3.2)]] = 0
        masks.append(m.view(c, h, w))
    mask = torch.stack(masks)
    with torch.no_grad():
        before = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        after = F.softmax(head(a * mask), 1).gather(1, y[:, None]).squeeze(1)
    drop = (before - after - 1e-4).clamp(min=0)
    muted = torch.zeros(n, dtype=torch.bool)
    top = drop.argsort(descending=True)[: round(n * percent)]
    muted[top[drop[top] > 0]] = True
    mask[~muted] = 1
    return mask, muted


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "channel"])
def test_rsc_official_on_mnist_cnn_matches_a_per_sample_reference(spatial):
    algo = mnist_cnn_rsc(rsc_spatial_prob=1.0 if spatial else 0.0)
    mbs = batches(n=5, shape=(2, 14, 14))
    # two steps first: at initialisation, muting the channels of largest mean gradient (the
    # true class's classifier weights) lowers few samples' true-class probability
    for _ in range(2):
        algo.update(mbs)
    x, y = concat(mbs)
    ref_mask, ref_muted = official_rsc_reference_mask(algo, x, y, spatial, 0.3)
    before = copy.deepcopy(algo)
    stage, a, mask, chose_spatial, muted = algo.official_mask(x, y)
    assert stage == "conv4" and chose_spatial is spatial and a.shape == (10, 128, 7, 7)
    full = mask.expand_as(a)
    assert torch.equal(full, ref_mask) and torch.equal(muted, ref_muted)
    # exactly round(10 * 0.3) = 3 samples muted, each by 17 of 49 positions or 40 of 128 channels
    assert int(muted.sum()) == 3 and bool((full[~muted] == 1).all())
    if spatial:
        assert (mask[muted] == 0).flatten(1).sum(1).tolist() == [17] * 3
    else:
        assert (mask[muted] == 0).flatten(1).sum(1).tolist() == [40] * 3
    # the update trains on conv4 * mask, the kept units not rescaled
    out = before.update(mbs)
    logits = algo.classifier(algo.featurizer(x, stage_fn=lambda n, o: o * mask if n == "conv4" else o))
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["rsc_spatial"] == float(spatial) and out["rsc_muted_fraction"] == pytest.approx(0.3)


def test_rsc_official_loss_gap_on_mnist_cnn_is_the_unmasked_minus_the_masked_loss():
    """The official variant's Gamma: the unmasked network's CE (GroupNorm: eval = train
    mode) against the CE of conv4 * mask the step trained on."""
    algo = mnist_cnn_rsc(rsc_spatial_prob=1.0)
    mbs = batches(n=5, shape=(2, 14, 14))
    for _ in range(2):
        algo.update(mbs)
    x, y = concat(mbs)
    reference = copy.deepcopy(algo)
    mask, _ = official_rsc_reference_mask(reference, x, y, True, 0.3)
    with torch.no_grad():
        unmasked = F.cross_entropy(reference.network(x), y).item()
        logits = reference.classifier(reference.featurizer(x, stage_fn=lambda n, o: o * mask if n == "conv4" else o))
        masked = F.cross_entropy(logits, y).item()
    assert abs(unmasked - masked) > 1e-3
    out = algo.update(mbs)
    assert out["loss"] == pytest.approx(masked, rel=1e-5)
    assert out["loss_gap"] == pytest.approx(abs(unmasked - masked), abs=1e-5)


def test_rsc_official_batch_percent_follows_the_epoch_curriculum_on_mnist_cnn():
    """0.3 for the first half of the run (official epochs 0-9 of 20), 0.5 after."""
    algo = mnist_cnn_rsc()
    assert algo.batch_percent() == 0.3  # no run length known
    algo.total_steps = 2
    mbs = batches(n=5, shape=(2, 14, 14))
    assert algo.update(mbs)["rsc_muted_fraction"] == pytest.approx(0.3)
    assert algo.batch_percent() == pytest.approx(0.5)
    assert algo.update(mbs)["rsc_muted_fraction"] == pytest.approx(0.5)
    algo.total_steps, algo.update_count = 100, torch.tensor(74)
    algo.hparams["rsc_batch_percent_every"] = 0.25
    assert algo.batch_percent() == pytest.approx(0.7)  # floor(74 / 25) = 2 intervals


def test_rsc_official_trains_on_mnist_cnn():
    """A fixed batch of MNIST-shaped inputs (2, 14, 14): the unmasked cross-entropy falls."""
    algo = mnist_cnn_rsc()
    mbs = batches(n=4, shape=(2, 14, 14))
    x, y = concat(mbs)
    with torch.no_grad():
        start = F.cross_entropy(algo.predict(x), y).item()
    for _ in range(6):
        assert math.isfinite(algo.update(mbs)["loss"])
    with torch.no_grad():
        assert F.cross_entropy(algo.predict(x), y).item() < start


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_rsc_official_layers_after_the_stage_on_resnet18(monkeypatch, freeze_bn):
    """The layers after layer4, run on an empty batch (frozen BatchNorm) or the whole batch
    (BatchNorm in training mode), give the logits of a full forward with layer4 replaced."""
    from domaingrad.models.backbones import ResNetFeaturizer

    monkeypatch.setattr(models, "featurizer_for", lambda shape, hp: ResNetFeaturizer(18, shape, freeze_bn=freeze_bn))
    hp = {s.name: s.default for s in common_hparams(False) + RSC.hparam_specs(False)}
    hp.update(rsc_variant="official", rsc_stage="layer3")
    torch.manual_seed(0)
    algo = RSC((2, 32, 32), 3, 2, hp)
    x = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 256, 2, 2, generator=torch.Generator().manual_seed(2))
    got = algo.logits_after(x, "layer3", z)
    expected = algo.classifier(algo.featurizer(x, stage_fn=lambda n, o: z if n == "layer3" else o))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    mbs = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([2, 0]))]
    assert math.isfinite(algo.update(mbs)["loss"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(rsc_variant="paper"), "rsc_variant"),
        (dict(rsc_variant="official", rsc_stage="layer9"), "layer9"),
        (dict(rsc_variant="official", rsc_spatial_prob=1.5), "rsc_spatial_prob"),
        (dict(rsc_variant="official", rsc_batch_percent_every=0.0), "rsc_batch_percent_every"),
    ],
)
def test_bad_rsc_hyperparameters_are_refused(overrides, match):
    with pytest.raises(DomainGradError, match=match):
        build(RSC, **overrides)


def test_rsc_official_needs_a_featurizer_with_stages(monkeypatch):
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))
    with pytest.raises(DomainGradError, match="no named stages"):
        build(RSC, rsc_variant="official")
    build(RSC)  # DomainBed's works on flat features


VARIANTS = [{}, {"rsc_variant": "official"}]
VARIANT_IDS = ["domainbed", "official"]


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
def test_training_state_round_trip_continues_identically(overrides):
    check_round_trip(RSC, overrides)


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
def test_trains_on_mnist_cnn(overrides):
    check_trains_on_mnist_cnn(RSC, overrides)


@pytest.mark.slow
def test_trains_on_real_pacs_photos_with_resnet18(real_photos_dir, run_cli, tmp_path):
    """A few steps on the PACS sample (real photographs) through ``domaingrad train``:
    ResNet-18 at 32x32 from scratch."""
    out = tmp_path / "run"
    record = train_on_pacs_sample(run_cli, real_photos_dir, out, "RSC")
    assert record["step"] == 1 and math.isfinite(record["loss"]) and (out / "done").exists()
    assert all(0.0 <= record[f"env{i}_in_acc"] <= 1.0 for i in range(4))


def test_hparams_are_registered_new_names_whose_draws_have_the_default_type():
    check_hparams_registered("RSC")
