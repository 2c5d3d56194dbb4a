"""DMG, domain-specific masks (seed 001), and the Multi-Headed baseline of that paper."""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DomainGradError
from ..hparams import HParam
from .base import Minibatches
from .erm import ERM

#: the name of the featurizer output (the classifier input) among DMG's layers
FEATURES = "features"


def soft_iou(m_i: torch.Tensor, m_j: torch.Tensor) -> torch.Tensor:
    """DMG's soft IoU, ``(m_i . m_j + 1e-6) / (sum(m_i + m_j - m_i * m_j) + 1e-6)``
    (seed 001, Eq. 2, with the official code's 1e-6 terms; METHODS.md section 5).

    Args:
        m_i, m_j: (..., k) mask probabilities in [0, 1]; the sums run over the last axis.

    Returns:
        (...) soft IoU.
    """
    inter = (m_i * m_j).sum(-1)
    union = (m_i + m_j - m_i * m_j).sum(-1)
    return (inter + 1e-6) / (union + 1e-6)


def mask_statistics(probs: torch.Tensor) -> tuple[float, float]:
    """DMG's mask diagnostic (seed 001, Section 7.1): binarise at 0.5, then the mean
    pairwise IoU over domain pairs and the mean fraction of active units.

    Args:
        probs: (D, k) soft masks of D >= 1 domains.

    Returns:
        (mean pairwise IoU, fraction active). Two empty masks count as IoU 1 (identical);
        with one domain the IoU is 1.
    """
    hard = probs.detach() > 0.5
    active = hard.float().mean().item()
    pairs = list(itertools.combinations(range(hard.shape[0]), 2))
    if not pairs:
        return 1.0, active
    i, j = torch.tensor(pairs).T
    inter = (hard[i] & hard[j]).sum(-1).float()
    union = (hard[i] | hard[j]).sum(-1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return iou.mean().item(), active


def _broadcast(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(B, C) mask -> (B, C, 1, ..., 1) to multiply a (B, C, ...) activation."""
    return mask.view(*mask.shape, *([1] * (out.ndim - 2)))


def default_dmg_layers(featurizer: nn.Module) -> tuple[str, ...]:
    """DMG's official placement: the inputs of the last two blocks and of the classifier.

    AlexNet (stages ending "pool5", "fc6"): pool5 and fc6 outputs = fc6 and fc7 inputs,
    plus the features (fc8 input). Otherwise the outputs of the third- and second-last
    stages (ResNet: layer2, layer3 = layer3, layer4 inputs; MNIST_CNN: conv2, conv3),
    plus the features.
    """
    names = tuple(featurizer.stage_names)
    if names[-2:] == ("pool5", "fc6"):
        return ("pool5", "fc6", FEATURES)
    return (*names[-3:-1], FEATURES)


def resolve_layers(featurizer: nn.Module, spec: str) -> tuple[str, ...]:
    """Parse the ``dmg_layers`` hyperparameter: "auto" or comma-separated stage names
    and/or "features".

    Raises:
        DomainGradError: for a name that is neither a stage of the featurizer nor "features".
    """
    if spec == "auto":
        return default_dmg_layers(featurizer)
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    valid = (*featurizer.stage_names, FEATURES)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise DomainGradError(f"dmg_layers {spec!r}: unknown layer(s) {bad}; expected 'auto' or a comma-separated "
                              f"list of: {', '.join(valid)}")
    return tuple(n for n in valid if n in names)  # network order


class DMG(ERM):
    """DMG (seed 001, Chattopadhyay et al., "Learning to Balance Specificity and
    Invariance for In and Out of Domain Generalization", ECCV 2020; METHODS.md section 5).

    For each training domain d and masked layer, mask logits ``m~^d`` (one per channel of
    a conv map, broadcast over H x W; one per unit of a flat layer), initialised
    U(0, 1); probabilities ``m^d = sigmoid(m~^d)``. Training: all domains' minibatches in
    one batch; every sample draws its own hard mask ~ Bernoulli(m^d) of its domain d from
    ``self.generator``; straight-through estimator (forward the hard mask, backward as if
    the probabilities had been used); ``activation * mask`` without rescaling. Loss =
    mean cross-entropy + ``dmg_lambda`` * sum over layers of the mean over domain pairs
    of :func:`soft_iou` of the soft probabilities (the paper's Eq. 3 sums over pairs;
    METHODS.md and this class take the mean, which is the sum divided by D(D-1)/2). One
    Adam (lr, weight_decay) over the network and the masks, as in the paper.

    ``dmg_layers`` "auto" masks the official placement (:func:`default_dmg_layers`):
    ResNet layer3, layer4 and fc inputs; AlexNet fc6, fc7, fc8 inputs; MNIST_CNN conv3,
    conv4 and classifier inputs. As in the official code, AlexNet's dropout (``drop6``,
    ``drop7``) is switched off; other featurizer options (``resnet_dropout``) stay as set.

    Prediction (``predict``, unseen domain), chosen by ``dmg_predict``:

    * "pred_ens" (the paper's Pred-Ens, default): scale the activations by each
      domain's soft mask ``m^d``, average the D predictions. The paper does not say
      whether probabilities or logits; here the softmax *probabilities* are averaged and
      the returned logits are the log of that average (same argmax, softmax gives the
      average back).
    * "pred_ens_logits": the same, but averaging raw logits (the official code).
    * "mask_ens" (Mask-Ens, Section 7.3): average the soft masks, one prediction.

    DMG-KD (known source domain d): :meth:`predict_domain` with that domain's soft mask,
    or its hard mask ``m^d > 0.5`` (``hard=True``, the official source validation).
    domaingrad's evaluation calls ``predict`` on every split, so training-domain
    validation accuracy (model selection) uses ``dmg_predict`` too, not the official
    hard own-domain mask.

    ``update`` returns ``loss``, ``ce``, ``siou`` (the unweighted penalty) and per masked
    layer ``mask_iou_<layer>`` (mean pairwise IoU of the masks binarised at 0.5) and
    ``mask_active_<layer>`` (fraction of units with ``m^d > 0.5``), so every results
    record carries the mask statistics.

    Attributes (besides ERM's): ``mask_logits`` (ParameterDict layer -> (D, k)),
    ``layers`` (masked layer names in network order), ``generator``.
    """

    PREDICT = ("pred_ens", "pred_ens_logits", "mask_ens")

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam("dmg_lambda", 0.1, lambda r: float(10 ** r.uniform(-5, 0)),
                   "lambda_O, weight of the soft-IoU overlap penalty (seed 001: 0.1, swept 0 and 1e-5..1)"),
            HParam("dmg_layers", "auto", lambda r: "auto",
                   "masked layers: 'auto' (official placement) or comma-separated stage names / 'features'"),
            HParam("dmg_predict", "pred_ens", lambda r: "pred_ens",
                   "predict(): 'pred_ens' (average probabilities), 'pred_ens_logits' (official code), "
                   "'mask_ens'", choices=cls.PREDICT),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["dmg_predict"] not in self.PREDICT:
            raise DomainGradError(f"hyperparameter 'dmg_predict' must be one of {list(self.PREDICT)}, "
                                  f"got {self.hparams['dmg_predict']!r}")
        for name in ("drop6", "drop7"):  # AlexNet's dropout, off for DMG (official code)
            if isinstance(getattr(self.featurizer, name, None), nn.Dropout):
                getattr(self.featurizer, name).p = 0.0
        self.layers = resolve_layers(self.featurizer, self.hparams["dmg_layers"])
        sizes = {**dict(self.featurizer.stage_channels), FEATURES: self.featurizer.n_outputs}
        self.mask_logits = nn.ParameterDict(
            {name: nn.Parameter(torch.rand(num_domains, sizes[name])) for name in self.layers})
        self.optimizer = self.make_optimizer(list(self.network.parameters()) + list(self.mask_logits.parameters()))
        self.generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))

    def soft_masks(self) -> dict[str, torch.Tensor]:
        """Layer -> (D, k) probabilities ``sigmoid(mask_logits)``."""
        return {name: torch.sigmoid(logits) for name, logits in self.mask_logits.items()}

    def forward_masked(self, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits with each masked layer's output multiplied by ``masks[layer]`` of shape
        (B, k) (broadcast over H x W): x (B, *input_shape) -> (B, num_classes)."""
        def stage_fn(name: str, out: torch.Tensor) -> torch.Tensor:
            return out * _broadcast(masks[name], out) if name in masks else out
        features = self.featurizer(x, stage_fn=stage_fn)
        if FEATURES in masks:
            features = features * masks[FEATURES]
        return self.classifier(features)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        domain = torch.cat([torch.full((len(y),), d, dtype=torch.long) for d, (_, y) in enumerate(minibatches)])
        probs = self.soft_masks()
        masks = {}
        for name, p in probs.items():
            p_sample = p[domain.to(p.device)]
            hard = torch.bernoulli(p_sample.detach(), generator=self.generator)
            masks[name] = hard + (p_sample - p_sample.detach())  # straight-through
        ce = F.cross_entropy(self.forward_masked(all_x, masks), all_y)
        siou = self.overlap_penalty(probs)
        loss = ce + self.hparams["dmg_lambda"] * siou
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        values = {"loss": loss.item(), "ce": ce.item(), "siou": siou.item()}
        for name, p in self.soft_masks().items():
            values[f"mask_iou_{name}"], values[f"mask_active_{name}"] = mask_statistics(p)
        return values

    def overlap_penalty(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over layers of the mean over domain pairs of :func:`soft_iou` (0 for one domain)."""
        pairs = list(itertools.combinations(range(self.num_domains), 2))
        if not pairs:
            return torch.zeros(())
        i, j = torch.tensor(pairs).T
        return torch.stack([soft_iou(p[i], p[j]).mean() for p in probs.values()]).sum()

    def predict_domain(self, x: torch.Tensor, domain: int, hard: bool = False) -> torch.Tensor:
        """DMG-KD: logits (B, num_classes) with training domain ``domain``'s mask, soft
        ``m^d`` or (``hard``) ``m^d > 0.5``.

        Raises:
            DomainGradError: for a domain index outside [0, num_domains).
        """
        if not 0 <= domain < self.num_domains:
            raise DomainGradError(f"domain must be a training-domain index in [0, {self.num_domains}), got {domain}")
        masks = {}
        for name, p in self.soft_masks().items():
            m = (p[domain] > 0.5).to(p.dtype) if hard else p[domain]
            masks[name] = m.expand(x.shape[0], -1)
        return self.forward_masked(x, masks)

    def predict_each_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (D, B, num_classes) with each training domain's soft mask, in one pass:
        the batch is repeated D times at the first masked layer (everything before it is
        computed once; from there on activations take D times the memory, so lower
        ``--eval-batch-size`` if evaluation runs out of memory)."""
        probs = self.soft_masks()
        D, B = self.num_domains, x.shape[0]
        first = self.layers[0]
        masks = {name: p.repeat_interleave(B, dim=0) for name, p in probs.items()}

        def stage_fn(name: str, out: torch.Tensor) -> torch.Tensor:
            if name == first:
                out = out.repeat(D, *([1] * (out.ndim - 1)))
            return out * _broadcast(masks[name], out) if name in masks else out
        features = self.featurizer(x, stage_fn=stage_fn)
        if first == FEATURES:
            features = features.repeat(D, 1)
        if FEATURES in masks:
            features = features * masks[FEATURES]
        return self.classifier(features).view(D, B, -1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.hparams["dmg_predict"]
        if mode == "mask_ens":
            return self.forward_masked(x, {n: p.mean(0).expand(x.shape[0], -1) for n, p in self.soft_masks().items()})
        logits = self.predict_each_domain(x)
        if mode == "pred_ens_logits":
            return logits.mean(0)
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(self.num_domains)


class MultiHeaded(ERM):
    """The Multi-Headed baseline of seed 001 (Chattopadhyay et al., ECCV 2020, Section 4;
    METHODS.md section 5): a shared featurizer and one classifier head per training
    domain. Training: each domain's samples go through their own head; loss = mean
    cross-entropy over all samples (one concatenated batch). Prediction: the heads'
    softmax probabilities averaged (returned as their log, so argmax and softmax are
    those of the average); ``multihead_predict`` "logits" averages raw logits instead.

    Attributes (besides ERM's): ``heads`` (ModuleList of D classifiers); ``classifier``
    and ``network`` are ERM's unused single head, kept out of the optimizer.
    """

    PREDICT = ("probabilities", "logits")

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [HParam("multihead_predict", "probabilities", lambda r: "probabilities",
                       "how predict() averages the heads: 'probabilities' or 'logits'", choices=cls.PREDICT)]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        from .. import models
        self.heads = nn.ModuleList(models.classifier(self.featurizer.n_outputs, num_classes,
                                                     self.hparams["nonlinear_classifier"])
                                   for _ in range(num_domains))
        del self.classifier, self.network
        self.optimizer = self.make_optimizer(list(self.featurizer.parameters()) + list(self.heads.parameters()))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        features = self.featurizer(torch.cat([x for x, _ in minibatches]))
        chunks = torch.split(features, [len(y) for _, y in minibatches])
        logits = torch.cat([head(f) for head, f in zip(self.heads, chunks)])
        loss = F.cross_entropy(logits, torch.cat([y for _, y in minibatches]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        features = self.featurizer(x)
        logits = torch.stack([head(features) for head in self.heads])
        if self.hparams["multihead_predict"] == "logits":
            return logits.mean(0)
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(len(self.heads))
