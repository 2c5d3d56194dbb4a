"""The algorithm contract shared by every method (DomainBed's ``Algorithm``; Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).

An algorithm is built from ``(input_shape, num_classes, num_domains, hparams)`` and has
two methods: ``update(minibatches)`` takes one ``(x, y)`` batch per training domain and
performs one training step, returning floats to log; ``predict(x)`` returns logits.
A user's algorithm subclasses :class:`Algorithm` (or :class:`~domaingrad.algorithms.ERM`)
and is registered with :func:`~domaingrad.algorithms.register_algorithm` or named as
``package.module:Class`` (see :mod:`domaingrad.plugins`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..hparams import HParam

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def concat_minibatches(minibatches: Minibatches) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-domain batches as one: (x of shape (sum_d B_d, *input_shape), y of shape
    (sum_d B_d,)), domains in order."""
    return torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])


class Algorithm(nn.Module):
    """Base class of all training algorithms.

    Args:
        input_shape: shape of one input, e.g. (2, 28, 28).
        num_classes: number of classes.
        num_domains: number of *training* domains (one minibatch each in ``update``).
        hparams: the run's hyperparameters (see :mod:`domaingrad.hparams`).

    Subclasses cite their paper in the class docstring, declare their own
    hyperparameters in :meth:`hparam_specs`, and implement :meth:`update` and
    :meth:`predict`. Optimizers and ``torch.Generator`` objects stored as attributes are
    saved and restored by :meth:`training_state` automatically, for exact resume.

    ``uses_unlabeled`` says whether :meth:`update` uses its ``unlabeled`` argument
    (DomainBed's unsupervised-domain-adaptation slot: one batch of unlabelled inputs
    per test environment). Only such algorithms run under ``--task
    domain_adaptation``; for the others the run is refused before training, since they
    would silently train as domain generalization.
    """

    #: whether ``update`` uses ``unlabeled`` (``--task domain_adaptation`` needs it)
    uses_unlabeled: bool = False

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = dict(hparams)
        #: the run's number of steps, set by the training run before the first update;
        #: rules with a schedule over training read it (None when unknown)
        self.total_steps: int | None = None
        #: the fp16 loss scaler (``--amp fp16``), set by the training run; None otherwise
        self.grad_scaler: torch.amp.GradScaler | None = None

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        """This algorithm's own hyperparameters (beyond the common ones)."""
        return []

    def update(self, minibatches: Minibatches, unlabeled: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
        """One training step.

        Args:
            minibatches: ``num_domains`` pairs (x, y), x of shape (B_d, *input_shape) and
                y int64 of shape (B_d,).
            unlabeled: under ``--task domain_adaptation``, one tensor of unlabelled
                inputs of shape (B, *input_shape) per test environment with a uda split
                (DomainBed's UDA slot); None otherwise. Used only by algorithms with
                ``uses_unlabeled`` true.

        Returns:
            Values to log, e.g. ``{"loss": 0.41}`` (plain Python floats).
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes) for inputs of shape (B, *input_shape)."""
        raise NotImplementedError

    def predict_source(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        """Logits (B, num_classes) for inputs (B, *input_shape) known to come from training
        domain ``domain`` (its index among the training domains, the order of
        ``update``'s minibatches), for the accuracies of training environments. By
        default :meth:`predict`; a method with a source-domain rule (DMG's own-domain
        mask) overrides it."""
        return self.predict(x)

    # -- mixed precision ----------------------------------------------------------------
    #: True on a class whose ``update`` makes every backward pass and optimizer step
    #: through :meth:`backward_step` (so ``--amp fp16`` can scale its loss). Read from the
    #: class that defines ``update`` (:meth:`fp16_ready`): a subclass overriding
    #: ``update`` must declare it again.
    supports_fp16: bool = False

    @classmethod
    def fp16_ready(cls) -> bool:
        """Whether ``--amp fp16`` may train this class: ``supports_fp16`` as declared by
        the class in the MRO that defines ``update``."""
        for klass in cls.__mro__:
            if "update" in vars(klass):
                return bool(vars(klass).get("supports_fp16", False))
        return False

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` then ``optimizer.step()``; under ``--amp fp16`` the loss is
        scaled first and the step unscales the gradients, skipping a step whose
        gradients overflowed (:class:`torch.amp.GradScaler`). The caller zeroes the
        gradients beforehand, as without mixed precision.

        Args:
            loss: a scalar tensor. optimizer: the optimizer to step.
        """
        if self.grad_scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()

    # -- exact resume -------------------------------------------------------------------
    def _stateful_attributes(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in vars(self).items()
            if isinstance(value, (torch.optim.Optimizer, torch.Generator, torch.amp.GradScaler))
        }

    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: module state (parameters and
        buffers), every optimizer's state and every generator's state."""
        extra = {}
        for name, value in self._stateful_attributes().items():
            extra[name] = value.get_state() if isinstance(value, torch.Generator) else value.state_dict()
        return {"module": self.state_dict(), "attributes": extra}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned; optimizers and generators are
        matched by attribute name (so one re-created at an anneal step is found)."""
        self.load_state_dict(state["module"])
        current = self._stateful_attributes()
        for name, saved in state["attributes"].items():
            target = current.get(name)
            if isinstance(target, torch.optim.Optimizer):
                # Optimizer.load_state_dict keeps the tensors it is given: copy them, or
                # two optimizers restored from one in-memory state would share moments.
                target.load_state_dict(copy.deepcopy(saved))
            elif isinstance(target, torch.Generator):
                target.set_state(saved)
            elif isinstance(target, torch.amp.GradScaler):
                target.load_state_dict(saved)
