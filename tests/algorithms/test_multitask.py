"""MTL (marginal transfer learning, DomainBed's neural version): the embedding, the loss
and the update, each checked against the formula written out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad.algorithms.multitask import MTL
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import adam_step, assert_same_params, batches, build, params_of, tiny  # noqa: F401


def test_hparams_are_domainbeds():
    specs = {s.name: s for s in MTL.hparam_specs(True)}
    assert [(s.name, s.default) for s in MTL.hparam_specs(False)] == [(n, s.default) for n, s in specs.items()]
    assert specs["mtl_ema"].default == 0.99
    draws = {specs["mtl_ema"].draw(np.random.RandomState(seed)) for seed in range(40)}
    assert draws == {0.5, 0.9, 0.99, 1.0}
    assert specs["mtl_embedding"].default == "mean" and specs["mtl_embedding"].choices == ("mean", "domainbed")
    assert MTL.eval_batch_size == 64  # DomainBed's evaluation batches: the batch mean is the test embedding


@pytest.mark.usefixtures("tiny")
def test_classifier_sees_features_and_the_domain_embedding():
    """e_d = ema * mean_i f(x_di) + (1 - ema) * E_d (E_d = 0 at first), logits =
    W [f(x_di), e_d] + b, loss = sum_d CE_d; the step is Adam on that loss."""
    algo = build(MTL, mtl_ema=0.75)
    ref = copy.deepcopy(algo)
    mb = batches(2, n=5)

    def objective(net):
        total = 0
        for x, y in mb:
            f = net.featurizer(x)
            e = 0.75 * f.mean(0) + 0.25 * torch.zeros(f.shape[1])
            logits = f @ net.classifier.weight[:, :5].T + e @ net.classifier.weight[:, 5:].T + net.classifier.bias
            total = total + F.cross_entropy(logits, y)
        return total

    with torch.no_grad():
        features = [ref.featurizer(x) for x, _ in mb]
    expected_loss = adam_step(ref, objective)
    out = algo.update(mb)
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert_same_params(algo, ref)
    for d, f in enumerate(features):
        assert torch.allclose(algo.embeddings[d], 0.75 * f.mean(0), atol=1e-6)


@pytest.mark.usefixtures("tiny")
def test_embeddings_are_an_ema_with_the_current_mean_weighted_by_mtl_ema():
    algo = build(MTL, mtl_ema=0.5)
    x = batches(1, n=4)[0][0]
    with torch.no_grad():
        f = algo.featurizer(x)
        algo.predict(x, 0)
        algo.predict(x, 0)
    # E = 0.5 m, then 0.5 m + 0.5 * 0.5 m = 0.75 m
    assert torch.allclose(algo.embeddings[0], 0.75 * f.mean(0), atol=1e-6)
    assert torch.equal(algo.embeddings[1], torch.zeros(5))


@pytest.mark.usefixtures("tiny")
def test_prediction_without_a_domain_uses_the_batch_mean_and_leaves_the_buffer():
    algo = build(MTL)
    x = batches(1, n=6)[0][0]
    with torch.no_grad():
        f = algo.featurizer(x)
        want = algo.classifier(torch.cat([f, f.mean(0).expand_as(f)], 1))
        got = algo.predict(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(algo.embeddings, torch.zeros(2, 5))
    # the embedding changes the prediction: a sample's logits depend on the other samples
    with torch.no_grad():
        assert not torch.allclose(algo.predict(x[:3])[0], got[0], atol=1e-4)


@pytest.mark.usefixtures("tiny")
def test_domainbed_variant_feeds_standard_normal_noise_in_place_of_the_embedding():
    algo = build(MTL, mtl_embedding="domainbed")
    x = batches(1, n=4)[0][0]
    with torch.no_grad():
        f = algo.featurizer(x)
        torch.manual_seed(11)
        got = algo.predict(x, 1)
        torch.manual_seed(11)
        noise = torch.empty(4, 5).normal_()
    assert torch.allclose(got, algo.classifier(torch.cat([f, noise], 1)), atol=1e-6)
    # the buffer is still updated (DomainBed keeps the EMA it never uses)
    assert torch.allclose(algo.embeddings[1], 0.99 * f.mean(0), atol=1e-6)


def test_update_on_mnist_cnn_changes_every_parameter():
    algo = build(MTL, shape=(2, 28, 28), num_classes=2)
    before = params_of(algo)
    out = algo.update(batches(shape=(2, 28, 28), num_classes=2))
    assert type(out["loss"]) is float and math.isfinite(out["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))
    assert algo.classifier.in_features == 256


@pytest.mark.usefixtures("tiny")
def test_unknown_embedding_is_refused():
    with pytest.raises(DomainGradError, match="mtl_embedding"):
        build(MTL, mtl_embedding="kernel")


@pytest.mark.slow
@pytest.mark.parametrize("embedding", ["mean", "domainbed"])
def test_mtl_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, embedding):
    hparams = f'{{"batch_size": 8, "mtl_embedding": "{embedding}"}}'
    record = train_by_spec(run_cli, tiny_mnist_dir, tmp_path / "run", "domaingrad.algorithms.multitask:MTL", hparams)
    assert math.isfinite(record["loss"]) and record["hparams"]["mtl_embedding"] == embedding
    assert 0 <= record["env2_out_acc"] <= 1
