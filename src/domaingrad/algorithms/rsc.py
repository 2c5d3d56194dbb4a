"""Representation Self-Challenging (Huang, Wang, Xing, Huang, "Self-Challenging Improves
Cross-Domain Generalization", ECCV 2020): DomainBed's variant and the RSC authors' code."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd, nn

from ..errors import DomainGradError
from ..hparams import HParam
from .base import Minibatches, concat_minibatches
from .erm import ERM

#: ``rsc_variant`` values: DomainBed's feature-level RSC, or the RSC authors' code
RSC_VARIANTS = ("domainbed", "official")

#: the official RSC code's offset on the drop in true-class probability (``- 0.0001``)
RSC_CHANGE_OFFSET = 1e-4

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _check_unit(hparams: dict[str, Any], name: str) -> None:
    if not 0.0 <= hparams[name] <= 1.0:
        raise DomainGradError(f"hyperparameter {name!r} must be in [0, 1], got {hparams[name]}")


def _keep_at_or_below_rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (dtype of ``scores``): 0 where a score is strictly above the ``k``-th
    (0-based) largest value of its row, 1 elsewhere, so the top ``k`` of a row without
    ties are muted. A row of at most ``k`` entries is muted entirely (the official RSC
    code indexes past the end there). ``scores``: (N, L)."""
    if k >= scores.shape[1]:
        return torch.zeros_like(scores)
    threshold = torch.sort(scores, dim=1, descending=True).values[:, k : k + 1]
    return scores.le(threshold).to(scores.dtype)


def rsc_official_feature_mask(
    features: torch.Tensor,
    grads: torch.Tensor,
    spatial: bool,
    spatial_drop_factor: float = 1 / 3,
    channel_drop_factor: float = 1 / 3.2,
) -> torch.Tensor:
    """The per-sample mask of the official RSC code (DeLightCMU/RSC,
    ``Domain_Generalization/models/resnet.py``, ``ResNet.forward``), for every sample.

    With ``w = mean_{h,w} grads`` (N, C), the spatial mean of each channel's gradient:

    * spatial (``spatial=True``): score ``s = sum_c features_c * w_c`` (N, H*W), a
      Grad-CAM map without ReLU; the ``ceil(H*W * spatial_drop_factor)`` positions of
      highest score are muted in every channel; mask (N, 1, H, W);
    * channel: score ``w``; the ``ceil(C * channel_drop_factor)`` channels of highest
      score are muted at every position; mask (N, C, 1, 1).

    "Highest" is the official rule: muted where the score is strictly above the value of
    that rank in the descending sort (with ties at it, fewer are muted). Where the count
    reaches the row length (e.g. a 1x1 map: ``ceil(1/3) = 1``) every entry is muted; the
    official code, written for 7x7 maps, raises an IndexError there.

    Args:
        features: (N, C, H, W) stage output.
        grads: (N, C, H, W), d sum_i logit_{i, y_i} / d features.
        spatial: spatial mask if True, channel mask if False.
        spatial_drop_factor, channel_drop_factor: fractions in [0, 1] (official 1/3 and
            1/3.2).

    Returns:
        0/1 mask, 0 = muted, dtype of ``features``, broadcastable to (N, C, H, W).

    Raises:
        DomainGradError: for shapes that are not (N, C, H, W) or differ.
    """
    if features.ndim != 4 or grads.shape != features.shape:
        raise DomainGradError(
            f"RSC needs (N, C, H, W) features and gradients of the same shape, got "
            f"{tuple(features.shape)} and {tuple(grads.shape)}"
        )
    n, c, h, w = features.shape
    channel_mean = grads.mean(dim=(2, 3))
    if spatial:
        scores = (features * channel_mean[:, :, None, None]).sum(dim=1).reshape(n, h * w)
        return _keep_at_or_below_rank(scores, math.ceil(h * w * spatial_drop_factor)).view(n, 1, h, w)
    return _keep_at_or_below_rank(channel_mean, math.ceil(c * channel_drop_factor)).view(n, c, 1, 1)


