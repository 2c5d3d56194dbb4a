"""RSC (DomainBed's code and the RSC authors' code, Huang et al., ECCV 2020), DropBlock,
GSNR-guided DropBlock (Listings 1 and 2 and Table 4 of the supplementary material of
Michalkiewicz et al., "Domain Generalization Guided by Gradient Signal to Noise Ratio of
Parameters", ICCV 2023) and Meta-GSNR (domaingrad's reading): updates against literal or
per-sample re-implementations, the Table 4 rows, bad hyperparameters and exact resume."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn
from torch.func import functional_call

from domaingrad import models
from domaingrad.algorithms.dropout import DropBlock, GSNRDropBlock, MetaGSNR
from domaingrad.algorithms.erm import ERM
from domaingrad.algorithms.rsc import RSC, rsc_official_feature_mask, rsc_official_muted_samples
from domaingrad.errors import DomainGradError
from domaingrad.gradients.gsnr import batch_gsnr, drop_block2d, expand_blocks, gsnr_seed_mask
from domaingrad.hparams import common_hparams
from tests.conftest import train_on_pacs_sample
from tests.gradients.test_gsnr import listing2_drop_block2d_gsnr

SHAPE = (2, 9, 9)  # input shape of StagedCNN


#: one torch thread (tests/conftest.py): small tensors gain nothing from two
pytestmark = pytest.mark.usefixtures("single_thread")


class StagedCNN(nn.Module):
    """A small featurizer with the stage interface of MNIST_CNN: three 3x3 convolutions
    (4, 6 stride 2, 6 channels), each ReLU then GroupNorm(2); stage maps (B, 4, 9, 9),
    (B, 6, 5, 5), (B, 6, 5, 5); output the spatial mean (B, 6)."""

    n_outputs = 6
    stage_names = ("conv1", "conv2", "conv3")
    stage_channels = {"conv1": 4, "conv2": 6, "conv3": 6}

    def __init__(self, input_shape):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(input_shape[0], 4, 3, padding=1),
                nn.Conv2d(4, 6, 3, 2, padding=1),
                nn.Conv2d(6, 6, 3, padding=1),
            ]
        )
        self.norms = nn.ModuleList([nn.GroupNorm(2, 4), nn.GroupNorm(2, 6), nn.GroupNorm(2, 6)])

    def blocks(self):
        return zip(self.stage_names, self.convs, self.norms)

    def forward(self, x, stage_fn=None):
        for name, conv, norm in self.blocks():
            x = norm(F.relu(conv(x)))
            if stage_fn is not None:
                x = stage_fn(name, x)
        return x.mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def staged(monkeypatch, request):
    """Every test here runs on StagedCNN, except those on MNIST_CNN or real photographs."""
    if not any(real in request.node.name for real in ("mnist_cnn", "real_pacs")):
        monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: StagedCNN(input_shape))


def build(cls, num_domains=2, seed=0, num_classes=3, **overrides):
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    assert set(overrides) <= set(hp)
    hp.update(overrides)
    torch.manual_seed(seed)
    return cls(SHAPE, num_classes, num_domains, hp)


def batches(num_domains=2, seed=0, n=3, num_classes=3, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))
        for _ in range(num_domains)
    ]


def concat(mbs):
    return torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs])


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


# -- DropBlock and DB+gsnr -------------------------------------------------------------


def stage_outputs_forward(algo, x, fn):
    """StagedCNN written out, ``fn(name, out)`` applied to each stage output."""
    for name, conv, norm in algo.featurizer.blocks():
        x = fn(name, norm(F.relu(conv(x))))
    return algo.classifier(x.mean(dim=(2, 3)))


def test_dropblock_update_drops_the_chosen_stages_with_its_generator():
    algo, ref = build(DropBlock, dropblock_p=0.3, dropblock_stages="conv1,conv3"), build(DropBlock)
    mbs = batches()
    gen = torch.Generator().set_state(algo.generator.get_state())
    x, y = concat(mbs)
    drop = {"conv1", "conv3"}
    logits = stage_outputs_forward(ref, x, lambda n, o: drop_block2d(o, 0.3, 3, gen) if n in drop else o)
    assert algo.update(mbs)["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_gsnr_dropblock_update_follows_listings_1_and_2():
    """Listing 1 (one gradient per block output, second forward with the dropout) with
    Listing 2 copied literally, M2 drawn from the global generator set to the
    algorithm's generator state."""
    p, p_gsnr = 0.2, 0.6
    algo, ref = build(GSNRDropBlock, dropblock_p=p, gsnr_p=p_gsnr), build(GSNRDropBlock)
    mbs = batches()
    images, labels = concat(mbs)
    blocks = []

    def keep(name, out):
        blocks.append(out)
        return out

    loss = F.cross_entropy(stage_outputs_forward(ref, images, keep), labels)
    grads = [torch.autograd.grad(loss, block, retain_graph=True)[0] for block in blocks]
    torch.set_rng_state(algo.generator.get_state())
    it = iter(grads)
    class_logits = stage_outputs_forward(
        ref, images, lambda n, o: listing2_drop_block2d_gsnr(o, next(it), p, p_gsnr, 3)
    )
    loss = F.cross_entropy(class_logits, labels)
    ref.optimizer.zero_grad()
    loss.backward()
    assert algo.update(mbs)["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for mine, theirs in zip(algo.network.parameters(), ref.network.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)


def test_gsnr_dropblock_default_is_table_4s_db_gsnr_without_a_bernoulli_draw():
    """Default gsnr_p = 1 (M2 = 1): no draw, so the dropped units depend on the gradients
    only; gsnr_p < 1 restores Listing 2's Bernoulli M2 (drawn from the generator)."""
    specs = {s.name: s for s in GSNRDropBlock.hparam_specs(True)}
    assert specs["gsnr_p"].default == 1.0 and specs["gsnr_p"].draw(np.random.RandomState(0)) == 1.0
    a, b = build(GSNRDropBlock), build(GSNRDropBlock)
    b.generator.manual_seed(12345)
    state_a, state_b = a.generator.get_state(), b.generator.get_state()
    for i in range(2):
        assert a.update(batches(seed=i))["loss"] == b.update(batches(seed=i))["loss"]
    assert torch.equal(a.generator.get_state(), state_a) and torch.equal(b.generator.get_state(), state_b)
    for p, q in zip(a.network.parameters(), b.network.parameters()):
        assert torch.equal(p, q)
    # Listing 2: the Bernoulli M2 makes the update depend on the generator
    c, d = build(GSNRDropBlock, gsnr_p=0.5), build(GSNRDropBlock, gsnr_p=0.5)
    d.generator.manual_seed(12345)
    state_c = c.generator.get_state()
    assert c.update(batches())["loss"] != d.update(batches())["loss"]
    assert not torch.equal(c.generator.get_state(), state_c)


def dropped_stage_features(algo, x, y, use_m1=True, use_m2=True):
    """Featurizer output of the dropout pass (GSNR pass first) with the fixed-ratio rule."""
    drop = algo.gsnr_drop(algo.stage_gradients(x, y), None, use_m1, use_m2)
    return algo.featurizer(x, stage_fn=algo.stage_hook(drop))


def test_table_4_rows_map_to_the_documented_options():
    x, y = concat(batches())
    # M1 . M2 = 0 (every block zeroed): GSNRDropBlock with dropblock_p = 1, or both switches off
    assert torch.equal(dropped_stage_features(build(GSNRDropBlock, dropblock_p=1.0), x, y), torch.zeros(6, 6))
    meta = build(MetaGSNR)
    assert torch.equal(dropped_stage_features(meta, x, y, use_m1=False, use_m2=False), torch.zeros(6, 6))
    # M2 = 1 (DB+gsnr): GSNRDropBlock's defaults = MetaGSNR with meta_gsnr_m2 off
    plain, meta = build(GSNRDropBlock), build(MetaGSNR, meta_gsnr_m2=False)
    for i in range(2):
        assert plain.update(batches(seed=i))["loss"] == meta.update(batches(seed=i))["loss"]
    for p, q in zip(plain.network.parameters(), meta.network.parameters()):
        assert torch.equal(p, q)
    # M1 = M2 = 1 (no regularisation): ERM, the same updates as GSNRDropBlock with dropblock_p = 0
    erm, none = build(ERM), build(GSNRDropBlock, dropblock_p=0.0)
    for i in range(2):
        assert erm.update(batches(seed=i))["loss"] == none.update(batches(seed=i))["loss"]
    # Meta-GSNR keeps a random M2 whose ratio starts at 0.5 (not GSNRDropBlock's 1)
    meta_specs = {s.name: s for s in MetaGSNR.hparam_specs(True)}
    assert meta_specs["gsnr_p"].default == 0.5
    assert all(r.item() == pytest.approx(0.5) for r in build(MetaGSNR).ratios().values())


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dropblock_size=4), "positive odd"),
        (dict(dropblock_p=1.5), "dropblock_p"),
        (dict(dropblock_stages="conv2,layer9"), "layer9"),
        (dict(gsnr_p=-0.1), "gsnr_p"),
    ],
)
def test_bad_hyperparameters_are_refused(overrides, match):
    with pytest.raises(DomainGradError, match=match):
        build(GSNRDropBlock, **overrides)


