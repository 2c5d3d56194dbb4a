"""Transfer between domains: TRM (transfer risk minimisation; Xu and Jaakkola, "Learning
Representations that Support Robust Transfer of Predictors", arXiv:2110.09940, 2021) and
Transfer (Zhang, Zhao, Yu, Poupart, "Quantifying and Improving Transferability in Domain
Generalization", NeurIPS 2021).

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` ``TRM``, ``Transfer``; ``domainbed/lib/misc.py``
``distance``, ``proj``; ``domainbed/hparams_registry.py``; Gulrajani and Lopez-Paz, "In
Search of Lost Domain Generalization", ICLR 2021).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import autograd, nn

from .. import models
from ..errors import DomainGradError
from ..hparams import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, HParam
from .base import Algorithm, Minibatches

#: ``trm_variant`` values: the method as written, or DomainBed's code with its two aliasing effects
TRM_VARIANTS = ("paper", "domainbed")
#: DomainBed's TRM constants: SGD learning rate of the per-domain heads, their inner steps
#: per update, the Neumann iterations and the divergence bound that stops them
TRM_HEAD_LR, TRM_HEAD_STEPS, TRM_NEUMANN_STEPS, TRM_NEUMANN_BOUND = 0.1, 30, 10, 10.0


def sequential_sum(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """v_1 + v_2 + ... added left to right (as DomainBed's Python sums; at least one value).

    Raises:
        ValueError: for no values.
    """
    total: torch.Tensor | None = None
    for value in values:
        total = value if total is None else total + value
    if total is None:
        raise ValueError("sequential_sum needs at least one value")
    return total


def hessian_vector_product(loss_fn, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v for H the Hessian of ``loss_fn()`` (a scalar) with respect to ``weight``
    (any shape), v a flat vector of ``weight.numel()``; returns a flat, detached vector
    (double backward: the gradient of g(weight) . v)."""
    (grad,) = autograd.grad(loss_fn(), weight, create_graph=True)
    (hv,) = autograd.grad(grad.reshape(-1) @ v, weight)
    return hv.reshape(-1).detach()


def neumann_inverse_hvp(hvp, v: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """Approximate H^{-1} v by the Neumann series sum_{k=0}^{K} (I - H)^k v (valid for
    ||I - H|| < 1), with K = 10 terms after the first, stopped early once an entry of the
    partial sum exceeds 10 in magnitude (DomainBed's ``TRM.neum``).

    ``variant`` "paper" is that sum. "domainbed" is what DomainBed's code computes:
    its running sum starts as an alias of the vector it then updates in place, so the
    first term v is replaced by a second copy of (I - H) v:
    2 (I - H) v + sum_{k=2}^{K} (I - H)^k v.

    Args:
        hvp: maps a flat vector u to H u (flat, detached).
        v: flat vector, detached.
        variant: "paper" or "domainbed".

    Returns:
        The flat estimate, detached.
    """
    v = v.detach()
    total = v
    for k in range(TRM_NEUMANN_STEPS):
        v = v - hvp(v)
        if variant == "domainbed" and k == 0:
            total = v
        total = v + total
        if total.abs().max() > TRM_NEUMANN_BOUND:
            break
    return total.detach()


class TRM(Algorithm):
    """Transfer Risk Minimization (Xu, Jaakkola, "Learning Representations
    that Support Robust Transfer of Predictors", arXiv:2110.09940, 2021), DomainBed's
    version.

    For the first ``iters`` updates: ERM (mean cross-entropy of ``classifier`` on the
    concatenated batch; Adam steps of ``optimizer_f`` and ``optimizer_c``). From then on,
    with f_d the features of domain d's batch:

    1. the domain-weight matrix ``alpha`` (D, D; zero diagonal) is normalised by rows;
    2. each per-domain head ``clist[d]`` (Linear) takes 30 SGD steps (lr 0.1) on
       ``sum_d CE(clist[d](f_d.detach()), y_d)``, all heads at once;
    3. for each domain Q: ``g_Q = d CE(clist[Q](f_Q)) / d W_Q`` (kept differentiable),
       ``g_P = d sum_{i != Q} alpha[Q, i] CE(clist[Q](f_i)) / d W_Q`` (detached), then
       u = H_Q^{-1} g_P by :func:`neumann_inverse_hvp` (H_Q the Hessian of Q's loss in
       W_Q), and the transfer term sum_{i != Q} alpha[Q, i] CE_i - ``cos_lambda`` * u . g_Q;
       then alpha[Q, i] *= exp(``groupdro_eta`` * alpha[Q, i] CE_i) (the weighted loss,
       as in DomainBed); alpha is a constant of the term (its value before this update);
    4. loss = CE(classifier(f), y) + mean over Q of the transfer terms; one Adam step of
       ``optimizer_f`` and ``optimizer_c`` (the heads' gradients from it are discarded).

    W_Q is the head's weight matrix only (not its bias), as in DomainBed. With
    ``class_balanced`` the heads' weights are reset to the classifier's at every TRM
    step (DomainBed). Logged keys: ``nll`` (the ERM loss) and ``trm_loss`` (the rest).

    Hyperparameters (DomainBed ``hparams_registry``): ``cos_lambda`` 1e-4, search
    10**U(-5, 0); ``iters`` 200, int(10**U(0, 4)); ``groupdro_eta`` 1e-2,
    10**U(-3, -1). ``trm_variant`` (domaingrad's, not searched):

    * "paper" (default): the Neumann series for the inverse Hessian that the transfer
      risk's expansion calls for, and a gradient that is the derivative of the loss
      computed;
    * "domainbed": DomainBed's code (the variant behind its TRM numbers), with two
      effects of in-place updates on aliased tensors: its Neumann sum replaces the first
      term v by (I - H) v (see :func:`neumann_inverse_hvp`), and, because it reads
      alpha through ``.data`` and then updates alpha in place before the backward pass,
      the gradient of each alpha[Q, i] CE_i is taken with the *updated* alpha[Q, i]
      (the loss value uses the old one).

    Deviations from DomainBed (no effect on the numbers): the heads are an
    ``nn.ModuleList`` and ``alpha`` a buffer (DomainBed keeps a Python list and a plain
    CUDA tensor, so neither is saved, moved to another device or cast by ``.double()``;
    DomainBed's TRM also runs on CUDA only); its ``train()``/``eval()`` overrides, which
    switch only the featurizer, are not kept. The classifier is ``nn.Linear`` whatever
    ``nonlinear_classifier`` says (DomainBed). DomainBed builds D + 1 heads and uses D;
    so does this class, so that initial random draws match.

    Attributes (DomainBed's names): ``featurizer``, ``classifier``, ``clist``,
    ``olist`` (the heads' SGD optimizers, stateless), ``optimizer_f``, ``optimizer_c``,
    buffers ``alpha`` (D, D) and ``update_count`` (a () long; DomainBed's is (1,)).

    Raises:
        DomainGradError: for fewer than two training domains (the transfer term needs
            one other domain) or an unknown ``trm_variant``.
    """

    update_count: torch.Tensor
    alpha: torch.Tensor

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "cos_lambda",
                1e-4,
                lambda r: float(10 ** r.uniform(-5, 0)),
                "weight of the gradient-matching term (DomainBed: 1e-4, 10**U(-5,0))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "iters",
                200,
                lambda r: int(10 ** r.uniform(0, 4)),
                "ERM updates before the transfer term starts (DomainBed: 200, int(10**U(0,4)))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "groupdro_eta",
                1e-2,
                lambda r: float(10 ** r.uniform(-3, -1)),
                "exponentiated step on the domain weights alpha (DomainBed: 1e-2, 10**U(-3,-1))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "trm_variant",
                "paper",
                lambda r: "paper",
                "paper: the Neumann series and the gradient of the loss computed; domainbed: DomainBed's "
                "code (its aliased Neumann sum, gradients weighted by the updated alpha)",
                choices=TRM_VARIANTS,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if num_domains < 2:
            raise DomainGradError(f"TRM needs at least 2 training domains, got {num_domains}; hold out fewer")
        if self.hparams["trm_variant"] not in TRM_VARIANTS:
            raise DomainGradError(
                f"trm_variant must be one of {list(TRM_VARIANTS)}, got {self.hparams['trm_variant']!r}"
            )
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        n_features = self.featurizer.n_outputs
        self.classifier = nn.Linear(n_features, num_classes)
        self.clist = nn.ModuleList(nn.Linear(n_features, num_classes) for _ in range(num_domains + 1))
        self.olist = [torch.optim.SGD(head.parameters(), lr=TRM_HEAD_LR) for head in self.clist]
        self.optimizer_f = torch.optim.Adam(
            self.featurizer.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        self.optimizer_c = torch.optim.Adam(
            self.classifier.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        self.register_buffer("alpha", torch.ones(num_domains, num_domains) - torch.eye(num_domains))

    @property
    def heads(self) -> list[nn.Linear]:
        """The per-domain heads ``clist``, typed."""
        return [cast(nn.Linear, head) for head in self.clist]

    def _fit_heads(self, features: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        for _ in range(TRM_HEAD_STEPS):
            loss = sequential_sum(F.cross_entropy(head(f.detach()), y) for head, f, y in zip(self.heads, features, ys))
            for opt in self.olist:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in self.olist:
                opt.step()

    def transfer_term(self, features: list[torch.Tensor], ys: list[torch.Tensor], q: int) -> torch.Tensor:
        """Domain q's transfer term (step 3 of the class docstring), updating row q of
        ``alpha``. ``features`` and ``ys``: per-domain (B_d, F) features and labels."""
        head = self.heads[q]
        others = [i for i in range(len(features)) if i != q]
        (grad_q,) = autograd.grad(F.cross_entropy(head(features[q]), ys[q]), head.weight, create_graph=True)
        ces = {i: F.cross_entropy(head(features[i]), ys[i]) for i in others}
        old = {i: self.alpha[q, i].detach().clone() for i in others}
        weighted = {i: ces[i] * old[i] for i in others}
        loss_p = sequential_sum(weighted[i] for i in others)
        (grad_p,) = autograd.grad(loss_p, head.weight, create_graph=True)
        f_q, y_q = features[q].detach(), ys[q].detach()

        def hvp(u: torch.Tensor) -> torch.Tensor:
            return hessian_vector_product(lambda: F.cross_entropy(head(f_q), y_q), head.weight, u)

        variant = self.hparams["trm_variant"]
        inverse_hvp = neumann_inverse_hvp(hvp, grad_p.reshape(-1).detach(), variant)
        with torch.no_grad():
            for i in others:
                self.alpha[q, i] *= (self.hparams["groupdro_eta"] * weighted[i].detach()).exp()
        if variant == "domainbed":
            # the value with the old weights, the gradient with the updated ones
            loss_p = sequential_sum(
                ces[i].detach() * old[i] + (ces[i] - ces[i].detach()) * self.alpha[q, i].clone() for i in others
            )
        return loss_p - self.hparams["cos_lambda"] * (inverse_hvp @ grad_q.reshape(-1))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        transfer = int(self.update_count) >= self.hparams["iters"]
        if transfer:
            if self.hparams["class_balanced"]:
                with torch.no_grad():
                    for head in self.heads:
                        head.weight.copy_(self.classifier.weight)
            self.alpha /= self.alpha.sum(1, keepdim=True)
        all_features = self.featurizer(all_x)
        loss = F.cross_entropy(self.classifier(all_features), all_y)
        total = loss
        if transfer:
            features = list(torch.split(all_features, [len(x) for x, _ in minibatches]))
            ys = [y for _, y in minibatches]
            self._fit_heads(features, ys)
            terms = sequential_sum(self.transfer_term(features, ys, q) for q in range(len(minibatches)))
            total = loss + terms / len(minibatches)
        nll = loss.item()
        self.optimizer_c.zero_grad(set_to_none=True)
        self.optimizer_f.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer_f.step()
        self.optimizer_c.step()
        self.update_count += 1
        return {"nll": nll, "trm_loss": total.item() - nll}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))


def network_distance(h1: nn.Module, h2: nn.Module) -> torch.Tensor:
    """sqrt(sum over state-dict entries of ||h1 - h2||_F**2): the Euclidean distance of
    two networks of one architecture (DomainBed ``misc.distance``); a () tensor."""
    s1, s2 = h1.state_dict(), h2.state_dict()
    return torch.sqrt(sequential_sum(torch.norm(s1[k] - s2[k]) ** 2 for k in s1))


@torch.no_grad()
def project_to_ball(delta: float, adv: nn.Module, center: nn.Module) -> None:
    """Project ``adv``'s parameters in place onto the ball of radius ``delta`` around
    ``center``'s (DomainBed ``misc.proj``): unchanged within it, else
    center + delta / dist * (adv - center)."""
    dist = network_distance(adv, center)
    if dist <= delta:
        return
    ratio = delta / dist
    for p_center, p_adv in zip(center.parameters(), adv.parameters()):
        p_adv.copy_(p_center + ratio * (p_adv - p_center))


class Transfer(Algorithm):
    """Transfer (Zhang, Zhao, Yu, Poupart, "Quantifying and Improving Transferability in
    Domain Generalization", NeurIPS 2021, Algorithm 1), DomainBed's version.

    An adversarial classifier h' (``adv_classifier``, the classifier's architecture) is
    sought within distance ``delta`` of the classifier h, maximising the loss gap
    gap(h') = max_d CE_d(h') - min_d CE_d(h'), with CE_d the mean cross-entropy of
    h'(featurizer(x_d)) on domain d's batch (each domain forwarded separately; the first
    maximum and minimum win ties). One update:

    1. an ``optimizer`` step on CE(h(featurizer(x)), y) over the concatenated batch;
    2. an ``optimizer`` step on ``t_lambda`` * gap(h') (its gradient reaches the
       featurizer only; the classifier, absent from the graph, is skipped by Adam);
    3. h' := h; then ``d_steps_per_g`` times: an SGD step (``adv_opt``, lr ``lr_d``) of
       h' on -``t_lambda`` * gap(h'), then h' projected onto the ball
       ||h' - h|| <= ``delta`` (:func:`project_to_ball`, the distance over all of the
       classifier's state, :func:`network_distance`).

    ``optimizer`` is Adam (``lr``, ``weight_decay``) over featurizer and classifier, or
    with ``gda`` true SGD (``lr``) over the adversarial classifier's parameters, as in
    DomainBed: then the featurizer and the classifier are never trained (their
    gradients are computed but no optimizer holds them), and DomainBed's random search
    always draws ``gda`` true. Both kept, for parity with DomainBed's numbers. Logged:
    ``loss`` (step 1) and ``gap`` (t_lambda * gap before the last adversarial step).

    Hyperparameters (DomainBed ``hparams_registry``, Transfer block, the same for small
    and large images): ``t_lambda`` 1.0, 10**U(-2, 1); ``delta`` 2.0, U(0.1, 3.0);
    ``d_steps_per_g`` 10, choice [1, 2, 5]; ``weight_decay_d`` 0, 10**U(-6, -2);
    ``gda`` False, search True; ``beta1`` 0.5, choice [0, 0.5]; ``lr_d`` 1e-3,
    10**U(-4.5, -2.5). As in DomainBed, ``weight_decay_d`` and ``beta1`` are declared
    but unused (``adv_opt`` is plain SGD).

    Deviations: DomainBed also registers an ``update_count`` buffer that only its unused
    ``update_second`` reads; it is omitted. DomainBed's ``update_second`` (alternating
    single steps) is not offered.

    Attributes (DomainBed's names): ``featurizer``, ``classifier``, ``adv_classifier``,
    ``optimizer``, ``adv_opt``.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "t_lambda",
                1.0,
                lambda r: float(10 ** r.uniform(-2, 1)),
                "weight of the loss gap (DomainBed: 1.0, 10**U(-2,1))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "delta",
                2.0,
                lambda r: float(r.uniform(0.1, 3.0)),
                "radius of the adversarial classifier's ball (DomainBed: 2.0, U(0.1,3))",
                bounds=POSITIVE,
            ),
            HParam(
                "d_steps_per_g",
                10,
                lambda r: int(r.choice([1, 2, 5])),
                "adversarial steps per update (DomainBed: 10, choice [1,2,5])",
                bounds=AT_LEAST_ONE,
            ),
            HParam(
                "weight_decay_d",
                0.0,
                lambda r: float(10 ** r.uniform(-6, -2)),
                "declared by DomainBed, unused (DomainBed: 0, 10**U(-6,-2))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "gda",
                False,
                lambda r: True,
                "DomainBed's gda: the main optimizer is SGD over the adversarial classifier only, so the "
                "model does not train (DomainBed: False, search always True)",
            ),
            HParam(
                "beta1",
                0.5,
                lambda r: float(r.choice([0.0, 0.5])),
                "declared by DomainBed, unused (DomainBed: 0.5, choice [0,0.5])",
            ),
            HParam(
                "lr_d",
                1e-3,
                lambda r: float(10 ** r.uniform(-4.5, -2.5)),
                "SGD learning rate of the adversarial classifier (DomainBed: 1e-3, 10**U(-4.5,-2.5))",
                bounds=POSITIVE,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        n_features, nonlinear = self.featurizer.n_outputs, self.hparams["nonlinear_classifier"]
        self.classifier = models.classifier(n_features, num_classes, nonlinear)
        self.adv_classifier = models.classifier(n_features, num_classes, nonlinear)
        self.adv_classifier.load_state_dict(self.classifier.state_dict())
        if self.hparams["gda"]:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.adv_classifier.parameters(), lr=self.hparams["lr"]
            )
        else:
            self.optimizer = torch.optim.Adam(
                list(self.featurizer.parameters()) + list(self.classifier.parameters()),
                lr=self.hparams["lr"],
                weight_decay=self.hparams["weight_decay"],
            )
        self.adv_opt = torch.optim.SGD(self.adv_classifier.parameters(), lr=self.hparams["lr_d"])

    def loss_gap(self, minibatches: Minibatches) -> torch.Tensor:
        """() max_d CE_d - min_d CE_d of the adversarial classifier (the first extreme
        wins ties), each domain's batch forwarded on its own."""
        losses = [F.cross_entropy(self.adv_classifier(self.featurizer(x)), y) for x, y in minibatches]
        values = torch.stack([loss.detach() for loss in losses])
        # the two extremes from the list, not from a stack: backward then runs through their
        # two domains' graphs only, not through all D with zero gradients
        return losses[int(values.argmax())] - losses[int(values.argmin())]

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        gap = self.hparams["t_lambda"] * self.loss_gap(minibatches)
        self.optimizer.zero_grad(set_to_none=True)
        gap.backward()
        self.optimizer.step()
        self.adv_classifier.load_state_dict(self.classifier.state_dict())
        for _ in range(self.hparams["d_steps_per_g"]):
            self.adv_opt.zero_grad(set_to_none=True)
            gap = -self.hparams["t_lambda"] * self.loss_gap(minibatches)
            gap.backward()
            self.adv_opt.step()
            project_to_ball(self.hparams["delta"], self.adv_classifier, self.classifier)
        return {"loss": loss.item(), "gap": -gap.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))