def rsc_official_muted_samples(change: torch.Tensor, batch_percent: float) -> torch.Tensor:
    """Which samples keep their RSC mask, the official rule (same source as
    :func:`rsc_official_feature_mask`).

    ``d = max(change - 1e-4, 0)`` (the drop in true-class probability caused by the
    mask, offset and clipped as in the official code); ``k = round(N * batch_percent)``
    (Python's rounding, half to even); a sample is muted where ``d`` is strictly above
    the ``k``-th (0-based) largest ``d``, so about ``k`` samples are muted and never one
    whose probability did not drop by more than 1e-4. For ``k >= N`` (where the official
    code indexes past the end) the threshold is 0: every sample with ``d > 0``.

    Args:
        change: (N,) true-class probability before minus after masking.
        batch_percent: fraction of the batch to mute, >= 0.

    Returns:
        (N,) bool, True = muted (keeps its mask).
    """
    d = torch.clamp(change - RSC_CHANGE_OFFSET, min=0)
    k = min(int(round(float(change.shape[0]) * batch_percent)), change.shape[0])
    padded = torch.cat([d, d.new_zeros(1)])
    return d.gt(torch.sort(padded, descending=True).values[k])


def loss_gap(unmasked_logits: torch.Tensor, masked_loss: torch.Tensor, y: torch.Tensor) -> float:
    """The loss difference ``Gamma(theta(t)) = |h(theta, z) - h(theta, z~)|`` of one step
    (Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain Generalization Guided
    by Gradient Signal to Noise Ratio of Parameters", ICCV 2023, supplementary material,
    Section 2 and Fig. 1), with h the *mean* cross-entropy of the batch (the supplement
    writes the sum, N times this): ``|CE(unmasked_logits, y) - masked_loss|``.

    Args:
        unmasked_logits: (N, num_classes) logits of the unmasked features z, as the step
            already computed them (no extra forward pass).
        masked_loss: () mean cross-entropy of the masked features z~ (the training loss).
        y: (N,) int64 labels.

    Returns:
        The absolute difference, a Python float (a record value).
    """
    with torch.no_grad():
        return (F.cross_entropy(unmasked_logits.detach(), y) - masked_loss.detach()).abs().item()