# -- Meta-GSNR ---------------------------------------------------------------------------


def test_meta_gsnr_without_meta_learning_is_db_gsnr():
    kw = dict(dropblock_p=0.2, gsnr_p=0.7)
    meta, plain = build(MetaGSNR, meta_gsnr_meta=False, **kw), build(GSNRDropBlock, **kw)
    for i in range(2):
        assert meta.update(batches(seed=i))["loss"] == plain.update(batches(seed=i))["loss"]
    for p, q in zip(meta.network.parameters(), plain.network.parameters()):
        assert torch.equal(p, q)
    assert all(r.item() == pytest.approx(0.7) for r in meta.ratios().values())


def test_meta_gsnr_m2_off_drops_every_top_gsnr_seed():
    meta = build(MetaGSNR, meta_gsnr_m2=False, dropblock_p=0.2)
    plain = build(GSNRDropBlock, dropblock_p=0.2, gsnr_p=1.0)
    assert meta.update(batches())["loss"] == plain.update(batches())["loss"]


def test_meta_gsnr_learns_the_ratio_through_the_meta_test_loss():
    meta = build(MetaGSNR, meta_gsnr_inner_lr=0.5)
    out = meta.update(batches())
    assert {"loss", "meta_test_loss", "gsnr_ratio_conv1"} <= set(out)
    assert any(r.grad.abs() > 0 for r in meta.ratio_logits.values())
    assert any(out[f"gsnr_ratio_{n}"] != pytest.approx(0.5, abs=1e-6) for n in meta.stages)
    # no virtual step, no dependence of the meta-test loss on the ratio
    frozen = build(MetaGSNR, meta_gsnr_inner_lr=0.0)
    frozen.update(batches())
    assert all(r.grad.abs() == 0 for r in frozen.ratio_logits.values())


