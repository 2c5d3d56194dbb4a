"""Invariance penalties on top of ERM: IRM, V-REx, Spectral Decoupling, IGA and EQRM.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` and ``domainbed/hparams_registry.py``,
Gulrajani & Lopez-Paz, ICLR 2021).

Like DomainBed, IRM and V-REx forward all domains in one concatenated batch and slice
the logits per domain (the MNIST featurizer uses GroupNorm, so this equals per-domain
forwards), and both *re-create* Adam at the anneal step, because the penalty weight
jumps there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd

from ..errors import DomainGradError
from ..hparams import POSITIVE, Bounds, HParam
from .base import Minibatches
from .erm import ERM


def _split_logits(logits: torch.Tensor, minibatches: Minibatches) -> list[torch.Tensor]:
    """Slice (sum_d B_d, C) logits of the concatenated batch back into per-domain
    (B_d, C) blocks, in minibatch order."""
    return list(torch.split(logits, [x.shape[0] for x, _ in minibatches]))


class _AnnealedPenalty(ERM):
    """ERM plus a penalty whose weight is 1.0 for the first ``anneal_iters`` updates and
    ``lambda`` afterwards; Adam is re-created at update ``anneal_iters`` (DomainBed's
    IRM and VREx). ``update_count`` is a buffer, so it is saved with the model."""

    #: names of the (weight, anneal iterations) hyperparameters, set by subclasses
    _lambda_name: str
    _anneal_name: str
    update_count: torch.Tensor  # () long buffer, registered in __init__

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def penalty_weight(self) -> float:
        """1.0 before the anneal step, the penalty weight from it on (DomainBed)."""
        if int(self.update_count) >= self.hparams[self._anneal_name]:
            return float(self.hparams[self._lambda_name])
        return 1.0

    def step(self, loss: torch.Tensor) -> None:
        """Re-create Adam at the anneal step (DomainBed: "Adam doesn't like the sharp
        jump in gradient magnitudes"), then one step on ``loss``; counts the update."""
        if int(self.update_count) == self.hparams[self._anneal_name]:
            self.optimizer = self.make_optimizer(self.network.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1


class IRM(_AnnealedPenalty):
    """Invariant Risk Minimization, IRMv1 (Arjovsky et al. 2019, arXiv:1907.02893), as in
    DomainBed.

    Loss = mean_d CE_d + w * mean_d P_d, with P_d the unbiased estimate of the squared
    gradient of the domain risk wrt a dummy classifier scale s = 1: the product of
    d CE(logits[::2] * s)/ds and d CE(logits[1::2] * s)/ds (``create_graph`` so the
    penalty is differentiated). w = 1.0 for the first ``irm_penalty_anneal_iters``
    updates, then ``irm_lambda``; Adam is re-created at the anneal step.

    Hyperparameters (DomainBed ``hparams_registry``): ``irm_lambda`` 1e2, search
    10**U(-1, 5); ``irm_penalty_anneal_iters`` 500, search int(10**U(0, 4)).
    """

    _lambda_name = "irm_lambda"
    _anneal_name = "irm_penalty_anneal_iters"

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "irm_lambda",
                1e2,
                lambda r: float(10 ** r.uniform(-1, 5)),
                "IRM penalty weight after annealing (DomainBed: 1e2, 10**U(-1,5))",
            ),
            HParam(
                "irm_penalty_anneal_iters",
                500,
                lambda r: int(10 ** r.uniform(0, 4)),
                "updates with penalty weight 1.0 before irm_lambda (DomainBed: 500, int(10**U(0,4)))",
            ),
        ]

    @staticmethod
    def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """IRMv1 penalty of one domain (DomainBed ``IRM._irm_penalty``).

        Args:
            logits: (B, C) logits of the domain's batch.
            y: (B,) int64 labels.

        Returns:
            Scalar: grad_s CE(logits[::2] * s) * grad_s CE(logits[1::2] * s) at s = 1,
            differentiable wrt ``logits``.
        """
        scale = torch.tensor(1.0, device=logits.device, dtype=logits.dtype, requires_grad=True)
        loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
        loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
        grad_1 = autograd.grad(loss_1, [scale], create_graph=True)[0]
        grad_2 = autograd.grad(loss_2, [scale], create_graph=True)[0]
        return torch.sum(grad_1 * grad_2)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        weight = self.penalty_weight()
        all_logits = self.network(torch.cat([x for x, _ in minibatches]))
        nll = all_logits.new_zeros(())
        penalty = all_logits.new_zeros(())
        for logits, (_, y) in zip(_split_logits(all_logits, minibatches), minibatches):
            nll = nll + F.cross_entropy(logits, y)
            penalty = penalty + self.irm_penalty(logits, y)
        nll = nll / len(minibatches)
        penalty = penalty / len(minibatches)
        loss = nll + weight * penalty
        self.step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


