"""Feature-alignment baselines: CORAL, MMD, DANN, CDANN, CausIRL_CORAL and CausIRL_MMD.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py``: ``AbstractMMD``, ``AbstractDANN``, ``AbstractCausIRL``;
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
    D(D-1)/2 domain pairs of ``distance(f_i, f_j)``.

    Under ``--task domain_adaptation`` (``unlabeled`` given: T batches (B_t,
    *input_shape) of unlabelled test-environment inputs) the features of each are one
    more domain of the penalty, which then averages over the (D+T)(D+T-1)/2 pairs of
    labelled and unlabelled domains; the class loss stays on the D labelled batches.
    DomainBed's ``AbstractMMD.update`` ignores ``unlabeled`` (no DomainBed algorithm
    reads it); this is the adaptation rule of Deep CORAL (Sun and Saenko, "Deep CORAL:
    Correlation Alignment for Deep Domain Adaptation", ECCV Workshops 2016: the alignment
    loss between the labelled source and the unlabelled target features is added to the
    classification loss), applied to DomainBed's pairwise multi-domain penalty. CORAL and
    MMD set ``uses_unlabeled``.
    """

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
        # domain adaptation: every unlabelled test-environment batch is one more domain of
        # the penalty (no class loss); without it this is DomainBed's update
        targets = [self.featurizer(x) for x in unlabeled or ()]
        penalty = self.penalty(features + targets)
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
    uses_unlabeled = True


class MMD(_AbstractMMD):
    """MMD-AAE's feature-level MMD penalty (Li et al. CVPR 2018), DomainBed's version
    (``AbstractMMD`` with ``gaussian=True``): penalty per domain pair is the biased
    MMD**2 with the kernel sum_g exp(-g d**2), g in {1e-3, ..., 1e3}
    (:func:`mmd_distance`).

    Hyperparameters (DomainBed ``hparams_registry``): ``mmd_gamma`` 1.0, search
    10**U(-1, 1).
    """

    distance = staticmethod(mmd_distance)
    uses_unlabeled = True