def test_meta_gsnr_ratio_gradient_is_the_meta_test_derivative_through_the_seeds():
    """d L_te / d rho with the seed mask S = M1 * M2 as a leaf: dL_te/dS summed over the
    M1 positions, times dr/drho = r (1 - r) (the straight-through estimator)."""
    p, alpha = 0.3, 0.3
    meta = build(MetaGSNR, dropblock_stages="conv2", dropblock_p=p, meta_gsnr_inner_lr=alpha)
    ref = copy.deepcopy(meta)
    mbs = batches(num_domains=3)
    meta.update(mbs)
    test = int(torch.randint(3, (1,), generator=ref.generator))
    x_tr, y_tr = concat([mb for d, mb in enumerate(mbs) if d != test])
    gsnr = batch_gsnr(ref.stage_gradients(x_tr, y_tr)["conv2"])  # (6, 5, 5)
    r = ref.ratios()["conv2"].item()
    m1 = gsnr_seed_mask(gsnr, p, 1.0, 3, use_m2=False)
    seeds = (m1 * torch.empty_like(m1).bernoulli_(r, generator=ref.generator)).requires_grad_()

    def drop(name, out):
        if name != "conv2":
            return out
        keep = 1 - expand_blocks(seeds, 3)
        return out * keep * (keep.numel() / (1e-6 + keep.sum()))

    loss_tr = F.cross_entropy(ref.classifier(ref.featurizer(x_tr, stage_fn=drop)), y_tr)
    named = dict(ref.network.named_parameters())
    grads = autograd.grad(loss_tr, list(named.values()), create_graph=True)
    inner = {n: w - alpha * g for (n, w), g in zip(named.items(), grads)}
    loss_te = F.cross_entropy(functional_call(ref.network, inner, (mbs[test][0],)), mbs[test][1])
    d_seeds = autograd.grad(loss_te, seeds)[0]
    expected = (d_seeds * m1).sum() * r * (1 - r)
    assert expected.abs() > 0
    torch.testing.assert_close(meta.ratio_logits["conv2"].grad, expected, rtol=1e-4, atol=1e-9)


