"""Information-bottleneck penalties: IB_ERM and IB_IRM (Ahuja, Caballero, Zhang,
Gagnon-Audet, Bengio, Mitliagkas, Rish, "Invariance Principle Meets Information
Bottleneck for Out-of-Distribution Generalization", NeurIPS 2021).

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` ``IB_ERM``, ``IB_IRM``;
``domainbed/hparams_registry.py``; Gulrajani & Lopez-Paz, ICLR 2021). Both forward
all domains in one concatenated batch and slice the features and logits per domain,
and re-create Adam at the anneal step(s), as DomainBed does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..hparams import NON_NEGATIVE, Bounds, HParam
from .base import Minibatches
from .erm import ERM
from .invariance import IRM

_IB_SPECS = [
    HParam(
        "ib_lambda",
        1e2,
        lambda r: float(10 ** r.uniform(-1, 5)),
        "information-bottleneck weight after annealing (DomainBed: 1e2, 10**U(-1,5))",
        bounds=NON_NEGATIVE,
    ),
    HParam(
        "ib_penalty_anneal_iters",
        500,
        lambda r: int(10 ** r.uniform(0, 4)),
        "updates with IB weight 0 before ib_lambda (DomainBed: 500, int(10**U(0,4)))",
        bounds=Bounds(0),
    ),
]


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    """(v_1 + ... + v_D) / D of scalar tensors, summed left to right as DomainBed does
    (so that float64 runs agree with it to the last bit)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total / len(values)


def ib_penalty(features: torch.Tensor) -> torch.Tensor:
    """Information-bottleneck penalty of one domain: the mean over the F feature
    dimensions of their unbiased variance across the batch, mean_f Var_i(z_if)
    (DomainBed ``features.var(dim=0).mean()``; the paper's variance proxy for the
    entropy of the representation).

    Args:
        features: (B, F) features of one domain, B >= 2.

    Returns:
        Scalar, differentiable wrt ``features``.
    """
    return features.var(dim=0).mean()


class IB_ERM(ERM):
    """IB-ERM (Ahuja et al., "Invariance Principle Meets Information Bottleneck for
    Out-of-Distribution Generalization", NeurIPS 2021: the IB-IRM objective without
    the IRM term), DomainBed's ``IB_ERM``.

    With z_d and logits_d the slices of domain d of the concatenated forward:
    loss = mean_d CE_d + w * mean_d :func:`ib_penalty` (z_d); w = 0 for the first
    ``ib_penalty_anneal_iters`` updates, then ``ib_lambda``; Adam over the featurizer's
    and the classifier's parameters (the network's) is re-created at the anneal step.
    Logged: ``loss``, ``nll``, ``IB_penalty`` (DomainBed's keys).

    Deviation (logging only): DomainBed builds its loss with ``loss = nll; loss += ...``,
    an in-place add on the ``nll`` tensor, so its logged ``nll`` equals ``loss``; here
    ``nll`` is the mean cross-entropy. The optimised loss is unchanged.

    Hyperparameters (DomainBed ``hparams_registry``): ``ib_lambda`` 1e2, search
    10**U(-1, 5); ``ib_penalty_anneal_iters`` 500, search int(10**U(0, 4)).

    Parity: ``featurizer``, ``classifier``, ``network``, ``optimizer`` as in DomainBed;
    ``update_count`` is a () buffer here, (1,) there. No randomness.
    """

    update_count: torch.Tensor  # () long buffer

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return list(_IB_SPECS)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.optimizer = self.make_optimizer(self._parameters_to_train())
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def _parameters_to_train(self) -> list[torch.nn.Parameter]:
        return list(self.featurizer.parameters()) + list(self.classifier.parameters())

    def _anneal_steps(self) -> tuple[int, ...]:
        """Updates at which Adam is re-created."""
        return (self.hparams["ib_penalty_anneal_iters"],)

    def _weight(self, lambda_name: str, anneal_name: str, before: float) -> float:
        if int(self.update_count) >= self.hparams[anneal_name]:
            return float(self.hparams[lambda_name])
        return before

    def _forward_per_domain(self, minibatches: Minibatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B_d, F), logits (B_d, C)) per domain, from one concatenated forward."""
        features = self.featurizer(torch.cat([x for x, _ in minibatches]))
        logits = self.classifier(features)
        sizes = [x.shape[0] for x, _ in minibatches]
        return list(zip(torch.split(features, sizes), torch.split(logits, sizes)))

    def _step(self, loss: torch.Tensor) -> None:
        if int(self.update_count) in self._anneal_steps():
            # DomainBed: "Adam doesn't like the sharp jump in gradient magnitudes"
            self.optimizer = self.make_optimizer(self._parameters_to_train())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        ib_weight = self._weight("ib_lambda", "ib_penalty_anneal_iters", 0.0)
        parts = self._forward_per_domain(minibatches)
        nll = _mean([F.cross_entropy(logits, y) for (_, logits), (_, y) in zip(parts, minibatches)])
        penalty = _mean([ib_penalty(z) for z, _ in parts])
        loss = nll + ib_weight * penalty
        self._step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "IB_penalty": penalty.item()}


class IB_IRM(IB_ERM):
    """IB-IRM (Ahuja et al., "Invariance Principle Meets Information Bottleneck for
    Out-of-Distribution Generalization", NeurIPS 2021), DomainBed's ``IB_IRM``.

    loss = mean_d CE_d + w_irm * mean_d P_d + w_ib * mean_d :func:`ib_penalty` (z_d),
    P_d the IRMv1 penalty of domain d (:meth:`IRM.irm_penalty`); w_irm = 1.0 before
    ``irm_penalty_anneal_iters`` updates and ``irm_lambda`` from then on; w_ib = 0
    before ``ib_penalty_anneal_iters`` and ``ib_lambda`` from then on. Adam is
    re-created at either anneal step. Logged: ``loss``, ``nll``, ``IRM_penalty``,
    ``IB_penalty`` (DomainBed's keys; ``nll`` is the mean cross-entropy, see
    :class:`IB_ERM`).

    Hyperparameters (DomainBed ``hparams_registry``): ``irm_lambda`` 1e2, 10**U(-1, 5);
    ``irm_penalty_anneal_iters`` 500, int(10**U(0, 4)); ``ib_lambda`` 1e2,
    10**U(-1, 5); ``ib_penalty_anneal_iters`` 500, int(10**U(0, 4)).

    Parity: as :class:`IB_ERM`. No randomness.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return IRM.hparam_specs(small_images) + list(_IB_SPECS)

    def _anneal_steps(self) -> tuple[int, ...]:
        return (self.hparams["irm_penalty_anneal_iters"], self.hparams["ib_penalty_anneal_iters"])

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        irm_weight = self._weight("irm_lambda", "irm_penalty_anneal_iters", 1.0)
        ib_weight = self._weight("ib_lambda", "ib_penalty_anneal_iters", 0.0)
        parts = self._forward_per_domain(minibatches)
        nll = _mean([F.cross_entropy(logits, y) for (_, logits), (_, y) in zip(parts, minibatches)])
        irm = _mean([IRM.irm_penalty(logits, y) for (_, logits), (_, y) in zip(parts, minibatches)])
        ib = _mean([ib_penalty(z) for z, _ in parts])
        loss = nll + irm_weight * irm + ib_weight * ib
        self._step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "IRM_penalty": irm.item(), "IB_penalty": ib.item()}
