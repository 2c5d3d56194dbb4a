"""Meta-learning baselines: MLDG and Fish.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` ``MLDG`` and ``Fish``, ``domainbed/lib/misc.py``
``split_meta_train_test``, ``domainbed/hparams_registry.py``; Gulrajani & Lopez-Paz,
ICLR 2021).
"""

from __future__ import annotations

import copy
from itertools import cycle
from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd

from ..hparams import HParam
from .base import Minibatches
from .erm import ERM

Pair = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def split_meta_train_test(minibatches: Minibatches, num_meta_test: int, generator: torch.Generator) -> list[Pair]:
    """DomainBed's ``split_meta_train_test``: randomly permute the D domains; the first
    D - num_meta_test are meta-train, the last num_meta_test meta-test; pair each
    meta-train domain with the meta-test domains in turn (``zip`` with ``cycle``), both
    batches cut to the shorter length. Returns D - num_meta_test pairs
    ((x_train, y_train), (x_test, y_test)); none when num_meta_test >= D."""
    n = len(minibatches)
    perm = torch.randperm(n, generator=generator).tolist()
    meta_train, meta_test = perm[: n - num_meta_test], perm[n - num_meta_test :]
    pairs = []
    for i, j in zip(meta_train, cycle(meta_test)):
        (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
        m = min(len(xi), len(xj))
        pairs.append(((xi[:m], yi[:m]), (xj[:m], yj[:m])))
    return pairs


class MLDG(ERM):
    """Meta-Learning for Domain Generalization (Li et al. AAAI 2018, arXiv:1710.03463),
    DomainBed's first-order version.

    For each (meta-train i, meta-test j) pair of :func:`split_meta_train_test`: clone
    the network, take one step of a fresh Adam on CE_i on the clone (gradient G_i),
    then compute G_j = grad CE_j at the clone's updated weights. The network's gradient
    is sum over pairs of (G_i + ``mldg_beta`` * G_j) / D, followed by one Adam step.
    The logged loss is sum over pairs of (CE_i + beta * CE_j) / D (DomainBed).

    Hyperparameters (DomainBed ``hparams_registry``): ``mldg_beta`` 1.0, search
    10**U(-1, 1); ``n_meta_test`` 2, search choice [1, 2].

    Deviations:

    * DomainBed splits with ``n_meta_test`` meta-test domains, so its default of 2
      leaves *no* meta-train domain when only 2 domains are trained on (Colored MNIST):
      no pair, a zero gradient and no learning at all. Here the number of meta-test
      domains is ``min(n_meta_test, D - 1)`` (at least 1), so with two domains MLDG
      uses one meta-train and one meta-test domain; with D >= 3 nothing changes.
    * The split permutation comes from ``self.generator`` (a ``torch.Generator`` seeded
      from the global torch RNG at construction, saved by ``training_state``) instead
      of the global RNG, so resumed runs continue identically.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "mldg_beta",
                1.0,
                lambda r: float(10 ** r.uniform(-1, 1)),
                "weight of the meta-test gradient (DomainBed: 1.0, 10**U(-1,1))",
            ),
            HParam(
                "n_meta_test",
                2,
                lambda r: int(r.choice([1, 2])),
                "meta-test domains per step, capped at D-1 (DomainBed: 2, choice [1,2])",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def num_meta_test(self, num_domains: int) -> int:
        """min(n_meta_test, num_domains - 1), at least 1 (see the class docstring)."""
        return max(1, min(self.hparams["n_meta_test"], num_domains - 1))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        num_mb = len(minibatches)
        beta = self.hparams["mldg_beta"]
        params = list(self.network.parameters())
        self.optimizer.zero_grad(set_to_none=True)  # so the clones carry no gradient
        grads = [torch.zeros_like(p) for p in params]
        objective = 0.0
        for (xi, yi), (xj, yj) in split_meta_train_test(minibatches, self.num_meta_test(num_mb), self.generator):
            inner_net = copy.deepcopy(self.network)
            inner_params = list(inner_net.parameters())
            inner_opt = self.make_optimizer(inner_params)
            inner_obj = F.cross_entropy(inner_net(xi), yi)
            inner_opt.zero_grad(set_to_none=True)
            inner_obj.backward()
            inner_opt.step()
            # G_i, taken at the network's weights (the clone's before its step)
            for g, p in zip(grads, inner_params):
                if p.grad is not None:
                    g.add_(p.grad / num_mb)
            objective += inner_obj.item()
            # G_j at the clone's updated weights (first-order MLDG)
            loss_j = F.cross_entropy(inner_net(xj), yj)
            grads_j = autograd.grad(loss_j, inner_params, allow_unused=True)
            objective += beta * loss_j.item()
            for g, g_j in zip(grads, grads_j):
                if g_j is not None:
                    g.add_(beta * g_j / num_mb)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        return {"loss": objective / num_mb}


class Fish(ERM):
    """Fish, gradient matching for domain generalization (Shi et al. ICLR 2022,
    arXiv:2104.09937, Algorithm 1), as in DomainBed.

    Each step: copy the network's weights theta into the clone ``network_inner``; take
    one step of the inner Adam (``lr``, ``weight_decay``) per domain in sequence on the
    clone (CE of that domain's batch); then theta += ``meta_lr`` * (theta_inner - theta).
    The logged loss is the last domain's inner CE (DomainBed).

    Inner optimizer state: as in DomainBed, the inner Adam's state (moments and step
    counts) carries over from one update to the next (DomainBed saves
    ``optimizer_inner.state_dict()`` and loads it into the Adam of the next clone).
    Here the clone and ``optimizer_inner`` are created once and the clone's weights are
    overwritten in place each update, which is equivalent; ``optimizer_inner`` is an
    attribute, so ``training_state`` saves it. ``self.optimizer`` (the outer Adam) is
    built but never stepped, as in DomainBed.

    Hyperparameters (DomainBed ``hparams_registry``): ``meta_lr`` 0.5, search choice
    [0.05, 0.1, 0.5].

    Deviations: DomainBed builds a fresh ``WholeFish`` every update (its random
    initialisation, immediately overwritten, consumes the global RNG); this version
    does not. DomainBed interpolates the whole ``state_dict``; here floating-point
    entries (parameters and float buffers) are interpolated and non-float buffers
    (e.g. BatchNorm's ``num_batches_tracked``) take the clone's value. The MNIST
    featurizer has no buffers, so this changes nothing there.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "meta_lr",
                0.5,
                lambda r: float(r.choice([0.05, 0.1, 0.5])),
                "step towards the inner weights (DomainBed: 0.5, choice [0.05,0.1,0.5])",
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.network_inner = copy.deepcopy(self.network)
        self.optimizer_inner = self.make_optimizer(self.network_inner.parameters())

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        self.network_inner.load_state_dict(self.network.state_dict())
        loss = None
        for x, y in minibatches:
            loss = F.cross_entropy(self.network_inner(x), y)
            self.optimizer_inner.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_inner.step()
        meta_lr = self.hparams["meta_lr"]
        with torch.no_grad():
            inner = self.network_inner.state_dict()
            for name, value in self.network.state_dict().items():
                if value.is_floating_point():
                    value.add_(meta_lr * (inner[name] - value))
                else:
                    value.copy_(inner[name])
        assert loss is not None, "Fish.update needs at least one minibatch"
        return {"loss": loss.item()}
