"""DMG, domain-specific masks, and the Multi-Headed baseline of that paper.

Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity and Invariance for In
and Out of Domain Generalization", ECCV 2020 (official code: github.com/prithv1/DMG).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DomainGradError
from ..hparams import HParam
from ..models import Featurizer
from .base import Minibatches
from .erm import ERM

#: the name of the featurizer output (the classifier input) among DMG's layers
FEATURES = "features"


def soft_iou(m_i: torch.Tensor, m_j: torch.Tensor) -> torch.Tensor:
    """DMG's soft IoU, ``(m_i . m_j + 1e-6) / (sum(m_i + m_j - m_i * m_j) + 1e-6)``
    (Chattopadhyay et al., ECCV 2020, Eq. (1), with the 1e-6 smoothing terms of the
    official code, ``models/supermasks.py``).

    Args:
        m_i, m_j: (..., k) mask probabilities in [0, 1]; the sums run over the last axis.

    Returns:
        (...) soft IoU.
    """
    inter = (m_i * m_j).sum(-1)
    union = (m_i + m_j - m_i * m_j).sum(-1)
    return (inter + 1e-6) / (union + 1e-6)


def pairwise_mask_iou(probs: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of domain masks binarised at 0.5 (``m^d > 0.5``; Chattopadhyay
    et al., ECCV 2020, appendix Section 7.1, Fig. 4).

    Args:
        probs: (D, k) soft masks.

    Returns:
        (D, D) IoU, symmetric, diagonal 1; two empty masks count as IoU 1 (identical).
    """
    hard = probs.detach() > 0.5
    inter = (hard[:, None] & hard[None]).sum(-1).float()
    union = (hard[:, None] | hard[None]).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mask_statistics(probs: torch.Tensor) -> tuple[float, float]:
    """DMG's mask diagnostic (Chattopadhyay et al., ECCV 2020, appendix Section 7.1):
    binarise at 0.5 (``m^d > 0.5``), then the mean pairwise IoU over domain pairs and the
    mean fraction of active units.

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


def default_dmg_layers(featurizer: Featurizer) -> tuple[str, ...]:
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


def resolve_layers(featurizer: Featurizer, spec: str) -> tuple[str, ...]:
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
        raise DomainGradError(
            f"dmg_layers {spec!r}: unknown layer(s) {bad}; expected 'auto' or a comma-separated "
            f"list of: {', '.join(valid)}"
        )
    return tuple(n for n in valid if n in names)  # network order


class DMG(ERM):
    """DMG: Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity and
    Invariance for In and Out of Domain Generalization", ECCV 2020, Section 3.2.

    For each training domain d and masked layer, mask logits ``m~^d`` (one per channel of
    a conv map, broadcast over H x W; one per unit of a flat layer), initialised
    U(0, 1) (appendix Section 7.5); probabilities ``m^d = sigmoid(m~^d)``. Training: all
    domains' minibatches in one batch; every sample draws its own hard mask
    ~ Bernoulli(m^d) of its domain d from ``self.generator``; straight-through estimator
    (forward the hard mask, backward as if the probabilities had been used);
    ``activation * mask`` without rescaling. Loss = mean cross-entropy (the official
    code; Eq. (2) writes a sum over samples) + ``dmg_lambda`` * sum over masked layers of
    the soft-IoU overlap of Eq. (1) (:func:`soft_iou`, on the soft probabilities) over the
    D(D-1)/2 domain pairs, reduced by ``dmg_overlap_reduction``:

    * "sum" (default): the sum over pairs, as in the paper's Eq. (2).
    * "mean": the mean over pairs, i.e. the sum divided by D(D-1)/2, as in the official
      code (``SuperMask.overlap_penalty`` in ``models/supermasks.py``).

    One Adam (lr, weight_decay) over the network and the masks (appendix Section 7.5).

    ``dmg_layers`` "auto" masks the official placement (:func:`default_dmg_layers`):
    ResNet layer3, layer4 and fc inputs; AlexNet fc6, fc7, fc8 inputs; MNIST_CNN conv3,
    conv4 and classifier inputs. As in the official code, AlexNet's dropout (``drop6``,
    ``drop7``) is switched off; other featurizer options (``resnet_dropout``) stay as set.

    Prediction (``predict``, unseen domain; the test rule), chosen by ``dmg_predict``:

    * "pred_ens" (the paper's Pred-Ens, Section 3.2 "Prediction at Test-time",
      default): scale the activations by each domain's soft mask ``m^d``, average the D
      predictions. The paper does not say whether probabilities or logits; here the
      softmax *probabilities* are averaged and the returned logits are the log of that
      average (same argmax, softmax gives the average back).
    * "pred_ens_logits": the same, but averaging raw logits (the official code).
    * "mask_ens" (Mask-Ens, appendix Section 7.3, Table 5): average the soft masks, one
      prediction.

    DMG-KD (known source domain d, Table 3): :meth:`predict_domain` with that domain's
    soft mask, or its hard mask ``m^d > 0.5`` (``hard=True``).

    Source-domain evaluation (:meth:`predict_source`, the in/out accuracies of the
    training environments, i.e. training-domain model selection), chosen by
    ``dmg_source_predict``:

    * "test_rule" (default): the ``dmg_predict`` rule, as for an unseen domain. The
      paper selects "based on overall in-domain validation accuracy" (appendix
      Section 7.5) without naming a different rule, so its test rule is the default.
    * "own_hard": a sample of training domain d is classified with the hard mask
      ``m^d > 0.5`` of its own domain d, as the official validation does
      (``SuperMask.forward`` mode "greedy" with the sample's domain, in
      ``SubNetwork_SuperMask_Trainer.evaluate("val")``).

    The test environments always use ``predict`` (the test rule).

    ``update`` returns ``loss``, ``ce``, ``siou`` (the unweighted penalty, reduced by
    ``dmg_overlap_reduction``) and per masked layer ``mask_iou_<layer>`` (mean pairwise
    IoU of the masks binarised at 0.5) and ``mask_active_<layer>`` (fraction of units
    with ``m^d > 0.5``), so every results record carries the mask statistics.

    Attributes (besides ERM's): ``mask_logits`` (ParameterDict layer -> (D, k)),
    ``layers`` (masked layer names in network order), ``generator``.

    Raises (construction):
        DomainGradError: for a ``dmg_predict``, ``dmg_overlap_reduction`` or
            ``dmg_source_predict`` outside its choices, or a bad ``dmg_layers``.
    """

    PREDICT = ("pred_ens", "pred_ens_logits", "mask_ens")
    #: ``dmg_overlap_reduction``: the paper's sum over domain pairs, the official mean
    OVERLAP_REDUCTION = ("sum", "mean")
    #: ``dmg_source_predict``: the test rule, or each source domain's own hard mask
    SOURCE_PREDICT = ("test_rule", "own_hard")

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "dmg_lambda",
                0.1,
                lambda r: float(10 ** r.uniform(-5, 0)),
                "lambda_O, weight of the soft-IoU overlap penalty (Chattopadhyay et al., ECCV 2020: 0.1, "
                "swept 0 and 1e-5..1)",
            ),
            HParam(
                "dmg_overlap_reduction",
                "sum",
                lambda r: "sum",
                "overlap penalty over domain pairs: 'sum' (the paper's Eq. (2)) or 'mean' (official code)",
                choices=cls.OVERLAP_REDUCTION,
            ),
            HParam(
                "dmg_layers",
                "auto",
                lambda r: "auto",
                "masked layers: 'auto' (official placement) or comma-separated stage names / 'features'",
            ),
            HParam(
                "dmg_predict",
                "pred_ens",
                lambda r: "pred_ens",
                "predict(): 'pred_ens' (average probabilities), 'pred_ens_logits' (official code), 'mask_ens'",
                choices=cls.PREDICT,
            ),
            HParam(
                "dmg_source_predict",
                "test_rule",
                lambda r: "test_rule",
                "training-environment accuracies: 'test_rule' (dmg_predict) or 'own_hard' (each domain's "
                "own mask m^d > 0.5, the official validation)",
                choices=cls.SOURCE_PREDICT,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        for name, choices in (
            ("dmg_predict", self.PREDICT),
            ("dmg_overlap_reduction", self.OVERLAP_REDUCTION),
            ("dmg_source_predict", self.SOURCE_PREDICT),
        ):
            if self.hparams[name] not in choices:
                raise DomainGradError(
                    f"hyperparameter {name!r} must be one of {list(choices)}, got {self.hparams[name]!r}"
                )
        for name in ("drop6", "drop7"):  # AlexNet's dropout, off for DMG (official code)
            if isinstance(getattr(self.featurizer, name, None), nn.Dropout):
                getattr(self.featurizer, name).p = 0.0
        self.layers = resolve_layers(self.featurizer, self.hparams["dmg_layers"])
        sizes = {**dict(self.featurizer.stage_channels), FEATURES: self.featurizer.n_outputs}
        self.mask_logits = nn.ParameterDict(
            {name: nn.Parameter(torch.rand(num_domains, sizes[name])) for name in self.layers}
        )
        self.optimizer = self.make_optimizer(list(self.network.parameters()) + list(self.mask_logits.parameters()))
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

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
        """The overlap term of Eq. (2) without ``lambda_O``: the sum over layers of the
        :func:`soft_iou` of every domain pair, summed over the D(D-1)/2 pairs
        (``dmg_overlap_reduction`` "sum", the paper) or averaged over them ("mean", the
        official code).

        Args:
            probs: layer -> (D, k) soft masks, as from :meth:`soft_masks`.

        Returns:
            () scalar; 0 with one training domain (no pairs).
        """
        pairs = list(itertools.combinations(range(self.num_domains), 2))
        if not pairs:
            return torch.zeros(())
        i, j = torch.tensor(pairs).T
        reduce = torch.sum if self.hparams["dmg_overlap_reduction"] == "sum" else torch.mean
        return torch.stack([reduce(soft_iou(p[i], p[j])) for p in probs.values()]).sum()

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
        return self.predict_ensemble(x, self.hparams["dmg_predict"])

    def predict_ensemble(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Logits (B, num_classes) of one of the test rules of the class docstring,
        whatever ``dmg_predict`` is (so Pred-Ens and Mask-Ens can be compared on one
        model, Chattopadhyay et al., ECCV 2020, appendix Table 5): ``mode`` "pred_ens",
        "pred_ens_logits" or "mask_ens".

        Raises:
            DomainGradError: for another ``mode``.
        """
        if mode not in self.PREDICT:
            raise DomainGradError(f"DMG ensemble mode must be one of {list(self.PREDICT)}, got {mode!r}")
        if mode == "mask_ens":
            return self.forward_masked(x, {n: p.mean(0).expand(x.shape[0], -1) for n, p in self.soft_masks().items()})
        return self.combine_domain_logits(self.predict_each_domain(x), mode)

    @staticmethod
    def combine_domain_logits(logits: torch.Tensor, mode: str) -> torch.Tensor:
        """Pred-Ens of the per-domain logits (D, B, num_classes) of
        :meth:`predict_each_domain`: "pred_ens_logits" their mean; otherwise the log of
        the mean softmax probabilities. Returns (B, num_classes)."""
        if mode == "pred_ens_logits":
            return logits.mean(0)
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])

    def predict_source(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        """Logits (B, num_classes) for inputs x (B, *input_shape) of training domain
        ``domain`` (its index among the training domains, the order of ``update``'s
        minibatches): with ``dmg_source_predict`` "own_hard", the network with that
        domain's hard mask ``m^d > 0.5`` at every masked layer (the official validation);
        with "test_rule", :meth:`predict`.

        Raises:
            DomainGradError: for a domain index outside [0, num_domains).
        """
        if not 0 <= domain < self.num_domains:
            raise DomainGradError(f"domain must be a training-domain index in [0, {self.num_domains}), got {domain}")
        if self.hparams["dmg_source_predict"] == "own_hard":
            return self.predict_domain(x, domain, hard=True)
        return self.predict(x)


class MultiHeaded(ERM):
    """The Multi-Headed baseline of Chattopadhyay, Balaji, Hoffman, "Learning to Balance
    Specificity and Invariance for In and Out of Domain Generalization", ECCV 2020
    (Section 4, "Baselines and Points of Comparison"): a shared featurizer and one
    classifier head per training domain. Training: each domain's samples go through
    their own head; loss = mean cross-entropy over all samples (one concatenated batch).
    Prediction: the heads' softmax probabilities averaged (returned as their log, so
    argmax and softmax are those of the average); ``multihead_predict`` "logits" averages
    raw logits instead.

    Attributes (besides ERM's): ``heads`` (ModuleList of D classifiers); ``classifier``
    and ``network`` are ERM's unused single head, kept out of the optimizer.
    """

    PREDICT = ("probabilities", "logits")

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "multihead_predict",
                "probabilities",
                lambda r: "probabilities",
                "how predict() averages the heads: 'probabilities' or 'logits'",
                choices=cls.PREDICT,
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        from .. import models

        self.heads = nn.ModuleList(
            models.classifier(self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"])
            for _ in range(num_domains)
        )
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