class VREx(_AnnealedPenalty):
    """Variance Risk Extrapolation, V-REx (Krueger et al. ICML 2021, arXiv:2003.00688),
    as in DomainBed.

    With L_d the mean cross-entropy of domain d (a (D,) vector): loss = mean(L) +
    w * mean((L - mean(L))**2) (the biased variance over domains). w = 1.0 for the
    first ``vrex_penalty_anneal_iters`` updates, then ``vrex_lambda``; Adam is
    re-created at the anneal step.

    Hyperparameters (DomainBed ``hparams_registry``): ``vrex_lambda`` 1e1, search
    10**U(-1, 5); ``vrex_penalty_anneal_iters`` 500, search int(10**U(0, 4)).

    Deviation: DomainBed logs as ``nll`` the *last* domain's loss (a leftover loop
    variable); here ``nll`` is mean(L). The optimised loss is unchanged.
    """

    _lambda_name = "vrex_lambda"
    _anneal_name = "vrex_penalty_anneal_iters"

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "vrex_lambda",
                1e1,
                lambda r: float(10 ** r.uniform(-1, 5)),
                "V-REx variance weight after annealing (DomainBed: 1e1, 10**U(-1,5))",
            ),
            HParam(
                "vrex_penalty_anneal_iters",
                500,
                lambda r: int(10 ** r.uniform(0, 4)),
                "updates with penalty weight 1.0 before vrex_lambda (DomainBed: 500, int(10**U(0,4)))",
            ),
        ]

    @staticmethod
    def vrex_objective(losses: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, mean, penalty) for the (D,) vector of domain losses: mean + weight *
        biased variance."""
        mean = losses.mean()
        penalty = ((losses - mean) ** 2).mean()
        return mean + weight * penalty, mean, penalty

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        weight = self.penalty_weight()
        all_logits = self.network(torch.cat([x for x, _ in minibatches]))
        losses = torch.stack(
            [F.cross_entropy(logits, y) for logits, (_, y) in zip(_split_logits(all_logits, minibatches), minibatches)]
        )
        loss, mean, penalty = self.vrex_objective(losses, weight)
        self.step(loss)
        return {"loss": loss.item(), "nll": mean.item(), "penalty": penalty.item()}


class SD(ERM):
    """Spectral Decoupling (Pezeshki et al. NeurIPS 2021, "Gradient Starvation",
    arXiv:2011.09468), as in DomainBed.

    On the concatenated batch with logits (B, C): loss = CE + ``sd_reg`` *
    mean(logits**2) (the L2 penalty on the logits, averaged over all entries).

    Hyperparameters (DomainBed ``hparams_registry``): ``sd_reg`` 0.1, search
    10**U(-5, -1).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "sd_reg",
                0.1,
                lambda r: float(10 ** r.uniform(-5, -1)),
                "weight of mean(logits**2) (DomainBed: 0.1, 10**U(-5,-1))",
            )
        ]

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        logits = self.predict(all_x)
        loss = F.cross_entropy(logits, all_y)
        penalty = (logits**2).mean()
        objective = loss + self.hparams["sd_reg"] * penalty
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}


