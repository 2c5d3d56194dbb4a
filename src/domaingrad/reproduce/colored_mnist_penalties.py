"""Losses and penalties of the Fishr repository's IRM-setup Colored MNIST script (binary
cross-entropy on one logit): IRM, V-REx (its squared difference) and Fishr's gradient-variance
penalty on the classifier. Used by :mod:`domaingrad.reproduce.fishr_colored_mnist`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domaingrad.errors import DomainGradError


def mean_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y)


def mean_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return ((logits > 0).float() == y).float().mean().item()


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(d/ds mean BCE(s * logits, y) at s = 1)^2, closed form: mean((sigmoid(z) - y) z)^2."""
    return ((torch.sigmoid(logits) - y) * logits).mean() ** 2


def vrex_penalty(env_losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """V-REx penalty of the Fishr repository's ``coloredmnist`` script: (L_0 - L_1)^2.

    ``env_losses``: the two training environments' mean losses, scalar tensors (any float
    dtype or device), in environment order (the order does not matter: the square is
    symmetric). Returns a scalar tensor, differentiable through both losses.

    Source: Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for
    Out-of-Distribution Generalization", ICML 2022, Table 2 (IRM-setup Colored MNIST) was
    produced by the authors' repository (github.com/alexrame/fishr),
    ``coloredmnist/train_coloredmnist.py`` line 246,
    ``rex_penalty = (envs[0]['nll'].mean() - envs[1]['nll'].mean())**2``, with the penalty
    weight 91257.186 tuned for it. That script hard-codes its two training environments
    and defines no form for more. The V-REx paper (Krueger, Caballero, Jacobsen, Zhang,
    Binas, Zhang, Le Priol, Courville, "Out-of-Distribution Generalization via Risk
    Extrapolation (REx)", ICML 2021) and DomainBed's ``VREx`` (the library's
    :class:`domaingrad.algorithms.VREx`) penalise the population variance of the
    environment losses instead, which for two environments is (L_0 - L_1)^2 / 4: four
    times weaker at the same weight, so it is not used here.

    Raises:
        DomainGradError: not exactly two losses.
    """
    losses = list(env_losses)
    if len(losses) != 2:
        raise DomainGradError(
            f"the Fishr coloredmnist V-REx penalty (L_0 - L_1)^2 takes exactly the two training "
            f"environments' losses, got {len(losses)}; for another number of environments use "
            f"the VREx algorithm (`domaingrad train --algorithm VREx`), which penalises their variance"
        )
    return (losses[0] - losses[1]) ** 2


def per_sample_classifier_grads(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, d+1): gradient of each sample's BCE w.r.t. (classifier weight, bias).

    For z = w.f + b and loss BCE(z, y): dloss/dw = (sigmoid(z) - y) f, dloss/db = sigmoid(z) - y.
    Differentiable (keeps the graph through ``features`` and ``logits``).
    """
    r = torch.sigmoid(logits) - y  # (n, 1)
    return torch.cat([r * features, r], dim=1)


def per_sample_classifier_grads_vmap(classifier: nn.Linear, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same as :func:`per_sample_classifier_grads`, with torch.func (vmap over grad)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in classifier.named_parameters()}

    def loss(p, f, t):
        z = functional_call(classifier, p, (f[None],))
        return F.binary_cross_entropy_with_logits(z, t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, features, y)
    return torch.cat([g["weight"].reshape(len(features), -1), g["bias"].reshape(len(features), -1)], 1)


def gradient_variance(grads: torch.Tensor) -> torch.Tensor:
    """Centred variance over samples (dim 0), divided by n."""
    return ((grads - grads.mean(dim=0, keepdim=True)) ** 2).mean(dim=0)


def fishr_penalty(variances: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_e sum_coordinates (v_e - mean_e v_e)^2 (the Fishr repo's IRM-setup penalty)."""
    v = torch.stack(list(variances))
    return ((v - v.mean(dim=0, keepdim=True)) ** 2).sum()
