"""Feature-alignment baselines: CORAL, MMD and DANN.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py``: ``AbstractMMD``, ``AbstractDANN``;
``domainbed/networks.py``: ``MLP``; ``domainbed/hparams_registry.py``; Gulrajani &
Lopez-Paz, ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd, nn

from .. import models
from ..hparams import HParam
from .base import Algorithm, Minibatches
from .erm import ERM

#: DomainBed's ``AbstractMMD.gaussian_kernel`` bandwidths
GAUSSIAN_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)

_MMD_GAMMA = HParam(
    "mmd_gamma",
    1.0,
    lambda r: float(10 ** r.uniform(-1, 1)),
    "weight of the feature-distance penalty (DomainBed: 1.0, 10**U(-1,1))",
)


def coral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's ``mean_cov`` kernel: mean((mu_x - mu_y)**2) + mean((C_x - C_y)**2).

    Args:
        x: (n, F) features of one domain; y: (m, F) of another (n, m >= 2).

    Returns:
        Scalar; covariances use the unbiased n - 1 normalisation.
    """
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = cent_x.t() @ cent_x / (len(x) - 1)
    cova_y = cent_y.t() @ cent_y / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def squared_distances(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances, clamped at 1e-30 (DomainBed ``my_cdist``)."""
    x1_norm = x1.pow(2).sum(dim=-1, keepdim=True)
    x2_norm = x2.pow(2).sum(dim=-1, keepdim=True)
    res = torch.addmm(x2_norm.transpose(-2, -1), x1, x2.transpose(-2, -1), alpha=-2) + x1_norm
    return res.clamp_min(1e-30)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, gammas: tuple[float, ...] = GAUSSIAN_GAMMAS) -> torch.Tensor:
    """(n, m) kernel matrix sum_g exp(-g * ||x_i - y_j||**2) (DomainBed)."""
    dist = squared_distances(x, y)
    return sum((torch.exp(-g * dist) for g in gammas), torch.zeros_like(dist))


def mmd_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD**2 estimate with the Gaussian mixture kernel:
    mean K(x, x) + mean K(y, y) - 2 mean K(x, y). x: (n, F), y: (m, F)."""
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()


class _AbstractMMD(ERM):
    """DomainBed's ``AbstractMMD``: per domain features f_d = featurizer(x_d) (each
    domain forwarded separately); loss = mean_d CE_d + ``mmd_gamma`` * mean over the
    D(D-1)/2 domain pairs of ``distance(f_i, f_j)``."""

    @staticmethod
    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [_MMD_GAMMA]

    def penalty(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Mean of ``distance`` over the domain pairs i < j ((B_d, F) features each);
        0 for a single domain."""
        n = len(features)
        pairs = [self.distance(features[i], features[j]) for i in range(n) for j in range(i + 1, n)]
        if not pairs:
            return features[0].new_zeros(())
        return torch.stack(pairs).mean()

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        objective = torch.stack(
            [F.cross_entropy(self.classifier(f), y) for f, (_, y) in zip(features, minibatches)]
        ).mean()
        penalty = self.penalty(features)
        self.optimizer.zero_grad(set_to_none=True)
        (objective + self.hparams["mmd_gamma"] * penalty).backward()
        self.optimizer.step()
        return {"loss": objective.item(), "penalty": penalty.item()}


class CORAL(_AbstractMMD):
    """Deep CORAL (Sun & Saenko, ECCV-W 2016, arXiv:1607.01719), DomainBed's version
    (``AbstractMMD`` with ``gaussian=False``): penalty per domain pair
    mean((mu_i - mu_j)**2) + mean((C_i - C_j)**2) on the features, covariance with
    n - 1 (:func:`coral_distance`).

    Hyperparameters (DomainBed ``hparams_registry``): ``mmd_gamma`` 1.0, search
    10**U(-1, 1).
    """

    distance = staticmethod(coral_distance)


class MMD(_AbstractMMD):
    """MMD-AAE's feature-level MMD penalty (Li et al. CVPR 2018), DomainBed's version
    (``AbstractMMD`` with ``gaussian=True``): penalty per domain pair is the biased
    MMD**2 with the kernel sum_g exp(-g d**2), g in {1e-3, ..., 1e3}
    (:func:`mmd_distance`).

    Hyperparameters (DomainBed ``hparams_registry``): ``mmd_gamma`` 1.0, search
    10**U(-1, 1).
    """

    distance = staticmethod(mmd_distance)


class MLP(nn.Module):
    """DomainBed's ``networks.MLP``: Linear(n_inputs, width), then ``mlp_depth - 2``
    hidden Linear(width, width), each followed by Dropout(``mlp_dropout``) and ReLU,
    then Linear(width, n_outputs). Input (B, n_inputs); output (B, n_outputs)."""

    def __init__(self, n_inputs: int, n_outputs: int, hparams: dict[str, Any]):
        super().__init__()
        width = hparams["mlp_width"]
        self.input = nn.Linear(n_inputs, width)
        self.dropout = nn.Dropout(hparams["mlp_dropout"])
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(hparams["mlp_depth"] - 2)])
        self.output = nn.Linear(width, n_outputs)
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for hidden in self.hiddens:
            x = F.relu(self.dropout(hidden(x)))
        return self.output(x)


class DANN(Algorithm):
    """Domain-Adversarial Neural Networks (Ganin et al. JMLR 2016, arXiv:1505.07818),
    DomainBed's version (``AbstractDANN`` with ``conditional=False``,
    ``class_balance=False``).

    A discriminator :class:`MLP` predicts the domain from the features z (B, F) of the
    concatenated batch. ``update_count`` (a buffer) is incremented first; then if
    ``update_count % (1 + d_steps_per_g_step) < d_steps_per_g_step`` the discriminator
    takes an Adam step on disc_loss = CE(domain) + ``grad_penalty`` * mean_i
    ||d CE_sum / d z_i||**2, otherwise featurizer and classifier take one on
    CE(class) - ``lambda`` * disc_loss. Both Adams use betas (``beta1``, 0.9).

    Hyperparameters (DomainBed ``hparams_registry``, DANN block): ``lambda`` 1.0,
    10**U(-2, 2); ``weight_decay_d`` 0, 10**U(-6, -2); ``d_steps_per_g_step`` 1,
    int(2**U(0, 3)); ``grad_penalty`` 0, 10**U(-2, 1); ``beta1`` 0.5, choice
    [0, 0.5]; ``mlp_width`` 256, int(2**U(6, 10)); ``mlp_depth`` 3, choice [3, 4, 5];
    ``mlp_dropout`` 0, choice [0, 0.1, 0.5]. Dataset-dependent (small images /
    others): ``lr_g`` and ``lr_d`` 1e-3, 10**U(-4.5, -2.5) / 5e-5, 10**U(-5, -3.5);
    ``weight_decay_g`` 0, 0 / 0, 10**U(-6, -2). The common ``lr`` and
    ``weight_decay`` are unused, as in DomainBed.

    Deviations: DomainBed also builds ``class_embeddings`` (used only by CDANN) and
    gives them to the discriminator optimizer; DANN never uses them, so they are
    omitted here (only the initial global-RNG consumption differs). As in DomainBed,
    the logged key is ``disc_loss`` on discriminator steps and ``gen_loss`` on
    generator steps.
    """

    update_count: torch.Tensor  # () long buffer, registered in __init__

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        specs = [
            HParam(
                "lambda",
                1.0,
                lambda r: float(10 ** r.uniform(-2, 2)),
                "weight of the adversarial term (DomainBed: 1.0, 10**U(-2,2))",
            ),
            HParam(
                "weight_decay_d",
                0.0,
                lambda r: float(10 ** r.uniform(-6, -2)),
                "discriminator weight decay (DomainBed: 0, 10**U(-6,-2))",
            ),
            HParam(
                "d_steps_per_g_step",
                1,
                lambda r: int(2 ** r.uniform(0, 3)),
                "discriminator steps per generator step (DomainBed: 1, int(2**U(0,3)))",
            ),
            HParam(
                "grad_penalty",
                0.0,
                lambda r: float(10 ** r.uniform(-2, 1)),
                "weight of the discriminator input-gradient penalty (DomainBed: 0, 10**U(-2,1))",
            ),
            HParam(
                "beta1",
                0.5,
                lambda r: float(r.choice([0.0, 0.5])),
                "Adam beta1 of both optimizers (DomainBed: 0.5, choice [0, 0.5])",
            ),
            HParam(
                "mlp_width",
                256,
                lambda r: int(2 ** r.uniform(6, 10)),
                "discriminator width (DomainBed: 256, int(2**U(6,10)))",
            ),
            HParam(
                "mlp_depth",
                3,
                lambda r: int(r.choice([3, 4, 5])),
                "discriminator depth in Linear layers (DomainBed: 3, choice [3,4,5])",
            ),
            HParam(
                "mlp_dropout",
                0.0,
                lambda r: float(r.choice([0.0, 0.1, 0.5])),
                "discriminator dropout (DomainBed: 0, choice [0,0.1,0.5])",
            ),
        ]
        if small_images:
            specs += [
                HParam(
                    "lr_g",
                    1e-3,
                    lambda r: float(10 ** r.uniform(-4.5, -2.5)),
                    "generator learning rate (DomainBed: 1e-3, 10**U(-4.5,-2.5))",
                ),
                HParam(
                    "lr_d",
                    1e-3,
                    lambda r: float(10 ** r.uniform(-4.5, -2.5)),
                    "discriminator learning rate (DomainBed: 1e-3, 10**U(-4.5,-2.5))",
                ),
                HParam("weight_decay_g", 0.0, lambda r: 0.0, "generator weight decay (DomainBed: 0, 0)"),
            ]
        else:
            specs += [
                HParam(
                    "lr_g",
                    5e-5,
                    lambda r: float(10 ** r.uniform(-5, -3.5)),
                    "generator learning rate (DomainBed: 5e-5, 10**U(-5,-3.5))",
                ),
                HParam(
                    "lr_d",
                    5e-5,
                    lambda r: float(10 ** r.uniform(-5, -3.5)),
                    "discriminator learning rate (DomainBed: 5e-5, 10**U(-5,-3.5))",
                ),
                HParam(
                    "weight_decay_g",
                    0.0,
                    lambda r: float(10 ** r.uniform(-6, -2)),
                    "generator weight decay (DomainBed: 0, 10**U(-6,-2))",
                ),
            ]
        return specs

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        self.classifier = models.classifier(
            self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"]
        )
        self.discriminator = MLP(self.featurizer.n_outputs, num_domains, self.hparams)
        betas = (self.hparams["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=self.hparams["lr_d"],
            weight_decay=self.hparams["weight_decay_d"],
            betas=betas,
        )
        self.gen_opt = torch.optim.Adam(
            list(self.featurizer.parameters()) + list(self.classifier.parameters()),
            lr=self.hparams["lr_g"],
            weight_decay=self.hparams["weight_decay_g"],
            betas=betas,
        )

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        self.update_count += 1
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        all_z = self.featurizer(all_x)
        disc_out = self.discriminator(all_z)
        disc_labels = torch.cat(
            [torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        disc_loss = F.cross_entropy(disc_out, disc_labels)
        input_grad = autograd.grad(F.cross_entropy(disc_out, disc_labels, reduction="sum"), [all_z], create_graph=True)[
            0
        ]
        grad_penalty = (input_grad**2).sum(dim=1).mean(dim=0)
        disc_loss = disc_loss + self.hparams["grad_penalty"] * grad_penalty

        d_steps = self.hparams["d_steps_per_g_step"]
        if int(self.update_count) % (1 + d_steps) < d_steps:
            self.disc_opt.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_opt.step()
            return {"disc_loss": disc_loss.item()}
        classifier_loss = F.cross_entropy(self.classifier(all_z), all_y)
        gen_loss = classifier_loss - self.hparams["lambda"] * disc_loss
        self.disc_opt.zero_grad(set_to_none=True)
        self.gen_opt.zero_grad(set_to_none=True)
        gen_loss.backward()
        self.gen_opt.step()
        return {"gen_loss": gen_loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))