class IGA(ERM):
    """Inter-environmental Gradient Alignment (Koyama, Yamaguchi, "Out-of-Distribution
    Generalization with Maximal Invariant Predictor", arXiv:2008.01883v2, 2020, the version
    DomainBed cites; later versions are titled "When is invariance useful in an
    Out-of-Distribution Generalization problem?"), DomainBed's ``IGA``.

    With L_d the mean cross-entropy of domain d (each domain forwarded separately),
    g_d = grad_theta L_d (kept in the graph) and gbar = grad_theta mean_d L_d:
    loss = mean_d L_d + ``penalty`` * sum_d ||g_d - gbar||**2 (sum over every
    parameter), one Adam step on the network. ``penalty`` weighs D times the trace of
    the covariance of the domain gradients (DomainBed sums over domains instead of
    averaging).

    As in DomainBed gbar is taken *without* ``create_graph`` (a constant); this does
    not change the gradient, since sum_d (g_d - gbar) = 0 makes the terms through gbar
    cancel. Logged: ``loss`` (mean_d L_d) and ``penalty`` (the sum of squares), as in
    DomainBed.

    Hyperparameters (DomainBed ``hparams_registry``): ``penalty`` 1000, search
    10**U(1, 5) (drawn as a float; DomainBed's default is the int 1000, given here as
    1000.0).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "penalty",
                1000.0,
                lambda r: float(10 ** r.uniform(1, 5)),
                "weight of the summed squared deviation of the domain gradients (DomainBed: 1000, 10**U(1,5))",
            )
        ]

    @staticmethod
    def gradient_penalty(grads: list[tuple[torch.Tensor, ...]], mean_grad: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``sum_d sum_k ||grads[d][k] - mean_grad[k]||**2``: ``grads`` has one tuple of
        per-parameter gradients per domain, ``mean_grad`` the gradient of the mean loss
        (same shapes). Differentiable through ``grads``."""
        terms = [(g - m).pow(2).sum() for grad in grads for g, m in zip(grad, mean_grad)]
        return torch.stack(terms).sum()

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        params = list(self.network.parameters())
        losses, grads = [], []
        for x, y in minibatches:
            loss = F.cross_entropy(self.network(x), y)
            losses.append(loss)
            grads.append(autograd.grad(loss, params, create_graph=True))
        mean_loss = sum(losses[1:], losses[0]) / len(losses)  # left to right, as DomainBed
        mean_grad = autograd.grad(mean_loss, params, retain_graph=True)
        penalty = self.gradient_penalty(grads, mean_grad)
        objective = mean_loss + self.hparams["penalty"] * penalty
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return {"loss": mean_loss.item(), "penalty": penalty.item()}


def kde_quantile(risks: torch.Tensor, q: torch.Tensor, n_steps: int = 32) -> torch.Tensor:
    """The q-quantile of a Gaussian kernel density estimate of the (D,) ``risks``, by
    bisection (Eastwood et al., NeurIPS 2022, Sec. 4 / Algorithm 1; DomainBed
    ``lib/misc.py`` ``Nonparametric`` with ``use_kde=True``, ``bw_select='Gauss-optimal'``).

    Bandwidth h = 1.06 * std(risks) * D**(-1/5) (unbiased std, the Gauss-optimal rule);
    CDF(t) = mean_d Phi((t - r_d) / h). The bisection starts from [min_d r_d + h z_q,
    max_d r_d + h z_q], z_q = Phi^-1(q), and halves it ``n_steps`` times (stopping
    early once the midpoint no longer moves), keeping the half where CDF crosses q.
    The result is an affine combination of the two start points, so its gradient
    reaches the risks through min, max and h, as in DomainBed.

    Args:
        risks: (D,) per-domain risks, D >= 2, differentiable.
        q: () quantile in (0, 1) (a float64 tensor in EQRM, as DomainBed's ``alpha``).
        n_steps: bisection steps (DomainBed: 32).

    Returns:
        () tensor: the quantile (dtype of the promotion of ``risks`` and ``q``). When
        all risks are equal (h = 0) it is their mean (DomainBed raises there, from
        ``torch.distributions.Normal`` with scale 0).

    Raises:
        ValueError: fewer than 2 risks.
    """
    if risks.dim() != 1 or len(risks) < 2:
        raise ValueError(f"kde_quantile needs a 1-D tensor of at least 2 risks, got shape {tuple(risks.shape)}")
    data, _ = torch.sort(risks)
    n = len(data)
    bandwidth = 1.06 * torch.std(data, unbiased=True) * (n**-0.2)
    if not bool(bandwidth > 0):
        return data.mean()
    # DomainBed's bandwidth passes through a default-dtype tensor (torch.ones(1) * h);
    # the same cast here keeps float64 runs equal to it (a no-op in float32)
    sigma = bandwidth.to(torch.get_default_dtype())

    def cdf(t: torch.Tensor) -> torch.Tensor:
        # t as a (1,) tensor, so that t - data takes t's (float64) precision, as DomainBed's
        return torch.mean(0.5 * (1 + torch.erf((t.reshape(1) - data) * sigma.reciprocal() / math.sqrt(2))))

    bounds = [data[i] + sigma * torch.erfinv(2 * q - 1) * math.sqrt(2) for i in (0, -1)]
    mid = 0.5 * (bounds[0] + bounds[1])
    for _ in range(n_steps):
        bounds[int(bool(cdf(mid) > q))] = mid
        new_mid = 0.5 * (bounds[0] + bounds[1])
        if bool(new_mid == mid):
            break
        mid = new_mid
    return mid


