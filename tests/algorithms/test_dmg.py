"""DMG and the Multi-Headed baseline (Chattopadhyay, Balaji, Hoffman, "Learning to Balance
Specificity and Invariance for In and Out of Domain Generalization", ECCV 2020):
straight-through masks, the soft-IoU penalty (summed or averaged over domain pairs), the
three predictions and the own-domain hard-mask source evaluation against hand-written
forwards, mask statistics, resume."""

from __future__ import annotations

import io
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from domaingrad import models
from domaingrad.algorithms.dmg import (
    DMG,
    MultiHeaded,
    mask_statistics,
    pairwise_mask_iou,
    resolve_layers,
    soft_iou,
)
from domaingrad.errors import DomainGradError
from domaingrad.hparams import common_hparams
from tests.algorithms.staged import SHAPE, StagedCNN
from tests.algorithms.staged import build as build_algorithm
from tests.conftest import train_on_pacs_sample

#: one torch thread (tests/conftest.py): small tensors gain nothing from two
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def staged(monkeypatch, request):
    """Every test here runs on StagedCNN (stages conv1..conv3), except those on MNIST_CNN,
    AlexNet or real photographs."""
    if not any(real in request.node.name for real in ("mnist_cnn", "real_pacs", "alexnet")):
        monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: StagedCNN(input_shape))


def build(cls, num_domains=3, **kwargs):
    """test_dropout's builder with three training domains by default."""
    return build_algorithm(cls, num_domains=num_domains, **kwargs)


def batches(num_domains=3, seed=0, n=4, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *SHAPE, generator=g), torch.randint(0, num_classes, (n,), generator=g))
        for _ in range(num_domains)
    ]


def randomise_masks(algo, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logits in algo.mask_logits.values():
            logits.copy_(2 * torch.randn(logits.shape, generator=g))


def manual_logits(algo, x, masks):
    """StagedCNN written out: conv -> ReLU -> GroupNorm x3, masks (per channel) on the
    conv1 and conv2 outputs (the "auto" placement) and on the pooled features, then the
    linear classifier."""
    (_, c1, n1), (_, c2, n2), (_, c3, n3) = algo.featurizer.blocks()
    h = n1(F.relu(c1(x))) * masks["conv1"][:, :, None, None]
    h = n2(F.relu(c2(h))) * masks["conv2"][:, :, None, None]
    h = n3(F.relu(c3(h))).mean(dim=(2, 3)) * masks["features"]
    return algo.classifier(h)


def test_soft_iou_matches_its_formula():
    m_i, m_j = torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0.6, 0.1, 0.5])
    inter, union = 0.2 * 0.6 + 0.9 * 0.1 + 0.25, (0.8 - 0.12) + (1.0 - 0.09) + (1.0 - 0.25)
    assert soft_iou(m_i, m_j).item() == pytest.approx((inter + 1e-6) / (union + 1e-6), rel=1e-6)


def hand_overlap(probs, reduce):
    """Sum over layers of ``reduce`` over the three domain pairs of soft_iou, in Python."""
    total = 0.0
    for p in probs.values():
        pairs = [float(soft_iou(p[i], p[j]).detach()) for i, j in itertools.combinations(range(3), 2)]
        assert len(pairs) == 3
        total += reduce(pairs)
    return total


def test_overlap_penalty_sums_over_pairs_paper_or_averages_them_official():
    """Eq. (2) sums the soft IoU over domain pairs ("sum"); the official code divides by
    the number of pairs ("mean"). Both sum over layers. With D = 3 there are 3 pairs."""
    paper, official = build(DMG, dmg_overlap_reduction="sum"), build(DMG, dmg_overlap_reduction="mean")
    for algo in (paper, official):
        randomise_masks(algo)
    probs = paper.soft_masks()
    summed = paper.overlap_penalty(probs).detach().item()
    averaged = official.overlap_penalty(official.soft_masks()).detach().item()
    assert summed == pytest.approx(hand_overlap(probs, sum), rel=1e-6)
    assert averaged == pytest.approx(hand_overlap(probs, lambda v: sum(v) / 3), rel=1e-6)
    assert summed == pytest.approx(3 * averaged, rel=1e-6)


def test_overlap_reduction_defaults_to_the_papers_sum():
    specs = {s.name: s for s in DMG.hparam_specs(True) + DMG.hparam_specs(False)}
    assert specs["dmg_overlap_reduction"].default == "sum"
    assert set(specs["dmg_overlap_reduction"].choices) == {"sum", "mean"}
    algo = build(DMG)  # every hyperparameter at its default
    assert algo.hparams["dmg_overlap_reduction"] == "sum"
    randomise_masks(algo)
    probs = {n: p.detach() for n, p in algo.soft_masks().items()}  # the masks the update's penalty sees
    out = algo.update(batches())
    assert out["siou"] == pytest.approx(hand_overlap(probs, sum), rel=1e-6)
    assert out["loss"] == pytest.approx(out["ce"] + 0.1 * out["siou"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dmg_overlap_reduction="max"), "dmg_overlap_reduction"),
        (dict(dmg_source_predict="soft"), "dmg_source_predict"),
        (dict(dmg_predict="vote"), "dmg_predict"),
    ],
)
def test_bad_hyperparameters_are_refused(overrides, match):
    with pytest.raises(DomainGradError, match=match):
        build(DMG, **overrides)


