"""Style-agnostic networks: SagNet (Nam, Lee, Park, Yoon, Yoo, "Reducing Domain Gap by
Reducing Style Bias", CVPR 2021), DomainBed's version.

Definition, hyperparameter name, default and random-search distribution follow
DomainBed (``domainbed/algorithms.py`` ``SagNet``, ``domainbed/hparams_registry.py``;
Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import models
from ..errors import DomainGradError
from ..hparams import NON_NEGATIVE, HParam
from .base import Algorithm, Minibatches

#: ``randomize`` modes: mix the style statistics, or shuffle the content
RANDOMIZE_MODES = ("style", "content")


def randomize(x: torch.Tensor, what: str = "style", eps: float = 1e-5) -> torch.Tensor:
    """SagNet's style or content randomisation (Nam, Lee, Park, Yoon, Yoo, "Reducing Domain
    Gap by Reducing Style Bias", CVPR 2021), DomainBed's ``SagNet.randomize``.

    For x of shape (B, F) the "style" of example i is the mean mu_i and unbiased variance
    v_i of its F features; for (B, C, H, W) those of each channel over its H*W positions.
    With alpha ~ U(0, 1) per example and a random permutation p of the batch:

    * ``"style"``: x_i -> (x_i - mu_i) / sqrt(v_i + eps) * sqrt(v'_i + eps) + mu'_i with
      mu'_i = alpha_i mu_i + (1 - alpha_i) mu_p(i) and likewise v'_i: the content of i in
      a style interpolated towards example p(i)'s;
    * ``"content"``: x_i -> n_p(i) * sqrt(v_i + eps) + mu_i with n_j the normalised
      x_j, detached: example p(i)'s content in example i's style (gradients reach x only
      through the style statistics).

    Random draws, in this order, as DomainBed: ``torch.rand(B, 1)`` then
    ``torch.randperm(B)``, both from the global CPU generator (also for CUDA inputs) in
    the default dtype; alpha is drawn but unused in content mode.

    Args:
        x: (B, F) features or (B, C, H, W) maps, B >= 1.
        what: "style" or "content".
        eps: added to the variances.

    Returns:
        A tensor of x's shape.

    Raises:
        ValueError: for another ``what`` or a tensor of another rank.
    """
    if what not in RANDOMIZE_MODES:
        raise ValueError(f"randomize: what must be one of {list(RANDOMIZE_MODES)}, got {what!r}")
    if x.dim() not in (2, 4):
        raise ValueError(f"randomize: expected (B, F) features or (B, C, H, W) maps, got shape {tuple(x.shape)}")
    shape = x.shape
    alpha = torch.rand(shape[0], 1).to(x.device)
    if x.dim() == 4:
        x = x.reshape(shape[0], shape[1], -1)
        alpha = alpha.unsqueeze(-1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    normalized = (x - mean) / (var + eps).sqrt()
    perm = torch.randperm(shape[0]).to(x.device)
    if what == "style":
        mean = alpha * mean + (1 - alpha) * mean[perm]
        var = alpha * var + (1 - alpha) * var[perm]
    else:
        normalized = normalized[perm].detach()
    return (normalized * (var + eps).sqrt() + mean).reshape(shape)


class SagNet(Algorithm):
    """Style-Agnostic Networks (Nam, Lee, Park, Yoon, Yoo, "Reducing Domain Gap by Reducing
    Style Bias", CVPR 2021, Algorithm 1), DomainBed's version.

    A shared featurizer ``network_f`` is followed by a content network ``network_c`` and
    a style network ``network_s`` (DomainBed's ``networks.Classifier`` each: linear, or
    its MLP with ``nonlinear_classifier``), randomisation acting on the (B, F) features
    (:func:`randomize`). One update on the concatenated batch (x, y), three Adam steps
    with their own optimizers (``lr``, ``weight_decay``):

    1. content: loss_c = CE(network_c(randomize(network_f(x), "style")), y); a step of
       ``optimizer_f`` and ``optimizer_c``;
    2. style: loss_s = CE(network_s(randomize(network_f(x), "content")), y); a step of
       ``optimizer_s``;
    3. adversary: loss_adv = ``sag_w_adv`` * mean_i mean_k -log softmax(network_s(
       randomize(network_f(x), "content")))_ik (cross-entropy to the uniform
       distribution: the featurizer learns to confuse the style network); a step of
       ``optimizer_f``.

    Step 2 runs the featurizer without autograd: DomainBed backpropagates loss_s into
    ``network_f`` too, and then discards that gradient (``optimizer_f.zero_grad()`` before
    step 3), so the parameters are the same and one featurizer backward is saved (the
    inherent cost: three featurizer forwards, two backwards).

    ``predict(x)`` = network_c(network_f(x)), without randomisation. Logged keys:
    ``loss_c``, ``loss_s``, ``loss_adv`` (the weighted one), DomainBed's.

    Hyperparameters (DomainBed ``hparams_registry``): ``sag_w_adv`` 0.1, search
    10**U(-2, 1).

    Deviation of DomainBed (kept here, the only variant offered) from the paper and its
    code (the ResNet of the authors' release, ``modules/sag_resnet.py``: ``style_stage``
    3): there the randomisations act on the feature *maps* entering ``layer3`` (channel
    statistics over positions), the style network is its own copy of ``layer3`` and
    ``layer4`` with its own head, and the adversarial step updates only the BatchNorm
    parameters of the layers before the split. DomainBed keeps a split (after
    ``layer3``) only as commented-out code ("specific to ResNet and puts in disadvantage
    the other algorithms") and randomises the pooled (B, F) features with linear content
    and style heads, for every featurizer, MNIST_CNN included; that is this class, for
    every backbone. :func:`randomize` also handles (B, C, H, W) maps, for a split
    variant.

    Attributes (DomainBed's names): ``network_f``, ``network_c``, ``network_s``,
    ``optimizer_f``, ``optimizer_c``, ``optimizer_s``, ``weight_adv``.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "sag_w_adv",
                0.1,
                lambda r: float(10 ** r.uniform(-2, 1)),
                "weight of the adversarial style loss (DomainBed: 0.1, 10**U(-2,1))",
                bounds=NON_NEGATIVE,
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.network_f = models.featurizer_for(input_shape, self.hparams)
        n_features, nonlinear = self.network_f.n_outputs, self.hparams["nonlinear_classifier"]
        if n_features < 2:
            raise DomainGradError(f"SagNet needs at least 2 features for their style statistics, got {n_features}")
        self.network_c = models.classifier(n_features, num_classes, nonlinear)
        self.network_s = models.classifier(n_features, num_classes, nonlinear)
        self.optimizer_f = self._adam(self.network_f.parameters())
        self.optimizer_c = self._adam(self.network_c.parameters())
        self.optimizer_s = self._adam(self.network_s.parameters())
        self.weight_adv = float(self.hparams["sag_w_adv"])

    def _adam(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def forward_c(self, x: torch.Tensor) -> torch.Tensor:
        """Content logits (B, num_classes) on style-randomised features."""
        return self.network_c(randomize(self.network_f(x), "style"))

    def forward_s(self, x: torch.Tensor) -> torch.Tensor:
        """Style logits (B, num_classes) on content-randomised features."""
        return self.network_s(randomize(self.network_f(x), "content"))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])

        self.optimizer_f.zero_grad(set_to_none=True)
        self.optimizer_c.zero_grad(set_to_none=True)
        loss_c = F.cross_entropy(self.forward_c(all_x), all_y)
        loss_c.backward()
        self.optimizer_f.step()
        self.optimizer_c.step()

        self.optimizer_s.zero_grad(set_to_none=True)
        with torch.no_grad():  # only optimizer_s steps: the featurizer's gradient is unused
            features = self.network_f(all_x)
        loss_s = F.cross_entropy(self.network_s(randomize(features, "content")), all_y)
        loss_s.backward()
        self.optimizer_s.step()

        self.optimizer_f.zero_grad(set_to_none=True)
        loss_adv = self.weight_adv * -F.log_softmax(self.forward_s(all_x), dim=1).mean(1).mean()
        loss_adv.backward()
        self.optimizer_f.step()
        return {"loss_c": loss_c.item(), "loss_s": loss_s.item(), "loss_adv": loss_adv.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network_c(self.network_f(x))