class EQRM(ERM):
    """Empirical Quantile Risk Minimization (Eastwood, Robey, Singh, von Kügelgen,
    Hassani, Pappas, Schölkopf, "Probable Domain Generalization via Quantile Risk
    Minimization", NeurIPS 2022, Algorithm 1), DomainBed's ``EQRM``.

    R = (D,) per-domain mean cross-entropies (each domain forwarded separately). For
    the first ``eqrm_burnin_iters`` updates the loss is mean(R) (ERM burn-in); from
    then on it is the ``eqrm_quantile``-quantile of a Gaussian KDE of R
    (:func:`kde_quantile`). At update ``eqrm_burnin_iters`` Adam is re-created with
    learning rate ``eqrm_lr`` (and ``weight_decay``), as DomainBed does.
    ``update_count`` is a buffer; ``alpha`` is the quantile as a float64 buffer
    (DomainBed's), so both are saved with the model.

    Hyperparameters (DomainBed ``hparams_registry``): ``eqrm_quantile`` 0.75, search
    U(0.5, 0.99); ``eqrm_burnin_iters`` 2500, search 10**U(2.5, 3.5);
    ``eqrm_lr`` 1e-6, search 10**U(-7, -5).

    Deviations: DomainBed draws ``eqrm_burnin_iters`` as a float, so its test
    ``update_count == eqrm_burnin_iters`` never holds in a random search and Adam is
    never re-created (``eqrm_lr`` is unused there); here the draw is int(10**U(2.5,
    3.5)), so the switch to ``eqrm_lr`` happens in every run, as with DomainBed's
    defaults (which are unaffected). EQRM needs at least 2 training domains (a quantile of one risk is
    undefined; DomainBed yields NaN): fewer raise at construction.
    """

    update_count: torch.Tensor  # () long buffer
    alpha: torch.Tensor  # () float64 buffer

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "eqrm_quantile",
                0.75,
                lambda r: float(r.uniform(0.5, 0.99)),
                "quantile of the domain risks minimised after burn-in (DomainBed: 0.75, U(0.5,0.99))",
                bounds=Bounds(0.0, 1.0, low_open=True, high_open=True),
            ),
            HParam(
                "eqrm_burnin_iters",
                2500,
                lambda r: int(10 ** r.uniform(2.5, 3.5)),
                "ERM updates before the quantile loss (DomainBed: 2500, 10**U(2.5,3.5), drawn as int here)",
                bounds=Bounds(0),
            ),
            HParam(
                "eqrm_lr",
                1e-6,
                lambda r: float(10 ** r.uniform(-7, -5)),
                "Adam learning rate from the end of burn-in (DomainBed: 1e-6, 10**U(-7,-5))",
                bounds=POSITIVE,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        if num_domains < 2:
            raise DomainGradError(
                f"EQRM needs at least 2 training domains (a quantile of the domain risks), got {num_domains}; "
                "leave at least two environments out of --test-envs"
            )
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("alpha", torch.tensor(self.hparams["eqrm_quantile"], dtype=torch.float64))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        risks = torch.stack([F.cross_entropy(self.network(x), y) for x, y in minibatches])
        count = int(self.update_count)
        burnin = self.hparams["eqrm_burnin_iters"]
        loss = risks.mean() if count < burnin else kde_quantile(risks, self.alpha)
        if count == burnin:
            self.optimizer = torch.optim.Adam(
                self.network.parameters(), lr=self.hparams["eqrm_lr"], weight_decay=self.hparams["weight_decay"]
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1
        return {"loss": loss.item()}