def test_source_evaluation_uses_each_domains_own_hard_mask_or_the_test_rule():
    """``dmg_source_predict`` "own_hard" (official validation): a sample of training
    domain d is classified with the hard mask m^d > 0.5 of its own domain; "test_rule"
    (default) is ``predict``, which the test environments always use."""
    algo = build(DMG, dmg_source_predict="own_hard")
    randomise_masks(algo)
    algo.eval()
    probs = algo.soft_masks()
    hard = {n: (p > 0.5).float() for n, p in probs.items()}
    assert not torch.equal(hard["conv1"][0], hard["conv1"][1])  # domains 0 and 1 really differ
    x = batches(n=5)[0][0]
    with torch.no_grad():
        own = [algo.predict_source(x, d) for d in range(3)]
        expected = [manual_logits(algo, x, {n: h[d].expand(5, -1) for n, h in hard.items()}) for d in range(3)]
        test_rule = algo.predict(x)
        per_domain = torch.stack(
            [manual_logits(algo, x, {n: p[d].expand(5, -1) for n, p in probs.items()}) for d in range(3)]
        )
    for d in range(3):
        torch.testing.assert_close(own[d], expected[d], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(own[0], own[1], atol=1e-4)
    assert not torch.allclose(F.softmax(own[0], 1), F.softmax(test_rule, 1), atol=1e-4)
    torch.testing.assert_close(F.softmax(test_rule, 1), F.softmax(per_domain, 2).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(DomainGradError, match="training-domain index"):
        algo.predict_source(x, 3)
    assert {s.name: s.default for s in DMG.hparam_specs(True)}["dmg_source_predict"] == "test_rule"
    algo.hparams["dmg_source_predict"] = "test_rule"
    with torch.no_grad():
        torch.testing.assert_close(algo.predict_source(x, 1), test_rule, rtol=0, atol=0)
        heads = build(MultiHeaded)  # the Algorithm default: predict_source is predict
        torch.testing.assert_close(heads.predict_source(x, 2), heads.predict(x), rtol=0, atol=0)


def test_straight_through_gradient_reaches_the_mask_logits():
    """With dmg_lambda = 0 only the cross-entropy reaches the masks; its gradient equals
    dCE/dmask (at the sampled hard mask) summed over each domain's samples, times sigmoid'."""
    algo = build(DMG, dmg_lambda=0.0)
    randomise_masks(algo)
    mbs = batches()
    state = algo.generator.get_state()
    before = {n: p.detach().clone() for n, p in algo.mask_logits.items()}
    algo.update(mbs)
    # the same hard masks, drawn from the same generator state in the same order
    gen = torch.Generator().set_state(state)
    domain = torch.arange(3).repeat_interleave(4)
    probs = {n: torch.sigmoid(v) for n, v in before.items()}
    hard = {n: torch.bernoulli(p[domain], generator=gen).requires_grad_() for n, p in probs.items()}
    fresh = build(DMG, dmg_lambda=0.0)  # the network weights before the step (same seed as `algo`)
    x = torch.cat([x for x, _ in mbs])
    y = torch.cat([y for _, y in mbs])
    F.cross_entropy(manual_logits(fresh, x, hard), y).backward()
    for n, p in probs.items():
        sums = torch.zeros_like(p).index_add_(0, domain, hard[n].grad)
        expected = sums * p * (1 - p)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(algo.mask_logits[n].grad, expected, rtol=1e-4, atol=1e-7)


def test_update_returns_mask_statistics_of_the_current_masks():
    algo = build(DMG)
    out = algo.update(batches())
    assert {"loss", "ce", "siou"} <= set(out)
    for name, p in algo.soft_masks().items():
        iou, active = mask_statistics(p)
        assert out[f"mask_iou_{name}"] == iou and out[f"mask_active_{name}"] == active
    assert out["loss"] == pytest.approx(out["ce"] + 0.1 * out["siou"], rel=1e-6)


def test_mask_statistics_binarise_at_one_half():
    probs = torch.tensor([[0.9, 0.6, 0.1, 0.2], [0.7, 0.3, 0.8, 0.1], [0.2, 0.1, 0.1, 0.1]])
    iou, active = mask_statistics(probs)
    assert iou == pytest.approx((1 / 3 + 0 + 0) / 3) and active == pytest.approx(4 / 12)
    assert mask_statistics(torch.zeros(2, 3)) == (1.0, 0.0)  # two empty masks are identical


def test_pred_ens_mask_ens_and_kd_against_manual_forwards():
    algo = build(DMG)
    randomise_masks(algo)
    algo.eval()
    x = batches(n=5)[0][0]
    probs = algo.soft_masks()
    with torch.no_grad():
        per_domain = torch.stack(
            [manual_logits(algo, x, {n: p[d].expand(5, -1) for n, p in probs.items()}) for d in range(3)]
        )
        mean_mask = manual_logits(algo, x, {n: p.mean(0).expand(5, -1) for n, p in probs.items()})
        hard_kd = manual_logits(algo, x, {n: (p[1] > 0.5).float().expand(5, -1) for n, p in probs.items()})
        results = {}
        for mode in DMG.PREDICT:
            algo.hparams["dmg_predict"] = mode
            results[mode] = algo.predict(x)
        kd = [algo.predict_domain(x, d) for d in range(3)]
        kd_hard = algo.predict_domain(x, 1, hard=True)
    for d in range(3):
        torch.testing.assert_close(kd[d], per_domain[d], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_hard, hard_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        F.softmax(results["pred_ens"], 1), F.softmax(per_domain, 2).mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(results["pred_ens_logits"], per_domain.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["mask_ens"], mean_mask, rtol=1e-5, atol=1e-6)
    outs = [F.softmax(results[m], 1) for m in DMG.PREDICT] + [F.softmax(kd[0], 1), F.softmax(kd_hard, 1)]
    for a, b in itertools.combinations(outs, 2):  # the five predictions really differ
        assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(DomainGradError, match="training-domain index"):
        algo.predict_domain(x, 3)


def test_predict_ensemble_gives_each_test_rule_whatever_dmg_predict_is():
    """Pred-Ens and Mask-Ens of one model side by side (appendix Table 5): each mode equals
    ``predict`` under that ``dmg_predict``, and combine_domain_logits of the per-domain
    logits is Pred-Ens."""
    algo = build(DMG)
    randomise_masks(algo)
    algo.eval()
    x = batches(n=5)[0][0]
    with torch.no_grad():
        each = algo.predict_each_domain(x)
        for mode in DMG.PREDICT:
            got = algo.predict_ensemble(x, mode)
            algo.hparams["dmg_predict"] = mode
            torch.testing.assert_close(got, algo.predict(x), rtol=0, atol=0)
        algo.hparams["dmg_predict"] = "pred_ens"  # the others stay reachable
        assert not torch.allclose(algo.predict_ensemble(x, "mask_ens"), algo.predict(x), atol=1e-4)
        for mode in ("pred_ens", "pred_ens_logits"):
            torch.testing.assert_close(DMG.combine_domain_logits(each, mode), algo.predict_ensemble(x, mode))
    with pytest.raises(DomainGradError, match="ensemble mode"):
        algo.predict_ensemble(x, "vote")


def test_pairwise_mask_iou_of_identical_disjoint_and_empty_masks():
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.7, 0.6, 0.3, 0.1], [0.1, 0.2, 0.9, 0.6], [0.0, 0.1, 0.2, 0.3]])
    iou = pairwise_mask_iou(probs)
    # domains 0 and 1 both keep units {0, 1}; domain 2 keeps {2, 3}; domain 3 keeps none
    expected = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert torch.equal(iou, expected)
    assert pairwise_mask_iou(torch.zeros(2, 3)).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # the mean over pairs is mask_statistics' IoU
    i, j = torch.triu_indices(4, 4, offset=1)
    assert mask_statistics(probs)[0] == pytest.approx(float(iou[i, j].mean()))


