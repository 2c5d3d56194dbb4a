"""MixStyle (Zhou, Yang, Qiao, Xiang, "Domain Generalization with MixStyle", ICLR 2021):
mixing of feature statistics after chosen featurizer stages, random and cross-domain
variants. DomainBed has no MixStyle; the rule and its defaults follow the paper
(Section 3: the mixed statistics gamma_mix and beta_mix, the random and cross-domain
shuffles of Fig. 2) and the authors' code (KaiyangZhou/mixstyle-release, the ``MixStyle``
module of Dassl, ``imcls`` ResNets ``resnet18_ms_l123``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DomainGradError
from ..hparams import Bounds, HParam
from .base import Minibatches, concat_minibatches
from .erm import ERM

#: ``mixstyle_mix`` values: shuffle the whole batch, or pair examples across domains
MIXSTYLE_MIXES = ("random", "crossdomain")

#: the authors' epsilon added to the variance before the square root (``eps=1e-6``)
MIXSTYLE_EPS = 1e-6

#: ``mixstyle_variance`` values: the paper's 1/(HW) variance, or the authors' code's 1/(HW - 1)
MIXSTYLE_VARIANCES = ("biased", "unbiased")


def instance_statistics(
    x: torch.Tensor, eps: float = MIXSTYLE_EPS, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example, per-channel mean and standard deviation of ``x`` (N, C, H, W) over H, W,
    ``mu = mean_hw x`` and ``sigma = sqrt(var + eps)``, both detached, shape (N, C, 1, 1).
    ``var`` is the paper's instance-normalisation variance ``mean_hw (x - mu)**2``
    (Zhou et al., ICLR 2021, Section 2, the AdaIN statistics) or, with ``unbiased``, the
    authors' code's ``x.var(dim=[2, 3])`` (divided by H*W - 1).

    Raises:
        DomainGradError: for an input that is not (N, C, H, W) with H * W >= 2 (the
            unbiased variance of one position is undefined; one position has no style).
    """
    if x.ndim != 4 or x.shape[2] * x.shape[3] < 2:
        raise DomainGradError(
            f"MixStyle needs (N, C, H, W) maps with at least 2 positions, got shape {tuple(x.shape)}; "
            "choose other mixstyle_layers"
        )
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True, correction=1 if unbiased else 0) + eps).sqrt()
    return mu.detach(), sig.detach()


