"""DropBlock, GSNR-guided DropBlock (Listings 1 and 2 and Table 4 of the supplementary material of
Michalkiewicz et al., "Domain Generalization Guided by Gradient Signal to Noise Ratio of
Parameters", ICCV 2023) and Meta-GSNR (domaingrad's reading): updates against literal or
per-sample re-implementations, the Table 4 rows, bad hyperparameters and exact resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd
from torch.func import functional_call

from domaingrad.algorithms.dropout import DropBlock, GSNRDropBlock, MetaGSNR
from domaingrad.algorithms.erm import ERM
from domaingrad.errors import DomainGradError
from domaingrad.gradients.gsnr import batch_gsnr, drop_block2d, expand_blocks, gsnr_seed_mask
from tests.algorithms.staged import (
    batches,
    build,
    check_hparams_registered,
    check_round_trip,
    check_trains_on_mnist_cnn,
    concat,
)
from tests.conftest import train_on_pacs_sample
from tests.gradients.test_gsnr import listing2_drop_block2d_gsnr

#: one torch thread (tests/conftest.py); StagedCNN as the featurizer (tests/algorithms/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread", "staged_cnn")


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
    unmasked = loss.item()
    grads = [torch.autograd.grad(loss, block, retain_graph=True)[0] for block in blocks]
    torch.set_rng_state(algo.generator.get_state())
    it = iter(grads)
    class_logits = stage_outputs_forward(
        ref, images, lambda n, o: listing2_drop_block2d_gsnr(o, next(it), p, p_gsnr, 3)
    )
    loss = F.cross_entropy(class_logits, labels)
    ref.optimizer.zero_grad()
    loss.backward()
    out = algo.update(mbs)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for mine, theirs in zip(algo.network.parameters(), ref.network.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)
    # the supplement's Gamma (Fig. 1): |loss of the GSNR pass - loss of the dropout pass|
    assert abs(unmasked - loss.item()) > 1e-3
    assert out["loss_gap"] == pytest.approx(abs(unmasked - loss.item()), abs=1e-6)


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


def test_dropblock_and_gsnr_dropblock_at_p_zero_log_a_zero_loss_gap_only_where_it_is_free():
    """p = 0: the dropout pass is the unmasked pass, so Gamma is exactly 0. Plain DropBlock
    has no unmasked pass (it would cost a forward) and logs no loss_gap."""
    assert build(GSNRDropBlock, dropblock_p=0.0).update(batches())["loss_gap"] == 0.0
    assert build(MetaGSNR, dropblock_p=0.0, meta_gsnr_meta=False).update(batches())["loss_gap"] == 0.0
    assert "loss_gap" not in build(DropBlock).update(batches())


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
    out = meta.update(mbs)
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
    # loss_gap on the meta-train batch: |unmasked CE - CE of the dropout pass|
    with torch.no_grad():
        gap = abs(F.cross_entropy(ref.network(x_tr), y_tr).item() - loss_tr.item())
    assert gap > 1e-3 and out["loss_gap"] == pytest.approx(gap, abs=1e-6)


# -- every algorithm --------------------------------------------------------------------

ALGORITHMS = [
    (DropBlock, {}),
    (GSNRDropBlock, {}),
    (GSNRDropBlock, {"gsnr_p": 0.5}),
    (MetaGSNR, {}),
]
ALGORITHM_IDS = ["DropBlock", "GSNRDropBlock", "GSNRDropBlock-listing2", "MetaGSNR"]


@pytest.mark.parametrize("cls,overrides", ALGORITHMS, ids=ALGORITHM_IDS)
def test_training_state_round_trip_continues_identically(cls, overrides):
    check_round_trip(cls, overrides)


@pytest.mark.parametrize("cls,overrides", ALGORITHMS, ids=ALGORITHM_IDS)
def test_trains_on_mnist_cnn(cls, overrides):
    check_trains_on_mnist_cnn(cls, overrides)


@pytest.mark.slow
def test_trains_on_real_pacs_photos_with_resnet18(real_photos_dir, run_cli, tmp_path):
    """A few steps on the PACS sample (real photographs) through ``domaingrad train``:
    ResNet-18 at 32x32 from scratch (stage maps 8x8 .. 1x1, so DB+gsnr's blocks clamp)."""
    out = tmp_path / "run"
    record = train_on_pacs_sample(run_cli, real_photos_dir, out, "GSNRDropBlock")
    assert record["step"] == 1 and math.isfinite(record["loss"]) and (out / "done").exists()
    assert all(0.0 <= record[f"env{i}_in_acc"] <= 1.0 for i in range(4))


@pytest.mark.parametrize("name", ["DMG", "MultiHeaded", "DropBlock", "GSNRDropBlock", "MetaGSNR"])
def test_hparams_are_registered_new_names_whose_draws_have_the_default_type(name):
    check_hparams_registered(name)