def test_layers_follow_the_official_placement_or_the_hparam():
    cnn = SimpleNamespace(stage_names=("conv1", "conv2", "conv3", "conv4"))
    resnet = SimpleNamespace(stage_names=("layer1", "layer2", "layer3", "layer4"))
    alexnet = SimpleNamespace(stage_names=("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6"))
    assert resolve_layers(cnn, "auto") == ("conv2", "conv3", "features")
    assert resolve_layers(resnet, "auto") == ("layer2", "layer3", "features")
    assert resolve_layers(alexnet, "auto") == ("pool5", "fc6", "features")
    assert resolve_layers(resnet, "features, layer4") == ("layer4", "features")
    with pytest.raises(DomainGradError, match="layer9"):
        resolve_layers(resnet, "layer9,features")
    algo = build(DMG, dmg_layers="conv3")
    assert list(algo.mask_logits) == ["conv3"] and algo.mask_logits["conv3"].shape == (3, 6)
    algo.update(batches())
    assert algo.predict(torch.zeros(2, *SHAPE)).shape == (2, 3)


def test_mask_logits_start_uniform_in_zero_one_and_train():
    algo = build(DMG)
    for logits in algo.mask_logits.values():
        assert logits.min() >= 0 and logits.max() < 1
    before = {n: p.detach().clone() for n, p in algo.mask_logits.items()}
    algo.update(batches())
    assert all(not torch.equal(before[n], p) for n, p in algo.mask_logits.items())


