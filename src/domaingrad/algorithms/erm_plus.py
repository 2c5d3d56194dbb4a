"""ERM++ (Teterwak, Saito, Tsiligkaridis, Saenko, Plummer, "ERM++: An Improved Baseline for
Domain Generalization", arXiv:2304.01973, 2023), as DomainBed implements it
(``domainbed/algorithms.py`` ``ERMPlusPlus``, ``domainbed/lib/misc.py``
``ErmPlusPlusMovingAvg`` and ``LARS``, ``domainbed/scripts/train_autolr.py``; Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..hparams import POSITIVE, Bounds, HParam
from .base import Algorithm, Minibatches


class LARS(torch.optim.Optimizer):
    """LARS as DomainBed's ``misc.LARS`` (You, Gitman, Ginsburg, "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888, 2017): for a parameter p of more than one
    dimension, d = grad + weight_decay * p scaled by the trust ratio
    ``trust_coefficient * ||p|| / ||d||`` (1 where either norm is 0); 1-D parameters
    (biases, norm scales) take the raw gradient, without weight decay; then heavy-ball
    momentum ``mu = momentum * mu + d``, ``p -= lr * mu``.

    (DomainBed passes ``foreach=False`` to its LARS, whose constructor does not take it,
    so ``lars: True`` fails there; here it runs.)
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where(
                        p_norm > 0.0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm, one), one
                    )
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