def mixstyle(
    x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, eps: float = MIXSTYLE_EPS, unbiased: bool = False
) -> torch.Tensor:
    """MixStyle of a batch of maps (Zhou et al., ICLR 2021, Section 3):

        gamma_mix = lam * sigma(x) + (1 - lam) * sigma(x[perm])
        beta_mix  = lam * mu(x)    + (1 - lam) * mu(x[perm])
        out       = gamma_mix * (x - mu(x)) / sigma(x) + beta_mix

    with mu, sigma the detached per-example, per-channel statistics of
    :func:`instance_statistics` (``unbiased``: the authors' code's variance). So the
    output's mean over H, W is exactly ``beta_mix`` and its standard deviation (of the
    same kind as ``var``) ``gamma_mix * sqrt(var / (var + eps))``.

    Args:
        x: (N, C, H, W) maps.
        perm: (N,) int64, example i takes the style of example ``perm[i]``.
        lam: (N,) mixing weights in [0, 1] (Beta(alpha, alpha) draws).
        eps: added to the variance.
        unbiased: divide the variance by H*W - 1 (the authors' code) instead of H*W.

    Returns:
        (N, C, H, W), gradients flowing through the normalised maps only.
    """
    mu, sig = instance_statistics(x, eps, unbiased)
    lam = lam.to(dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    perm = perm.to(x.device)
    mu_mix = mu * lam + mu[perm] * (1 - lam)
    sig_mix = sig * lam + sig[perm] * (1 - lam)
    return (x - mu) / sig * sig_mix + mu_mix


def crossdomain_permutation(sizes: list[int], generator: torch.Generator) -> torch.Tensor:
    """Mixing partners from other domains, for a batch of domains concatenated in order
    with ``sizes[k]`` examples each: (sum(sizes),) int64 indices into that batch.

    Two domains (the authors' case: their sampler puts two domains in every batch,
    ``RandomDomainSampler`` with ``N_DOMAIN: 2``): domain 0 takes its partners from
    domain 1 and domain 1 from domain 0, each in random order, drawing exactly what the
    authors' ``crossdomain`` branch draws (its reversed halves indexed by
    ``randperm(n)``, first half then second). More domains (a DomainBed batch holds
    every training domain; the paper defines two): one shift ``s`` drawn uniformly
    from 1..K-1, domain k takes its partners from domain (k + s) mod K, in random order
    (domaingrad's generalisation; for K = 2 it is the authors' rule). A partner domain
    with fewer examples than k is cycled through successive random permutations.

    Raises:
        DomainGradError: for fewer than two domains or an empty domain.
    """
    if len(sizes) < 2 or min(sizes) < 1:
        raise DomainGradError(
            f"cross-domain MixStyle needs at least two non-empty training domains, got batch sizes {sizes}; "
            "use mixstyle_mix 'random'"
        )
    k_domains = len(sizes)
    starts = np.cumsum([0] + list(sizes)).tolist()
    shift = 1 if k_domains == 2 else 1 + int(torch.randint(k_domains - 1, (1,), generator=generator))
    parts = []
    for k in range(k_domains):
        j = (k + shift) % k_domains
        reversed_j = torch.arange(starts[j + 1] - 1, starts[j] - 1, -1)
        picks: list[torch.Tensor] = []
        while sum(len(p) for p in picks) < sizes[k]:
            picks.append(reversed_j[torch.randperm(sizes[j], generator=generator)])
        parts.append(torch.cat(picks)[: sizes[k]])
    return torch.cat(parts)


class MixStyle(ERM):
    """MixStyle (Zhou, Yang, Qiao, Xiang, "Domain Generalization with MixStyle", ICLR 2021):
    ERM whose featurizer, during training, mixes the feature statistics of its examples
    after chosen stages (:func:`mixstyle`, Section 3); prediction uses the plain network
    (MixStyle is used in training only).

    Each training step, at each chosen stage in order, with probability ``mixstyle_p``
    (the authors' ``random.random() > p`` skips): ``lam`` ~ Beta(``mixstyle_alpha``,
    ``mixstyle_alpha``) per example and partners ``perm``:

    * ``random`` (default, Fig. 2a): ``perm`` a random permutation of the
      concatenated batch;
    * ``crossdomain`` (Fig. 2b): every example's partner from another domain
      (:func:`crossdomain_permutation`).

    Then CE of the classifier on the mixed features, one Adam step (DomainBed's
    optimizer, as every domaingrad baseline; the authors train with SGD and a cosine
    schedule).

    Defaults (the paper's implementation details and the authors' code): p 0.5, alpha 0.1, eps 1e-6,
    stages ``auto`` = the first three stages of the featurizer: ResNet ``layer1``-
    ``layer3`` (the authors' ``resnet18_ms_l123`` for PACS; ``layer1,layer2`` is their
    Office-Home ``ms_l12``), MNIST_CNN ``conv1``-``conv3``, AlexNet ``conv1``-``conv3``.
    The paper gives no search ranges, so the random search keeps these values.

    Statistics (``mixstyle_variance``): ``biased`` (default) is the paper's
    instance-normalisation variance (1/(HW), Section 2); ``unbiased`` is the authors'
    code (``x.var``, 1/(HW - 1)), for parity with their module. The factor HW/(HW - 1)
    cancels in gamma_mix / sigma, so the two differ only through eps.

    Deviation (reproducibility): the authors draw the skip from Python's ``random`` and
    lam and the permutations from torch's global generator; here all three come from
    ``self.generator`` (seeded from the global torch RNG at construction and saved by
    ``training_state``), in the same order per stage (skip, lam, perm); lam is
    ``np.random.RandomState(s).beta(alpha, alpha, N)`` with ``s`` drawn from that
    generator, the same distribution. A resumed run continues identically.

    Attributes:
        featurizer, classifier, network, optimizer: as :class:`~domaingrad.algorithms.ERM`.
        stages: the chosen stage names.
        generator: the ``torch.Generator`` of every draw.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "mixstyle_layers",
                "auto",
                lambda r: "auto",
                "stages followed by MixStyle: 'auto' (the first three: ResNet layer1-3, the paper's "
                "choice) or comma-separated stage names",
            ),
            HParam(
                "mixstyle_p",
                0.5,
                lambda r: 0.5,
                "probability of mixing at each chosen stage (paper: 0.5, not searched)",
                bounds=Bounds(0.0, 1.0),
            ),
            HParam(
                "mixstyle_alpha",
                0.1,
                lambda r: 0.1,
                "Beta(alpha, alpha) parameter of the mixing weight (paper: 0.1, not searched)",
                bounds=Bounds(0.0, low_open=True),
            ),
            HParam(
                "mixstyle_mix",
                "random",
                lambda r: "random",
                "random: shuffle the batch; crossdomain: partners from other domains (paper: both)",
                choices=MIXSTYLE_MIXES,
            ),
            HParam(
                "mixstyle_variance",
                "biased",
                lambda r: "biased",
                "biased: the paper's 1/(HW) instance variance; unbiased: the authors' code (x.var)",
                choices=MIXSTYLE_VARIANCES,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["mixstyle_mix"] not in MIXSTYLE_MIXES:
            raise DomainGradError(
                f"hyperparameter 'mixstyle_mix' must be one of {list(MIXSTYLE_MIXES)}, "
                f"got {self.hparams['mixstyle_mix']!r}"
            )
        if self.hparams["mixstyle_variance"] not in MIXSTYLE_VARIANCES:
            raise DomainGradError(
                f"hyperparameter 'mixstyle_variance' must be one of {list(MIXSTYLE_VARIANCES)}, "
                f"got {self.hparams['mixstyle_variance']!r}"
            )
        if self.hparams["mixstyle_mix"] == "crossdomain" and num_domains < 2:
            raise DomainGradError(
                f"cross-domain MixStyle needs at least two training domains, got {num_domains}; "
                "use mixstyle_mix 'random' or hold out fewer environments"
            )
        if not 0.0 <= self.hparams["mixstyle_p"] <= 1.0:
            raise DomainGradError(f"hyperparameter 'mixstyle_p' must be in [0, 1], got {self.hparams['mixstyle_p']}")
        if not self.hparams["mixstyle_alpha"] > 0:
            raise DomainGradError(f"hyperparameter 'mixstyle_alpha' must be > 0, got {self.hparams['mixstyle_alpha']}")
        self.stages = self.resolve_stages(self.hparams["mixstyle_layers"])
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def resolve_stages(self, spec: str) -> tuple[str, ...]:
        """``mixstyle_layers`` as stage names: ``auto`` = the featurizer's first three
        stages, else the comma-separated names.

        Raises:
            DomainGradError: for an unknown stage name or an empty list.
        """
        available = tuple(self.featurizer.stage_names)
        if spec == "auto":
            return available[:3]
        names = tuple(n.strip() for n in spec.split(",") if n.strip())
        bad = [n for n in names if n not in available]
        if bad or not names:
            raise DomainGradError(
                f"mixstyle_layers {spec!r}: unknown stage(s) {bad}; expected 'auto' or a comma-separated "
                f"list of: {', '.join(available)}"
            )
        return names

    def draw_lambda(self, n: int) -> torch.Tensor:
        """(n,) float64 draws of Beta(mixstyle_alpha, mixstyle_alpha) from ``self.generator``."""
        seed = int(torch.randint(2**31, (1,), generator=self.generator))
        alpha = self.hparams["mixstyle_alpha"]
        return torch.from_numpy(np.random.RandomState(seed).beta(alpha, alpha, size=n))

    def draw_partners(self, sizes: list[int]) -> torch.Tensor:
        """(sum(sizes),) partner indices: a random permutation, or cross-domain partners."""
        if self.hparams["mixstyle_mix"] == "random":
            return torch.randperm(sum(sizes), generator=self.generator)
        return crossdomain_permutation(sizes, self.generator)

    def stage_hook(self, sizes: list[int]):
        """The ``stage_fn`` of one training forward pass over domains of ``sizes``."""

        def stage_fn(name: str, out: torch.Tensor) -> torch.Tensor:
            if name not in self.stages or not self.training:
                return out
            if float(torch.rand((), generator=self.generator)) > self.hparams["mixstyle_p"]:
                return out
            lam = self.draw_lambda(out.shape[0])
            unbiased = self.hparams["mixstyle_variance"] == "unbiased"
            return mixstyle(out, self.draw_partners(sizes), lam, unbiased=unbiased)

        return stage_fn

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        x, y = concat_minibatches(minibatches)
        sizes = [len(xd) for xd, _ in minibatches]
        loss = F.cross_entropy(self.classifier(self.featurizer(x, stage_fn=self.stage_hook(sizes))), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}
