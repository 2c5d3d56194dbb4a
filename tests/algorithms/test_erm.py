"""ERM and the algorithm contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from domaingrad.algorithms import ALGORITHMS, ERM, algorithm_class
from domaingrad.errors import DomainGradError
from domaingrad.registry import default_hparams


def make_erm(seed: int = 0) -> ERM:
    torch.manual_seed(seed)
    return ERM((2, 28, 28), 2, 2, default_hparams("ERM", "ColoredMNIST"))


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 2, 28, 28, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(2)]


def test_update_is_one_adam_step_on_the_concatenated_batch():
    algo, ref = make_erm(), make_erm()
    mb = batches()
    out = algo.update(mb)
    assert set(out) == {"loss"} and isinstance(out["loss"], float)
    # the same step by hand
    opt = torch.optim.Adam(ref.network.parameters(), lr=1e-3)
    x, y = torch.cat([b[0] for b in mb]), torch.cat([b[1] for b in mb])
    loss = F.cross_entropy(ref.network(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for p, q in zip(algo.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_loss_decreases_on_a_fixed_batch():
    algo = make_erm()
    mb = batches()
    for x, y in mb:  # learnable: the label says which channel is lit
        x[torch.arange(len(y)), 1 - y] = 0
    losses = [algo.update(mb)["loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    assert algo.predict(mb[0][0]).shape == (8, 2)


def test_training_state_round_trip_continues_identically():
    a = make_erm()
    for i in range(3):
        a.update(batches(i))
    state = a.training_state()
    b = make_erm(seed=99)
    b.load_training_state(state)
    for i in range(3, 6):
        assert a.update(batches(i)) == b.update(batches(i))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_registry():
    assert algorithm_class("ERM") is ERM and "ERM" in ALGORITHMS
    with pytest.raises(DomainGradError, match="valid algorithms: ERM"):
        algorithm_class("EMR")