def class_balance_weights(y: torch.Tensor) -> torch.Tensor:
    """CDANN's per-example weights (DomainBed ``AbstractDANN`` with ``class_balance``):
    w_i = 1 / (n_{y_i} * K), n_c the count of class c in the batch and K = max(y) + 1
    (the classes ``F.one_hot`` sees, as in DomainBed, not ``num_classes``).

    Args:
        y: (B,) int64 labels.

    Returns:
        (B,) float32 weights (DomainBed's ``.float()``, kept for parity); they sum to
        (number of distinct labels) / K.
    """
    counts = F.one_hot(y).sum(dim=0)
    return 1.0 / (counts[y] * counts.shape[0]).float()


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
    omitted here (only the initial global-RNG consumption differs, after the
    discriminator, so a parity check copies the weights). As in DomainBed,
    the logged key is ``disc_loss`` on discriminator steps and ``gen_loss`` on
    generator steps.
    """

    update_count: torch.Tensor  # () long buffer, registered in __init__
    #: CDANN's switches (DomainBed's ``conditional`` and ``class_balance`` arguments)
    conditional = False
    class_balance = False

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
        disc_params = list(self.discriminator.parameters())
        if self.conditional:
            #: (num_classes, F) class embeddings added to the discriminator's input (CDANN)
            self.class_embeddings = nn.Embedding(num_classes, self.featurizer.n_outputs)
            disc_params += list(self.class_embeddings.parameters())
        betas = (self.hparams["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(
            disc_params,
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
        disc_input = all_z + self.class_embeddings(all_y) if self.conditional else all_z
        disc_out = self.discriminator(disc_input)
        disc_labels = torch.cat(
            [torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        if self.class_balance:
            disc_loss = (class_balance_weights(all_y) * F.cross_entropy(disc_out, disc_labels, reduction="none")).sum()
        else:
            disc_loss = F.cross_entropy(disc_out, disc_labels)
        input_grad = autograd.grad(
            F.cross_entropy(disc_out, disc_labels, reduction="sum"), [disc_input], create_graph=True
        )[0]
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


class CDANN(DANN):
    """Conditional DANN (Li, Tian, Gong, Liu, Liu, Zhang, Tao, "Deep Domain Generalization
    via Conditional Invariant Adversarial Networks", ECCV 2018), DomainBed's version
    (``AbstractDANN`` with ``conditional=True``, ``class_balance=True``).

    As :class:`DANN`, except: the discriminator sees z_i + e(y_i), with ``class_embeddings``
    e an ``nn.Embedding(num_classes, F)`` trained with the discriminator (in
    ``disc_opt``); its loss is class-balanced, disc_loss = sum_i w_i CE(domain_i) with
    :func:`class_balance_weights` w_i = 1 / (n_{y_i} K), plus ``grad_penalty`` times
    the mean squared norm of the gradient of the summed CE wrt that input z + e(y).

    Hyperparameters: DANN's, with DomainBed's DANN/CDANN block and the same
    small-image / large-image values for ``lr_g``, ``lr_d`` and ``weight_decay_g``.

    Deviation from the paper (kept from DomainBed): the paper trains one
    discriminator per class; DomainBed (and this class) conditions one discriminator on
    the label through an additive embedding. K is the largest label in the batch plus
    one, as DomainBed's ``one_hot`` counts, not ``num_classes``.

    Parity: attribute names are DomainBed's (``featurizer``, ``classifier``,
    ``discriminator``, ``class_embeddings``, ``disc_opt``, ``gen_opt``); only
    ``update_count`` is a () buffer here and a (1,) buffer in DomainBed.
    """

    conditional = True
    class_balance = True


class _AbstractCausIRL(_AbstractMMD):
    """DomainBed's ``AbstractCausIRL``: each domain is forwarded separately; the
    objective is mean_d CE(logits_d + 1e-16, y_d); every domain's features (B_d, F) are
    cut at a random index s_d ~ U{0, ..., B_d - 1}; the heads f_d[:s_d] of all domains
    are concatenated into one sample, the tails f_d[s_d:] into another, and the penalty
    is ``nan_to_num(distance(heads, tails))`` when both have at least 2 rows, else 0.
    Loss = objective + ``mmd_gamma`` * penalty, one Adam step on the network.

    Randomness: the cuts come from :meth:`draw_cut`, drawn from ``self.generator`` (a
    ``torch.Generator`` seeded from the global torch RNG at construction, saved by
    ``training_state``); DomainBed draws them with ``np.random.randint`` from numpy's
    global generator. Same distribution; a resumed run continues identically.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def draw_cut(self, n: int) -> int:
        """A cut index uniform on {0, ..., n - 1} for a domain of n >= 1 examples."""
        return int(torch.randint(n, (1,), generator=self.generator))

    @classmethod
    def split_penalty(cls, features: list[torch.Tensor], cuts: list[int]) -> torch.Tensor:
        """``distance`` between the concatenated heads f_d[:cut_d] and tails f_d[cut_d:]
        of the (B_d, F) features, NaN mapped to 0 (DomainBed's ``nan_to_num``); a zero
        scalar when either side has fewer than 2 rows."""
        first = torch.cat([f[:c] for f, c in zip(features, cuts)])
        second = torch.cat([f[c:] for f, c in zip(features, cuts)])
        if len(first) > 1 and len(second) > 1:
            return torch.nan_to_num(cls.distance(first, second))
        return features[0].new_zeros(())

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        losses = [F.cross_entropy(self.classifier(f) + 1e-16, y) for f, (_, y) in zip(features, minibatches)]
        objective = sum(losses[1:], losses[0]) / len(losses)  # left to right, as DomainBed
        cuts = [self.draw_cut(len(f)) for f in features]
        penalty = self.split_penalty(features, cuts)
        self.optimizer.zero_grad(set_to_none=True)
        (objective + self.hparams["mmd_gamma"] * penalty).backward()
        self.optimizer.step()
        return {"loss": objective.item(), "penalty": penalty.item()}


class CausIRL_CORAL(_AbstractCausIRL):
    """CausIRL with the CORAL distance (Chevalley, Bunne, Krause, Bauer, "Invariant Causal
    Mechanisms through Distribution Matching", arXiv:2206.11646, 2022), DomainBed's
    ``CausIRL_CORAL``: the penalty is :func:`coral_distance` between two random splits
    of the pooled features (see ``_AbstractCausIRL``), matching P(Z | do(D)) across
    interventions instead of pairwise domain distributions.

    Hyperparameters (DomainBed ``hparams_registry``, shared with CORAL/MMD):
    ``mmd_gamma`` 1.0, search 10**U(-1, 1).

    Deviation: the cut indices come from ``self.generator`` (DomainBed: numpy's global
    RNG); to compare with DomainBed, replace :meth:`draw_cut` by ``np.random.randint(0,
    n)`` and seed numpy identically on both sides. Parity attribute names: ``featurizer``,
    ``classifier``, ``network``, ``optimizer`` as in DomainBed.
    """

    distance = staticmethod(coral_distance)


class CausIRL_MMD(_AbstractCausIRL):
    """CausIRL with the Gaussian-kernel MMD (Chevalley, Bunne, Krause, Bauer, "Invariant
    Causal Mechanisms through Distribution Matching", arXiv:2206.11646, 2022),
    DomainBed's ``CausIRL_MMD``: the penalty is :func:`mmd_distance` (kernel
    sum_g exp(-g d**2), g in {1e-3, ..., 1e3}) between two random splits of the pooled
    features (see ``_AbstractCausIRL``).

    Hyperparameters (DomainBed ``hparams_registry``): ``mmd_gamma`` 1.0, search
    10**U(-1, 1).

    Deviation: as :class:`CausIRL_CORAL` (cuts from ``self.generator``, not numpy's
    global RNG; :meth:`draw_cut` is the one place to replace for a parity run).
    """

    distance = staticmethod(mmd_distance)