class ERMPlusPlus(Algorithm):
    """ERM++ (Teterwak, Saito, Tsiligkaridis, Saenko, Plummer, "ERM++: An Improved Baseline
    for Domain Generalization", arXiv:2304.01973, 2023), DomainBed's ``ERMPlusPlus``.

    ERM on the concatenated batch with:

    * linear probing first (the paper's warm start): while ``global_iter <=
      linear_steps`` (so for the first ``linear_steps + 1`` updates, as DomainBed counts)
      only the classifier is trained, by ``linear_optimizer`` (Adam, ``linear_lr``,
      ``weight_decay``); afterwards ``optimizer`` (Adam, ``lr``, ``weight_decay``; LARS
      with ``lars``) trains the whole network. During probing the featurizer runs
      without a graph (DomainBed computes its gradients and never uses them: the same
      parameters);
    * a moving average of the weights (the paper's MPA), ``network_sma``: after each
      step ``global_iter`` is incremented; before iteration ``sma_start_iter`` (600,
      DomainBed's constant) the average is a copy of the network, from it on
      ``sma_count`` counts and every state entry (parameters and BatchNorm statistics,
      not ``num_batches_tracked``) becomes (avg * sma_count + current) / (1 + sma_count).
      With ``freeze_bn`` false the average's BatchNorm statistics are then refreshed by a
      forward pass of the batch in training mode. ``predict`` uses the average (in eval
      mode);
    * the Auto-LR schedule of DomainBed's ``train_autolr.py`` (two runs): in the first,
      at every checkpoint after probing, :meth:`plateau_step` feeds the average's
      validation loss (:meth:`validation_loss` on the training domains' out-splits) to
      ``ReduceLROnPlateau(optimizer, 'min', patience=1)`` and records the learning rate;
      after the third change the last entry becomes 0, which ends the run. The second
      run, on all the data, sets the learning rate from that record at each checkpoint
      (:meth:`follow_schedule`) and stops at the 0. These are methods of the algorithm
      (DomainBed's ``set_lr``); ``domaingrad train`` runs one ordinary run (a fixed
      ``lr``), which is the first run's training without the early stop.

    Deviation (offline): DomainBed's ERM++ uses timm's ``resnet50.ram_in1k`` ImageNet
    weights (hparam ``resnet50_augmix``, downloaded at run time). domaingrad never
    downloads: the featurizer is domaingrad's own (:func:`domaingrad.models.featurizer_for`,
    DomainBed's choice for the input shape) and pretrained weights come from ``--weights``
    (``imagenet`` = torchvision's file, or a state-dict file; timm's ResNet-50 uses
    torchvision's parameter names, so ``torch.save(timm.create_model('resnet50.ram_in1k',
    pretrained=True).state_dict(), path)`` on a machine with internet gives the file).
    The weights are loaded into both the network and its average. domaingrad's default
    ``freeze_bn`` is true (DomainBed's is false for every algorithm, which ERM++'s
    "unfrozen BatchNorm" needs): pass ``freeze_bn: false`` for DomainBed's behaviour.

    Parameter names are DomainBed's (``featurizer``, ``classifier``, ``network``,
    ``network_sma``, ``optimizer``, ``linear_optimizer``, ``scheduler``); ``global_iter``
    and ``sma_count`` are () buffers (plain ints in DomainBed), so checkpoints carry
    them; ``training_state`` also saves the scheduler and the recorded schedule. No
    randomness beyond the network's (dropout).
    """

    global_iter: torch.Tensor
    sma_count: torch.Tensor
    #: DomainBed's ``ErmPlusPlusMovingAvg.sma_start_iter``
    sma_start_iter = 600

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "linear_lr",
                5e-5,
                lambda r: float(10 ** r.uniform(-5, -3.5)),
                "learning rate of the linear-probing phase (DomainBed: 5e-5, 10**U(-5,-3.5))",
                bounds=POSITIVE,
            ),
            HParam(
                "linear_steps",
                500,
                lambda r: 500,
                "updates of linear probing, only the classifier trained (DomainBed: 500, fixed)",
                bounds=Bounds(0),
            ),
            HParam("lars", False, lambda r: False, "LARS instead of Adam (DomainBed: False, fixed)"),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        self.classifier = models.classifier(
            self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"]
        )
        self.network = nn.Sequential(self.featurizer, self.classifier)
        make = LARS if self.hparams["lars"] else torch.optim.Adam
        wd = self.hparams["weight_decay"]
        self.optimizer = make(self.network.parameters(), lr=self.hparams["lr"], weight_decay=wd)
        self.linear_optimizer = make(self.classifier.parameters(), lr=self.hparams["linear_lr"], weight_decay=wd)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, "min", patience=1)
        #: the learning rates recorded by :meth:`plateau_step` (DomainBed's ``lr_schedule``)
        self.lr_schedule: list[list[float]] = []
        self.lr_schedule_changes = 0
        self.network_sma = copy.deepcopy(self.network)
        self.network_sma.requires_grad_(False)
        self.network_sma.eval()
        self.register_buffer("global_iter", torch.tensor(0, dtype=torch.long))
        self.register_buffer("sma_count", torch.tensor(0, dtype=torch.long))

    @property
    def probing(self) -> bool:
        """True while the next update is a linear-probing one (``global_iter <= linear_steps``)."""
        return int(self.global_iter) <= self.hparams["linear_steps"]

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        if self.probing:
            with torch.no_grad():
                feats = self.featurizer(all_x)
            optimizer = self.linear_optimizer
        else:
            feats = self.featurizer(all_x)
            optimizer = self.optimizer
        loss = F.cross_entropy(self.classifier(feats), all_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.update_sma()
        if not self.hparams["freeze_bn"]:
            self.network_sma.train()
            with torch.no_grad():
                self.network_sma(all_x)
        return {"loss": loss.item()}

    @torch.no_grad()
    def update_sma(self) -> None:
        """DomainBed's ``update_sma``: count the iteration, then copy the network into the
        average (before ``sma_start_iter``) or average it in with weight
        1 / (1 + sma_count)."""
        self.global_iter += 1
        averaging = int(self.global_iter) >= self.sma_start_iter
        if averaging:
            self.sma_count += 1
        count = float(self.sma_count)
        current = self.network.state_dict()
        for name, avg in self.network_sma.state_dict().items():
            if "num_batches_tracked" in name:
                continue
            new = current[name].detach()
            avg.copy_((avg * count + new) / (1.0 + count) if averaging else new)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.network_sma.eval()
        return self.network_sma(x)

    @torch.no_grad()
    def validation_loss(self, loaders: Iterable[Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> float:
        """DomainBed's Auto-LR validation loss: the average network (eval mode) on each
        loader, the mean over its batches of the batch-mean cross-entropy, then the mean
        over loaders. Batches are moved to the network's device."""
        self.network_sma.eval()
        device = next(self.network_sma.parameters()).device
        per_loader = []
        for loader in loaders:
            losses = [F.cross_entropy(self.network_sma(x.to(device)), y.to(device)) for x, y in loader]
            per_loader.append(torch.stack(losses).sum() / len(losses))
        return float(torch.stack(per_loader).mean())

    def plateau_step(self, val_loss: float) -> list[list[float]] | None:
        """First Auto-LR run, at a checkpoint (DomainBed's ``set_lr(eval_loaders_iid)``):
        after probing, one ``ReduceLROnPlateau`` step on ``val_loss``; records the
        learning rate; after the third change the last record is ``[0.0]`` (the run
        stops). Returns the record, None while probing."""
        if self.probing:
            return None
        self.scheduler.step(val_loss)
        self.lr_schedule.append([float(v) for v in self.scheduler.get_last_lr()])
        if len(self.lr_schedule) > 1 and self.lr_schedule[-1] != self.lr_schedule[-2]:
            self.lr_schedule_changes += 1
        if self.lr_schedule_changes == 3:
            self.lr_schedule[-1] = [0.0]
        return self.lr_schedule

    def follow_schedule(self, schedule: list[list[float]] | None) -> list[list[float]] | None:
        """Second Auto-LR run, at a checkpoint (DomainBed's ``set_lr(schedule=...)``): after
        probing, set ``optimizer``'s learning rate to the first entry and return the rest;
        while probing, return ``schedule`` unchanged."""
        if self.probing or schedule is None:
            return schedule
        self.optimizer.param_groups[0]["lr"] = float(schedule[0][0])
        return schedule[1:]

    def training_state(self) -> dict[str, Any]:
        state = super().training_state()
        state["attributes"]["scheduler"] = self.scheduler.state_dict()
        state["attributes"]["lr_schedule"] = {
            "record": copy.deepcopy(self.lr_schedule),
            "changes": self.lr_schedule_changes,
        }
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        attributes = dict(state["attributes"])
        scheduler = attributes.pop("scheduler", None)
        record = attributes.pop("lr_schedule", None)
        super().load_training_state({**state, "attributes": attributes})
        if scheduler is not None:
            self.scheduler.load_state_dict(scheduler)
        if record is not None:
            self.lr_schedule = copy.deepcopy(record["record"])
            self.lr_schedule_changes = int(record["changes"])