class RSC(ERM):
    """Representation Self-Challenging (Huang, Wang, Xing, Huang, "Self-Challenging Improves
    Cross-Domain Generalization", ECCV 2020) in two variants, hparam ``rsc_variant``.

    ``"domainbed"`` (default; DomainBed's ``algorithms.RSC``, Gulrajani and Lopez-Paz, "In
    Search of Lost Domain Generalization", ICLR 2021, the version behind DomainBed's
    tables): one concatenated batch; features f (B, F) and logits;
    ``g = d sum(logits * onehot(y)) / d f``; per sample, features with ``g`` at or above
    the ``(1 - rsc_f_drop_factor)`` quantile of that sample's g are muted (Eq. 2-3); the
    drop in true-class probability caused by muting is computed per sample and only
    samples whose drop is at or above the ``(1 - rsc_b_drop_factor)`` quantile of the
    batch keep the mask (Section 3.3; the others keep all features); loss = CE of the
    classifier on ``f * mask`` (Eq. 5). Quantiles interpolate linearly, as
    ``np.percentile`` does in DomainBed.

    ``"official"``: the authors' code (DeLightCMU/RSC, ``Domain_Generalization/models/
    resnet.py``, ``ResNet.forward``), the RSC that Michalkiewicz et al. (ICCV 2023,
    supplementary material Section 4) ran as their baseline. On every training step:

    1. the output ``a`` (N, C, H, W) of stage ``rsc_stage`` ("auto": the featurizer's last
       stage with a 4-D output, ResNet ``layer4`` as in the official code, MNIST_CNN
       ``conv4``, AlexNet ``conv5``);
    2. with the network in eval mode (the official ``self.eval()``), the gradient of the
       summed true-class logits with respect to a detached copy of ``a``, through the
       layers after the stage;
    3. one draw from ``self.generator``: with probability ``rsc_spatial_prob`` (official
       1/2, ``random.randint(0, 9) <= 4``) a spatial mask muting the
       ``ceil(H*W * rsc_spatial_drop_factor)`` positions (official 1/3) of highest
       Grad-CAM score, else a channel mask muting the ``ceil(C *
       rsc_channel_drop_factor)`` channels (official 1/3.2) of highest mean gradient, one
       choice for the whole batch (:func:`rsc_official_feature_mask`);
    4. still in eval mode, the drop in true-class probability when ``a`` is masked; the
       ``round(N * percent)`` samples of largest drop keep the mask, the others none
       (:func:`rsc_official_muted_samples`);
    5. in training mode, the layers after the stage on ``a * mask`` (no rescaling of the
       kept activations, as in the official code), CE, backward, Adam step.

    The official ``percent`` follows the epoch: ``0.3 + 0.2 * (epoch // 10)``, i.e. 0.3
    for epochs 0-9 and 0.5 for epochs 10-19 of its 20 (``train.py``'s default; the value
    1/3 set in ``__init__`` is overwritten before first use). Here, over a run of T
    steps, ``rsc_batch_percent + rsc_batch_percent_step * floor(step / (rsc_batch_percent_every
    * T))`` with defaults 0.3, 0.2 and 0.5 (10 of 20 epochs); when T is unknown (``update``
    called outside a training run), ``rsc_batch_percent`` throughout. Not carried over
    from the official training script: its horizontally flipped copy of every batch, SGD
    and step schedule (DomainBed's data pipeline and Adam are used), and its 7x7 map size
    (any H, W here).

    Cost of the official variant: one full forward pass plus three passes of the layers
    after the stage (run on an empty batch up to the stage, so they cost little; with
    BatchNorm in training mode, ``freeze_bn`` False, on the whole batch instead, whose
    running statistics are then updated once more per step) and one gradient of those
    layers. ``update`` returns ``loss``, ``loss_gap`` (:func:`loss_gap`: the absolute
    difference of the mean cross-entropy on the unmasked and on the masked features,
    from the logits the step already computed; for the official variant the unmasked
    logits are those of step 2, in eval mode, which differ from training-mode ones only
    through dropout or BatchNorm in training mode after the stage) and, for the official
    variant, ``rsc_spatial`` (1.0 for a spatial mask) and ``rsc_muted_fraction``.

    Attributes (official variant only, so a DomainBed run's state and random streams are
    unchanged): ``generator`` (the spatial/channel draws) and ``update_count`` (a buffer).
    """

    update_count: torch.Tensor  # () long buffer of the official variant, registered in __init__

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "rsc_variant",
                "domainbed",
                lambda r: "domainbed",
                "domainbed: DomainBed's feature-level RSC (DomainBed's tables); official: the RSC authors' "
                "code (last-block maps, spatial or channel masks)",
                choices=RSC_VARIANTS,
            ),
            HParam(
                "rsc_f_drop_factor",
                1 / 3,
                lambda r: float(r.uniform(0, 0.5)),
                "domainbed variant: fraction of features muted per sample (DomainBed: 1/3, search U(0,0.5))",
            ),
            HParam(
                "rsc_b_drop_factor",
                1 / 3,
                lambda r: float(r.uniform(0, 0.5)),
                "domainbed variant: fraction of the batch that is muted (DomainBed: 1/3, search U(0,0.5))",
            ),
            HParam(
                "rsc_stage",
                "auto",
                lambda r: "auto",
                "official variant: featurizer stage whose maps are masked ('auto': the last 4-D stage)",
            ),
            HParam(
                "rsc_spatial_prob",
                0.5,
                lambda r: 0.5,
                "official variant: probability of a spatial (else channel) mask per step (official 1/2)",
            ),
            HParam(
                "rsc_spatial_drop_factor",
                1 / 3,
                lambda r: 1 / 3,
                "official variant: fraction of spatial positions muted, rounded up (official 1/3)",
            ),
            HParam(
                "rsc_channel_drop_factor",
                1 / 3.2,
                lambda r: 1 / 3.2,
                "official variant: fraction of channels muted, rounded up (official 1/3.2)",
            ),
            HParam(
                "rsc_batch_percent",
                0.3,
                lambda r: 0.3,
                "official variant: fraction of the batch muted at the start (official 0.3)",
            ),
            HParam(
                "rsc_batch_percent_step",
                0.2,
                lambda r: 0.2,
                "official variant: increase of the muted fraction per interval (official 0.2 every 10 epochs)",
            ),
            HParam(
                "rsc_batch_percent_every",
                0.5,
                lambda r: 0.5,
                "official variant: interval, as a fraction of the run's steps (official 10 of 20 epochs)",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        hp = self.hparams
        if hp["rsc_variant"] not in RSC_VARIANTS:
            raise DomainGradError(
                f"hyperparameter 'rsc_variant' must be one of {list(RSC_VARIANTS)}, got {hp['rsc_variant']!r}"
            )
        self.stage: str | None = None
        if hp["rsc_variant"] == "official":
            for name in ("rsc_spatial_prob", "rsc_spatial_drop_factor", "rsc_channel_drop_factor", "rsc_batch_percent"):
                _check_unit(hp, name)
            if hp["rsc_batch_percent_step"] < 0:
                raise DomainGradError(
                    f"hyperparameter 'rsc_batch_percent_step' must be >= 0, got {hp['rsc_batch_percent_step']}"
                )
            if not 0.0 < hp["rsc_batch_percent_every"] <= 1.0:
                raise DomainGradError(
                    f"hyperparameter 'rsc_batch_percent_every' must be in (0, 1], got {hp['rsc_batch_percent_every']}"
                )
            names = tuple(getattr(self.featurizer, "stage_names", ()))
            if not names:
                raise DomainGradError(
                    f"rsc_variant 'official' masks a stage's feature maps, but the featurizer "
                    f"{type(self.featurizer).__name__} has no named stages; use a backbone "
                    f"with stages (mnist_cnn, resnet18, resnet50, alexnet) or rsc_variant "
                    f"'domainbed'"
                )
            if hp["rsc_stage"] != "auto":
                if hp["rsc_stage"] not in names:
                    raise DomainGradError(
                        f"rsc_stage {hp['rsc_stage']!r} is not a stage of "
                        f"{type(self.featurizer).__name__}; expected 'auto' or one of: "
                        f"{', '.join(names)}"
                    )
                self.stage = hp["rsc_stage"]
            self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
            self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        if self.hparams["rsc_variant"] == "official":
            return self.update_official(minibatches)
        all_x, all_y = concat_minibatches(minibatches)
        all_o = F.one_hot(all_y, self.num_classes)
        all_f = self.featurizer(all_x)
        all_p = self.classifier(all_f)
        all_g = autograd.grad((all_p * all_o).sum(), all_f)[0]
        q_f = torch.quantile(all_g, 1 - self.hparams["rsc_f_drop_factor"], dim=1, keepdim=True)
        mask_f = all_g.lt(q_f).float()
        all_p_muted = self.classifier(all_f * mask_f)
        all_s, all_s_muted = F.softmax(all_p, dim=1), F.softmax(all_p_muted, dim=1)
        changes = ((all_s * all_o).sum(1) - (all_s_muted * all_o).sum(1)).detach()
        mask_b = changes.lt(torch.quantile(changes, 1 - self.hparams["rsc_b_drop_factor"])).float().view(-1, 1)
        mask = torch.logical_or(mask_f, mask_b).float()
        loss = F.cross_entropy(self.classifier(all_f * mask), all_y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "loss_gap": loss_gap(all_p, loss, all_y)}

    # -- the official variant ---------------------------------------------------------
    def batch_percent(self) -> float:
        """The official variant's fraction of the batch muted at this step (class docstring)."""
        hp = self.hparams
        if not self.total_steps:
            return hp["rsc_batch_percent"]
        interval = hp["rsc_batch_percent_every"] * self.total_steps
        return hp["rsc_batch_percent"] + hp["rsc_batch_percent_step"] * math.floor(int(self.update_count) / interval)

    def stage_output(self, x: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(stage name, its (N, C, H, W) output for ``x``, with graph), from a full forward.

        Raises:
            DomainGradError: the chosen stage's output is not 4-D, or no stage's is.
        """
        found: dict[str, Any] = {}

        def capture(name: str, out: torch.Tensor) -> torch.Tensor:
            if self.stage is None and out.ndim == 4:
                found["name"], found["out"] = name, out
            elif name == self.stage:
                if out.ndim != 4:
                    raise DomainGradError(
                        f"stage {name!r} has output shape {tuple(out.shape)}; RSC needs "
                        f"(N, C, H, W) maps, choose another rsc_stage"
                    )
                found["name"], found["out"] = name, out
            return out

        self.featurizer(x, stage_fn=capture)
        if not found:
            raise DomainGradError(
                f"no stage of {type(self.featurizer).__name__} has (N, C, H, W) outputs; "
                f"rsc_variant 'official' needs one, use rsc_variant 'domainbed'"
            )
        return found["name"], found["out"]

    def logits_after(self, x: torch.Tensor, stage: str, z: torch.Tensor) -> torch.Tensor:
        """Logits of the layers after ``stage`` (rest of the featurizer, then the
        classifier) applied to ``z`` (N, C, H, W) in place of the stage's output.

        The featurizer runs on ``x[:0]``, an empty batch, up to the stage, so those layers
        cost nothing; with a BatchNorm layer in training mode (whose statistics an empty
        batch would corrupt) on ``x`` itself, the result discarded.
        """
        bn_training = any(isinstance(m, _BATCH_NORMS) and m.training for m in self.featurizer.modules())
        return self.classifier(
            self.featurizer(x if bn_training else x[:0], stage_fn=lambda name, out: z if name == stage else out)
        )

    def official_mask(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[str, torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """Steps 1-4 of the class docstring: (stage, a with graph, mask broadcastable to
        ``a`` (ones for the samples not muted), spatial?, (N,) bool muted samples)."""
        return self.official_mask_and_logits(x, y)[:5]

    def official_mask_and_logits(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[str, torch.Tensor, torch.Tensor, bool, torch.Tensor, torch.Tensor]:
        """:meth:`official_mask` and, last, the (N, num_classes) logits of the unmasked
        stage output from step 2 (eval mode, detached)."""
        stage, a = self.stage_output(x)
        onehot = F.one_hot(y, self.num_classes).to(a.dtype)
        was_training = self.network.training
        self.network.train(False)
        try:
            z = a.detach().requires_grad_()
            logits = self.logits_after(x, stage, z)
            grads = autograd.grad((logits * onehot).sum(), z)[0]
            with torch.no_grad():
                spatial = bool(torch.rand((), generator=self.generator) < self.hparams["rsc_spatial_prob"])
                mask = rsc_official_feature_mask(
                    z.detach(),
                    grads,
                    spatial,
                    self.hparams["rsc_spatial_drop_factor"],
                    self.hparams["rsc_channel_drop_factor"],
                )
                before = (F.softmax(logits.detach(), dim=1) * onehot).sum(1)
                after = (F.softmax(self.logits_after(x, stage, z.detach() * mask), dim=1) * onehot).sum(1)
                muted = rsc_official_muted_samples(before - after, self.batch_percent())
                mask = torch.where(muted.view(-1, 1, 1, 1), mask, torch.ones_like(mask))
        finally:
            self.network.train(was_training)
        return stage, a, mask, spatial, muted, logits.detach()

    def update_official(self, minibatches: Minibatches) -> dict[str, float]:
        """One step of the official variant (class docstring)."""
        x, y = concat_minibatches(minibatches)
        stage, a, mask, spatial, muted, unmasked = self.official_mask_and_logits(x, y)
        loss = F.cross_entropy(self.logits_after(x, stage, a * mask), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1
        return {
            "loss": loss.item(),
            "loss_gap": loss_gap(unmasked, loss, y),
            "rsc_spatial": float(spatial),
            "rsc_muted_fraction": muted.float().mean().item(),
        }
