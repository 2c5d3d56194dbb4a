"""Inter-domain mixup baseline.

Definition, hyperparameter name, default and random-search distribution follow
DomainBed (``domainbed/algorithms.py`` ``Mixup``, ``domainbed/lib/misc.py``
``random_pairs_of_minibatches``, ``domainbed/hparams_registry.py``; Gulrajani &
Lopez-Paz, ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..hparams import HParam
from .base import Minibatches
from .erm import ERM

Pair = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def random_pairs_of_minibatches(minibatches: Minibatches, generator: torch.Generator) -> list[Pair]:
    """DomainBed's ``random_pairs_of_minibatches``: a random permutation of the domains,
    each paired with the next one cyclically (the last with the first); both batches
    cut to the shorter length. Returns D pairs ((x_i, y_i), (x_j, y_j))."""
    perm = torch.randperm(len(minibatches), generator=generator).tolist()
    pairs = []
    for i in range(len(minibatches)):
        j = (i + 1) % len(minibatches)
        (xi, yi), (xj, yj) = minibatches[perm[i]], minibatches[perm[j]]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


class Mixup(ERM):
    """Inter-domain Mixup (Yan et al. 2020, "Improve Unsupervised Domain Adaptation with
    Mixup Training", arXiv:2001.00677; Wang et al. ICASSP 2020), as in DomainBed.

    For each cyclic pair (i, j) of randomly permuted domains, lam ~ Beta(a, a) with
    a = ``mixup_alpha``, x = lam * x_i + (1 - lam) * x_j and the objective adds
    lam * CE(f(x), y_i) + (1 - lam) * CE(f(x), y_j); the sum is divided by D and one
    Adam step is taken.

    Hyperparameters (DomainBed ``hparams_registry``): ``mixup_alpha`` 0.2, search
    10**U(-1, 1).

    Deviation (reproducibility): DomainBed draws the permutation from torch's and lam
    from numpy's global generators. Here both come from ``self.generator`` (a
    ``torch.Generator`` seeded from the global torch RNG at construction, saved by
    ``training_state``): lam is drawn by ``np.random.RandomState(s).beta`` with s drawn
    from that generator, so the distribution is the same and a resumed run continues
    identically.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "mixup_alpha",
                0.2,
                lambda r: float(10 ** r.uniform(-1, 1)),
                "Beta(a, a) parameter of the mixing weight (DomainBed: 0.2, 10**U(-1,1))",
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def draw_lambda(self) -> float:
        """lam ~ Beta(mixup_alpha, mixup_alpha), deterministic given ``self.generator``."""
        seed = int(torch.randint(2**31, (1,), generator=self.generator))
        alpha = self.hparams["mixup_alpha"]
        return float(np.random.RandomState(seed).beta(alpha, alpha))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        objective: torch.Tensor | float = 0.0
        for (xi, yi), (xj, yj) in random_pairs_of_minibatches(minibatches, self.generator):
            lam = self.draw_lambda()
            predictions = self.predict(lam * xi + (1 - lam) * xj)
            objective = objective + lam * F.cross_entropy(predictions, yi)
            objective = objective + (1 - lam) * F.cross_entropy(predictions, yj)
        objective = objective / len(minibatches)
        assert isinstance(objective, torch.Tensor)  # the loop ran: there is at least one pair
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.item()}