def test_multiheaded_trains_each_head_on_its_domain_and_averages_at_test():
    algo = build(MultiHeaded, num_domains=2)
    mbs = batches(num_domains=2)
    fresh = build(MultiHeaded, num_domains=2)
    algo.update(mbs)
    losses = [F.cross_entropy(fresh.heads[d](fresh.featurizer(x)), y, reduction="sum") for d, (x, y) in enumerate(mbs)]
    (sum(losses) / 8).backward()
    for mine, ref in zip(algo.parameters(), fresh.parameters()):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-7)
    algo.eval()
    x = batches(n=5)[0][0]
    with torch.no_grad():
        heads = torch.stack([h(algo.featurizer(x)) for h in algo.heads])
        torch.testing.assert_close(F.softmax(algo.predict(x), 1), F.softmax(heads, 2).mean(0), rtol=1e-5, atol=1e-6)
        algo.hparams["multihead_predict"] = "logits"
        torch.testing.assert_close(algo.predict(x), heads.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DMG, MultiHeaded], ids=lambda c: c.__name__)
def test_training_state_round_trip_continues_identically(cls):
    a = build(cls)
    for i in range(2):
        a.update(batches(seed=i))
    buf = io.BytesIO()
    torch.save(a.training_state(), buf)
    buf.seek(0)
    b = build(cls, seed=99)
    b.load_training_state(torch.load(buf, weights_only=False))
    for i in range(2, 4):
        out_a, out_b = a.update(batches(seed=i)), b.update(batches(seed=i))
        assert out_a == out_b and all(math.isfinite(v) for v in out_a.values())
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [DMG, MultiHeaded], ids=lambda c: c.__name__)
def test_trains_on_mnist_cnn(cls):
    """DomainBed's MNIST_CNN with ColoredMNIST-shaped inputs (2, 28, 28), 2 per domain;
    DMG masks conv2, conv3 (128 channels each) and the 128 features."""
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    torch.manual_seed(0)
    algo = cls((2, 28, 28), 2, 2, hp)
    g = torch.Generator().manual_seed(0)
    mbs = [(torch.randn(2, 2, 28, 28, generator=g), torch.randint(0, 2, (2,), generator=g)) for _ in range(2)]
    before = [p.detach().clone() for p in algo.parameters()]
    out = algo.update(mbs)
    assert all(math.isfinite(v) for v in out.values())
    assert all(not torch.equal(p, q) for p, q in zip(before, algo.parameters()))
    if cls is DMG:
        assert {n: tuple(p.shape) for n, p in algo.mask_logits.items()} == {
            "conv2": (2, 128),
            "conv3": (2, 128),
            "features": (2, 128),
        }
    assert algo.predict(torch.zeros(3, 2, 28, 28)).shape == (3, 2)


@pytest.mark.slow
def test_dmg_trains_on_real_pacs_photos_with_resnet18(real_photos_dir, run_cli, tmp_path):
    """A few DMG steps on the PACS sample through ``domaingrad train`` (ResNet-18 at 32x32,
    from scratch): masks on layer2, layer3 and the features; statistics in the records."""
    out = tmp_path / "run"
    record = train_on_pacs_sample(run_cli, real_photos_dir, out, "DMG")
    assert record["step"] == 1 and (out / "done").exists()
    for layer in ("layer2", "layer3", "features"):
        assert 0.0 <= record[f"mask_iou_{layer}"] <= 1.0 and 0.0 <= record[f"mask_active_{layer}"] <= 1.0


def test_dmg_on_alexnet_masks_fc6_fc7_fc8_inputs_with_dropout_off():
    """The official AlexNet placement on helper C's featurizer at 64x64: pool5 (fc6 input,
    9216 units), fc6 (fc7 input) and the features (fc8 input); drop6/drop7 off."""
    hp = {s.name: s.default for s in common_hparams(False) + DMG.hparam_specs(False)}
    hp["backbone"] = "alexnet"
    torch.manual_seed(0)
    algo = DMG((3, 64, 64), 7, 2, hp)
    assert algo.layers == ("pool5", "fc6", "features")
    assert {n: tuple(p.shape) for n, p in algo.mask_logits.items()} == {
        "pool5": (2, 9216),
        "fc6": (2, 4096),
        "features": (2, 4096),
    }
    assert algo.featurizer.drop6.p == 0.0 and algo.featurizer.drop7.p == 0.0
    algo.eval()
    with torch.no_grad():
        assert algo.predict(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