def test_meta_gsnr_network_gradient_is_train_plus_beta_meta_test():
    """With inner_lr 0 (theta' = theta): grad = dL_tr(dropout)/dtheta + beta dL_te/dtheta."""
    beta = 0.7
    meta = build(MetaGSNR, meta_gsnr_inner_lr=0.0, meta_gsnr_beta=beta)
    ref = copy.deepcopy(meta)
    mbs = batches(num_domains=3)
    meta.update(mbs)
    test = int(torch.randint(3, (1,), generator=ref.generator))
    train = [mb for d, mb in enumerate(mbs) if d != test]
    x_tr, y_tr = concat(train)
    drop = ref.gsnr_drop(ref.stage_gradients(x_tr, y_tr), {n: r.item() for n, r in ref.ratios().items()})
    loss_tr = F.cross_entropy(ref.classifier(ref.featurizer(x_tr, stage_fn=ref.stage_hook(drop))), y_tr)
    loss_te = F.cross_entropy(ref.network(mbs[test][0]), mbs[test][1])
    ref.optimizer.zero_grad()
    (loss_tr + beta * loss_te).backward()
    for p, q in zip(meta.network.parameters(), ref.network.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


# -- every algorithm --------------------------------------------------------------------

ALGORITHMS = [
    (RSC, {}),
    (RSC, {"rsc_variant": "official"}),
    (DropBlock, {}),
    (GSNRDropBlock, {}),
    (GSNRDropBlock, {"gsnr_p": 0.5}),
    (MetaGSNR, {}),
]
ALGORITHM_IDS = ["RSC", "RSC-official", "DropBlock", "GSNRDropBlock", "GSNRDropBlock-listing2", "MetaGSNR"]


@pytest.mark.parametrize("cls,overrides", ALGORITHMS, ids=ALGORITHM_IDS)
def test_training_state_round_trip_continues_identically(cls, overrides):
    a = build(cls, **overrides)
    before = [p.detach().clone() for p in a.network.parameters()]
    a.update(batches(seed=0))
    assert all(not torch.equal(p, q) for p, q in zip(before, a.network.parameters()))
    buf = io.BytesIO()
    torch.save(a.training_state(), buf)
    buf.seek(0)
    b = build(cls, seed=99, **overrides)
    b.load_training_state(torch.load(buf, weights_only=False))
    for i in (1, 2):
        out_a, out_b = a.update(batches(seed=i)), b.update(batches(seed=i))
        assert out_a == out_b and all(math.isfinite(v) for v in out_a.values())
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    a.eval()
    with torch.no_grad():
        assert torch.equal(a.predict(batches()[0][0]), a.network(batches()[0][0]))


@pytest.mark.parametrize("cls,overrides", ALGORITHMS, ids=ALGORITHM_IDS)
def test_trains_on_mnist_cnn(cls, overrides):
    """DomainBed's MNIST_CNN with ColoredMNIST-shaped inputs (2, 28, 28), 2 per domain."""
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    hp.update(overrides)
    torch.manual_seed(0)
    algo = cls((2, 28, 28), 2, 2, hp)
    before = [p.detach().clone() for p in algo.network.parameters()]
    out = algo.update(batches(n=2, num_classes=2, shape=(2, 28, 28)))
    assert all(math.isfinite(v) for v in out.values())
    assert all(not torch.equal(p, q) for p, q in zip(before, algo.network.parameters()))
    assert algo.predict(torch.zeros(3, 2, 28, 28)).shape == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RSC", "GSNRDropBlock"])
def test_trains_on_real_pacs_photos_with_resnet18(real_photos_dir, run_cli, tmp_path, name):
    """A few steps on the PACS sample (real photographs) through ``domaingrad train``:
    ResNet-18 at 32x32 from scratch (stage maps 8x8 .. 1x1, so DB+gsnr's blocks clamp)."""
    out = tmp_path / "run"
    record = train_on_pacs_sample(run_cli, real_photos_dir, out, name)
    assert record["step"] == 1 and math.isfinite(record["loss"]) and (out / "done").exists()
    assert all(0.0 <= record[f"env{i}_in_acc"] <= 1.0 for i in range(4))


@pytest.mark.parametrize("name", ["DMG", "MultiHeaded", "RSC", "DropBlock", "GSNRDropBlock", "MetaGSNR"])
def test_hparams_are_registered_new_names_whose_draws_have_the_default_type(name):
    from domaingrad.algorithms import algorithm_class
    from domaingrad.registry import hparam_specs

    for small, dataset in ((True, "ColoredMNIST"), (False, "PACS")):
        common = {s.name for s in common_hparams(small)}
        specs = algorithm_class(name).hparam_specs(small)
        assert not {s.name for s in specs} & common
        assert set(hparam_specs(name, dataset)) == common | {s.name for s in specs}
        for spec in specs:
            draws = [spec.draw(np.random.RandomState(seed)) for seed in range(10)]
            assert all(type(d) is type(spec.default) for d in draws), spec.name
            assert spec.choices is None or (spec.default in spec.choices and set(draws) <= set(spec.choices))
