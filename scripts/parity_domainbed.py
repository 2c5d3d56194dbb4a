#!/usr/bin/env python3
"""Parity of domaingrad's algorithms with DomainBed's: five updates from the same weights on
the same minibatches give the same parameters (float64).

DomainBed is Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021
(facebookresearch/DomainBed). This script imports ``domainbed`` from the user's own checkout;
nothing of DomainBed is shipped with domaingrad.

Usage::

    python scripts/parity_domainbed.py --domainbed /path/to/DomainBed [--algorithms ERM IRM ...]
        [--steps 5] [--batch-size 8] [--domains 3] [--tol 1e-10] [--markdown FILE]

For each algorithm both implementations are built in float64 for Colored MNIST's shape
((2, 28, 28), 2 classes, DomainBed's ``MNIST_CNN``) and ``--domains`` training domains, with
DomainBed's ColoredMNIST default hyperparameters on both sides (plus the adapter's
overrides); DomainBed's initial parameters are copied into domaingrad's (names mapped by the
adapter); both are fed the same ``--steps`` lists of ``--batch-size`` random inputs per
domain; the global torch and numpy generators are seeded identically before each update on
both sides, and the draws that domaingrad takes from its own generators are either
recorded and replayed into DomainBed's global-RNG calls (a permutation, a Mixup weight) or
drawn from ``algorithm.generator`` seeded like the global generator (URM's noise). The
hyperparameter ``batch_size`` is ``--batch-size`` on both sides. The result is the largest
absolute difference over every parameter after the last update: PASS when it is at most
``--tol``. An algorithm may have more than one row: ``NAME[variant]`` is a second
comparison with other hyperparameters (e.g. ``CAD[unflipped]``), selected by that key in
``--algorithms``. domaingrad's algorithms that DomainBed lacks are listed, not compared.

Exit status: 0 when every algorithm passes, 1 when one fails, 2 for bad arguments (e.g. a
``--domainbed`` path that is not a DomainBed checkout). An algorithm whose DomainBed class
needs a package that is not installed (Fishr needs ``backpack-for-pytorch``) is reported as
SKIP and does not fail the run.

Extending it: add an :class:`Adapter` to :data:`ADAPTERS` for each new algorithm, with the
DomainBed class name, the parameter-name mapping (ours -> theirs) when the layouts differ, any
hyperparameter overrides (on both sides, or on domaingrad's only to select the option that
gives DomainBed's behaviour), the kind of randomness to fix, and when needed a patch of
DomainBed's side or a ``setup`` of state that both sides must share.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

INPUT_SHAPE = (2, 28, 28)  # Colored MNIST
NUM_CLASSES = 2
DATASET = "ColoredMNIST"  # whose default hyperparameters both sides use


def identity(name: str) -> str | None:
    """Most algorithms keep DomainBed's attribute names (featurizer, classifier, ...)."""
    return name


def fish_names(name: str) -> str | None:
    """domaingrad's Fish keeps ERM's layout (featurizer, classifier, network = both) and a
    persistent clone ``network_inner``; DomainBed's holds a ``WholeFish`` (``network.net`` =
    Sequential(featurizer, classifier)) and rebuilds its clone every update."""
    if name.startswith("network_inner."):
        return None  # overwritten from the network at every update, on both sides
    for ours, theirs in (("featurizer.", "network.net.0."), ("classifier.", "network.net.1.")):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    if name.startswith("network."):
        return "network.net." + name[len("network.") :]
    return name


@dataclass(frozen=True)
class Adapter:
    """How to compare one algorithm.

    Attributes:
        name: domaingrad's registered name.
        domainbed: DomainBed's class name in ``domainbed/algorithms.py``.
        names: maps a domaingrad parameter name to DomainBed's (None: not compared, e.g.
            a scratch copy); every DomainBed parameter must be reached, except ``unused``.
        unused: DomainBed parameters that the algorithm never uses (left as built).
        hparams: overrides applied on both sides (e.g. a short anneal so that five updates
            cover both phases).
        ours: overrides on domaingrad's side only: the option giving DomainBed's behaviour
            where domaingrad's default follows the paper instead.
        rng: "seed" (both sides draw from the global generators, seeded alike before every
            update), "generator" (as "seed", and domaingrad's ``algorithm.generator``, which
            it draws from in DomainBed's order where DomainBed draws from the global torch
            generator, is seeded with the same seed before every update) or "replay"
            (domaingrad draws from its own generator; its ``torch.randperm`` results and
            ``draw_lambda`` weights are recorded and replayed into DomainBed's
            ``torch.randperm`` / ``np.random.beta`` calls).
        requires: modules DomainBed's class needs (SKIP when one is missing).
        note: what the comparison fixes, shown in the output.
    """

    name: str
    domainbed: str
    names: Callable[[str], str | None] = identity
    unused: tuple[str, ...] = ()
    hparams: dict[str, Any] = field(default_factory=dict)
    ours: dict[str, Any] = field(default_factory=dict)
    rng: str = "seed"  # or "generator" or "replay"
    requires: tuple[str, ...] = ()
    note: str = ""
    #: a context manager factory, given the ``domainbed.algorithms`` module, active while
    #: DomainBed's side is built and updated (e.g. a float32 cast read as float64); it
    #: yields a note saying what it did
    patch: Callable[[types.ModuleType], contextlib.AbstractContextManager[str]] | None = None
    #: also run without ``patch`` and report that difference in the notes
    report_unpatched: bool = False
    #: called with (ours, DomainBed's) after the weights are copied, before the updates:
    #: state outside the hyperparameters that both sides must share (e.g. a start
    #: iteration held as an attribute)
    setup: Callable[[torch.nn.Module, torch.nn.Module], None] | None = None
    #: a second comparison of the same algorithm (other hyperparameters covering another
    #: code path) is the row ``name[variant]``; empty for the main one
    variant: str = ""

    def __post_init__(self) -> None:
        if self.rng not in ("seed", "generator", "replay"):
            raise ValueError(f"Adapter {self.name}: rng must be 'seed', 'generator' or 'replay', got {self.rng!r}")

    @property
    def key(self) -> str:
        """The row's name: ``name``, or ``name[variant]``."""
        return f"{self.name}[{self.variant}]" if self.variant else self.name


class _Float32AsFloat64(types.ModuleType):
    """``torch`` as DomainBed's module sees it, except that ``torch.float32`` is float64."""

    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def float32_read_as_float64(db_algorithms: types.ModuleType) -> Iterator[str]:
    """DomainBed's ANDMask casts its mask to float32 (``mask.to(torch.float32)``), so in a
    float64 run its rescaling 1 / (1e-10 + kept fraction) is rounded to float32 (in a
    float32 run, the normal case, the cast changes nothing). Here that cast reads float64."""
    real = db_algorithms.torch
    db_algorithms.torch = _Float32AsFloat64("torch")
    try:
        yield "DomainBed's mask.to(torch.float32) read as float64"
    finally:
        db_algorithms.torch = real


def backpack_fills_grad_batch() -> bool:
    """Whether BackPACK's ``BatchGrad`` works as DomainBed's Fishr calls it: backward
    restricted to the classifier's parameters (``inputs=``), with ``create_graph``, when the
    classifier's input requires grad (with torch 2.14 and BackPACK 1.7.1 it does not: no
    ``grad_batch`` is set)."""
    if importlib.util.find_spec("backpack") is None:
        return False
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    linear, loss_fn = extend(torch.nn.Linear(3, 2)), extend(torch.nn.CrossEntropyLoss(reduction="none"))
    z = torch.randn(4, 3, requires_grad=True) * 2
    loss = loss_fn(linear(z), torch.tensor([0, 1, 0, 1])).sum()
    with backpack(BatchGrad()):
        loss.backward(inputs=list(linear.parameters()), retain_graph=True, create_graph=True)
    return hasattr(linear.weight, "grad_batch")


def _keep_input(module: torch.nn.Module) -> torch.nn.Module:
    """Stand-in for BackPACK's ``extend``: remember the module's last input."""

    def hook(mod, inputs, output):
        mod.parity_input = inputs[0]

    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.nn.modules.loss._Loss):
        module.register_forward_hook(hook)
    return module


def _per_sample_classifier_grads(self, logits: torch.Tensor, y: torch.Tensor):
    """Stand-in for DomainBed's ``Fishr._get_grads``: per-sample gradients of the summed
    cross-entropy with respect to the classifier's parameters, each flattened to (N, P),
    differentiable (what BackPACK's ``grad_batch`` holds), by ``torch.func``."""
    from collections import OrderedDict

    from torch.func import functional_call, grad, vmap

    self.optimizer.zero_grad()
    params = dict(self.classifier.named_parameters())

    def loss_one(p, z, t):
        out = functional_call(self.classifier, p, (z.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, t.unsqueeze(0), reduction="sum")

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, self.classifier.parity_input, y)
    return OrderedDict((name, g.reshape(g.shape[0], -1)) for name, g in per_sample.items())


@contextlib.contextmanager
def fishr_backpack(db_algorithms: types.ModuleType) -> Iterator[str]:
    """DomainBed's Fishr with BackPACK when BackPACK works here; otherwise only its
    per-sample gradients (``_get_grads``) are computed by ``torch.func`` instead, the rest
    of DomainBed's Fishr (variances, EMA, penalty, anneal, Adam reset) running as is."""
    if backpack_fills_grad_batch():
        yield "DomainBed's per-sample gradients by BackPACK"
        return
    cls = db_algorithms.Fishr
    missing = object()
    saved = {k: getattr(db_algorithms, k, missing) for k in ("backpack", "extend")}
    real = cls._get_grads
    db_algorithms.backpack = contextlib.nullcontext  # DomainBed asserts it is not None
    db_algorithms.extend = _keep_input
    cls._get_grads = _per_sample_classifier_grads
    try:
        yield "BackPACK unavailable or not filling grad_batch here: DomainBed's Fishr._get_grads by torch.func"
    finally:
        cls._get_grads = real
        for k, v in saved.items():
            if v is missing:
                delattr(db_algorithms, k)
            else:
                setattr(db_algorithms, k, v)


@contextlib.contextmanager
def cuda_is_a_no_op(db_algorithms: types.ModuleType) -> Iterator[str]:
    """DomainBed's RDM and TRM call ``.cuda()`` on tensors and modules they create (RDM's
    loss vector, TRM's heads and ``alpha``), which fails on a machine without CUDA and
    would move them off the CPU where the comparison runs: while DomainBed's side is built
    and updated, ``Module.cuda`` and ``Tensor.cuda`` return their object unchanged."""
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield "DomainBed's .cuda() calls made no-ops (CPU run)"
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def cuts_from_numpy(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """CausIRL: our cut indices come from ``ours.generator``, DomainBed's from numpy's global
    ``np.random.randint(0, n)``, which both sides then draw from (seeded alike), in the
    same order (one per domain)."""
    ours.draw_cut = lambda n: int(np.random.randint(0, n))


def sma_from_iteration_3(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """ERM++: the moving average starts at iteration 3 on both sides (default 600), so
    that five updates cover the copy phase and the averaging phase."""
    ours.sma_start_iter = theirs.sma_start_iter = 3


def urm_names(name: str) -> str | None:
    """domaingrad's URM holds its bounded activation as a module of its own,
    ``network = Sequential(featurizer, generator_output, classifier)``; DomainBed replaces
    the featurizer's activation (no parameters), so its ``network`` is
    ``Sequential(featurizer, classifier)``: ``network.2.`` -> ``network.1.``."""
    return "network.1." + name[len("network.2.") :] if name.startswith("network.2.") else name


def trm_names(name: str) -> str | None:
    """domaingrad's TRM registers its per-domain heads ``clist`` (a ModuleList); DomainBed
    keeps them in a plain list, not parameters of its module: they are copied by
    :func:`trm_heads_copied` instead of by name (and not compared)."""
    return None if name.startswith("clist.") else name


def trm_heads_copied(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """TRM: DomainBed's per-domain heads (``theirs.clist``, a plain list) copied into ours.

    Raises:
        ParityError: the two sides hold different numbers of heads.
    """
    if len(ours.clist) != len(theirs.clist):
        raise ParityError(f"TRM: {len(ours.clist)} per-domain heads here, {len(theirs.clist)} in DomainBed")
    with torch.no_grad():
        for mine, head in zip(ours.clist, theirs.clist):
            for p, q in zip(mine.parameters(), head.parameters(), strict=True):
                p.copy_(q)


#: every algorithm both libraries have; an adapter for each (extend it for new ones)
ADAPTERS: dict[str, Adapter] = {
    a.key: a
    for a in [
        Adapter("ERM", "ERM"),
        Adapter(
            "IRM",
            "IRM",
            hparams={"irm_penalty_anneal_iters": 2},
            note="anneal after 2 updates, so the Adam re-creation is covered",
        ),
        Adapter(
            "VREx",
            "VREx",
            hparams={"vrex_penalty_anneal_iters": 2},
            note="anneal after 2 updates; domaingrad logs mean nll (DomainBed: last domain's), not compared",
        ),
        Adapter("CORAL", "CORAL"),
        Adapter("MMD", "MMD"),
        Adapter(
            "DANN",
            "DANN",
            unused=("class_embeddings.weight",),
            note="DomainBed's class_embeddings (CDANN's) unused by DANN; discriminator and generator steps alternate",
        ),
        Adapter("GroupDRO", "GroupDRO", note="q: ones(D) from the start (DomainBed: filled at the first update)"),
        Adapter("Mixup", "Mixup", rng="replay", note="permutation and lambda of domaingrad's generator replayed"),
        Adapter(
            "MLDG",
            "MLDG",
            rng="replay",
            note="meta-train/test permutation replayed; 3 domains, so min(n_meta_test, D-1) = n_meta_test",
        ),
        Adapter("Fish", "Fish", names=fish_names, note="featurizer/classifier -> network.net.0/1 (WholeFish)"),
        Adapter("SD", "SD"),
        Adapter("ANDMask", "ANDMask", patch=float32_read_as_float64, report_unpatched=True),
        Adapter("SANDMask", "SANDMask", hparams={"tau": 0.5}, note="tau 0.5 (the default 1.0 masks every gradient)"),
        Adapter(
            "Fishr",
            "Fishr",
            hparams={"penalty_anneal_iters": 2},
            patch=fishr_backpack,
            note="anneal after 2 updates",
        ),
        Adapter("RSC", "RSC", ours={"rsc_variant": "domainbed"}, note="rsc_variant domainbed (its default)"),
        Adapter("CDANN", "CDANN", note="discriminator and generator steps alternate"),
        Adapter(
            "CDANN",
            "CDANN",
            variant="grad_penalty",
            hparams={"grad_penalty": 0.5, "d_steps_per_g_step": 2},
            note="grad_penalty 0.5, d_steps_per_g_step 2 on both sides",
        ),
        Adapter(
            "CausIRL_CORAL", "CausIRL_CORAL", setup=cuts_from_numpy, note="cuts by np.random.randint on both sides"
        ),
        Adapter("CausIRL_MMD", "CausIRL_MMD", setup=cuts_from_numpy, note="cuts by np.random.randint on both sides"),
        Adapter("IGA", "IGA"),
        Adapter("IB_ERM", "IB_ERM", hparams={"ib_penalty_anneal_iters": 2}, note="anneal after 2 updates"),
        Adapter(
            "IB_IRM",
            "IB_IRM",
            hparams={"ib_penalty_anneal_iters": 2, "irm_penalty_anneal_iters": 3},
            note="IB anneal after 2 updates, IRM after 3",
        ),
        Adapter(
            "EQRM",
            "EQRM",
            hparams={"eqrm_burnin_iters": 2, "eqrm_lr": 1e-3},
            note="burn-in 2 updates, eqrm_lr 1e-3 (so the quantile phase moves the parameters)",
        ),
        Adapter("SelfReg", "SelfReg", rng="replay", note="lambda and permutations of domaingrad's generator replayed"),
        Adapter("CAD", "CAD"),
        Adapter(
            "CAD",
            "CAD",
            variant="unflipped",
            hparams={"is_flipped": False, "is_normalized": True},
            note="is_flipped false, is_normalized true on both sides",
        ),
        Adapter("CondCAD", "CondCAD"),
        Adapter(
            "CondCAD",
            "CondCAD",
            variant="unflipped",
            hparams={"is_flipped": False, "is_normalized": True},
            note="is_flipped false, is_normalized true on both sides",
        ),
        Adapter(
            "RDM",
            "RDM",
            hparams={"rdm_penalty_anneal_iters": 2},
            patch=cuda_is_a_no_op,
            note="anneal after 2 updates",
        ),
        Adapter(
            "ADRMX",
            "ADRMX",
            rng="generator",
            ours={"adrmx_remix_pairs": "domainbed"},
            note="adrmx_remix_pairs domainbed (DomainBed's pairing); permutations: our generator seeded alike",
        ),
        Adapter(
            "URM",
            "URM",
            names=urm_names,
            rng="generator",
            note="noise and soft labels: our generator seeded as the global one",
        ),
        Adapter(
            "URM",
            "URM",
            variant="relu",
            names=urm_names,
            rng="generator",
            hparams={"urm_generator_output": "relu"},
            note="urm_generator_output relu on both sides",
        ),
        Adapter(
            "URM",
            "URM",
            variant="sgd",
            names=urm_names,
            rng="generator",
            hparams={"urm_discriminator_label_smoothing": 0.1, "urm_discriminator_optimizer": "sgd"},
            note="discriminator by SGD with label smoothing 0.1 on both sides",
        ),
        Adapter(
            "ERMPlusPlus",
            "ERMPlusPlus",
            hparams={"linear_steps": 1},
            ours={"freeze_bn": False},
            setup=sma_from_iteration_3,
            note="linear_steps 1, moving average from iteration 3 on both sides; freeze_bn false (DomainBed's)",
        ),
        Adapter(
            "MTL",
            "MTL",
            ours={"mtl_embedding": "domainbed"},
            note="mtl_embedding domainbed (DomainBed's N(0, 1) embedding, global generator seeded alike)",
        ),
        Adapter("SagNet", "SagNet", note="alpha and permutation from the global generator on both sides"),
        Adapter(
            "ARM",
            "ARM",
            ours={"arm_train_context": False},
            note="arm_train_context false (DomainBed's); batch_size = the minibatch size (one context per domain)",
        ),
        Adapter(
            "TRM",
            "TRM",
            names=trm_names,
            hparams={"iters": 2},
            ours={"trm_variant": "domainbed"},
            patch=cuda_is_a_no_op,
            setup=trm_heads_copied,
            note="iters 2; trm_variant domainbed (DomainBed's aliasing); per-domain heads copied, not compared",
        ),
        Adapter("Transfer", "Transfer"),
        Adapter(
            "Transfer",
            "Transfer",
            variant="projection",
            hparams={"delta": 1e-3, "lr_d": 0.5},
            note="delta 1e-3, lr_d 0.5 on both sides: the projection acts",
        ),
        Adapter("Transfer", "Transfer", variant="gda", hparams={"gda": True}, note="gda on both sides"),
    ]
}

#: domaingrad's algorithms that DomainBed does not have (nothing to compare)
NOT_IN_DOMAINBED = (
    "AgrSum",
    "AgrRand",
    "PCGrad",
    "CorGrad",
    "DMG",
    "MultiHeaded",
    "DropBlock",
    "GSNRDropBlock",
    "MetaGSNR",
    "MixStyle",
)


class ParityError(Exception):
    """A bad argument or checkout; the message says what to do."""


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    max_abs_diff: float | None
    compared: int  # parameter tensors compared
    note: str
    max_change: float | None  # largest change of a DomainBed parameter over the updates


# -- importing DomainBed ----------------------------------------------------------------------
def import_domainbed(path: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``domainbed.algorithms`` and ``domainbed.hparams_registry`` from the checkout at ``path``.

    DomainBed's ``networks.py`` imports ``timm`` at the top (used only by its ViT and
    ERM++ backbones): when it is not installed a stub module stands in for it.

    Raises:
        ParityError: ``path`` holds no ``domainbed/algorithms.py``, or importing fails.
    """
    root = Path(path).expanduser().resolve()
    if not (root / "domainbed" / "algorithms.py").is_file():
        raise ParityError(
            f"--domainbed {path}: no domainbed/algorithms.py under {root}; give the root folder of a "
            "DomainBed checkout (git clone https://github.com/facebookresearch/DomainBed)"
        )
    stub = importlib.util.find_spec("timm") is None
    if stub:  # only while DomainBed is imported: nothing else should find a fake timm
        sys.modules["timm"] = types.ModuleType("timm")
    sys.path.insert(0, str(root))
    try:
        algorithms = importlib.import_module("domainbed.algorithms")
        registry = importlib.import_module("domainbed.hparams_registry")
    except Exception as exc:  # noqa: BLE001 - any import failure is the checkout's
        raise ParityError(f"--domainbed {path}: importing domainbed failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if stub:
            sys.modules.pop("timm", None)
    loaded = Path(algorithms.__file__).resolve()
    if root not in loaded.parents:
        raise ParityError(f"--domainbed {path}: Python imported domainbed from {loaded}, not from {root}")
    return algorithms, registry


def checkout_commit(path: str) -> str:
    """The checkout's commit (``git rev-parse HEAD``), or "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# -- randomness -------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def recording(algorithm: torch.nn.Module, draws: dict[str, list]) -> Iterator[None]:
    """Record every ``torch.randperm`` result and every Mixup ``draw_lambda`` of our update."""
    real_randperm = torch.randperm

    def randperm(*args, **kwargs):
        out = real_randperm(*args, **kwargs)
        draws["randperm"].append(out.clone())
        return out

    real_lambda = getattr(algorithm, "draw_lambda", None)
    torch.randperm = randperm
    if real_lambda is not None:

        def draw_lambda():
            lam = real_lambda()
            draws["lambda"].append(lam)
            return lam

        algorithm.draw_lambda = draw_lambda
    try:
        yield
    finally:
        torch.randperm = real_randperm
        if real_lambda is not None:
            del algorithm.draw_lambda


@contextlib.contextmanager
def replaying(draws: dict[str, list]) -> Iterator[None]:
    """Replay the recorded draws into DomainBed's ``torch.randperm`` and ``np.random.beta``."""
    real_randperm, real_beta = torch.randperm, np.random.beta

    def randperm(n, *args, **kwargs):
        if not draws["randperm"]:
            raise RuntimeError("DomainBed drew more permutations than domaingrad")
        perm = draws["randperm"].pop(0)
        if len(perm) != n:
            raise RuntimeError(f"DomainBed drew a permutation of {n}, domaingrad one of {len(perm)}")
        return perm.clone()

    def beta(*args, **kwargs):
        if not draws["lambda"]:
            raise RuntimeError("DomainBed drew more Beta samples than domaingrad")
        return draws["lambda"].pop(0)

    torch.randperm, np.random.beta = randperm, beta
    try:
        yield
    finally:
        torch.randperm, np.random.beta = real_randperm, real_beta
    left = {k: len(v) for k, v in draws.items() if v}
    if left:
        raise RuntimeError(f"DomainBed drew fewer values than domaingrad: {left} left over")


# -- one comparison ---------------------------------------------------------------------------
def quiet() -> contextlib.AbstractContextManager:
    """Swallow what DomainBed's code prints (it is not part of the comparison)."""
    return contextlib.redirect_stdout(io.StringIO())


def our_hparams(adapter: Adapter, theirs: dict[str, Any]) -> dict[str, Any]:
    """domaingrad's hyperparameters: every name both sides know takes DomainBed's value."""
    from domaingrad.registry import resolve_hparams

    known = resolve_hparams(adapter.name, DATASET, 0, 0, {})
    shared = {k: v for k, v in theirs.items() if k in known}
    return resolve_hparams(adapter.name, DATASET, 0, 0, {**shared, **adapter.hparams, **adapter.ours})


def minibatches(steps: int, domains: int, batch_size: int, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps`` lists of one (x (B, 2, 28, 28) float64 in [0, 1), y (B,) int64) per domain."""
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.rand((batch_size, *INPUT_SHAPE), generator=g, dtype=torch.float64),
                torch.randint(0, NUM_CLASSES, (batch_size,), generator=g),
            )
            for _ in range(domains)
        ]
        for _ in range(steps)
    ]


def max_difference(
    adapter: Adapter,
    db_algorithms: types.ModuleType,
    db_registry: types.ModuleType,
    steps: int,
    domains: int,
    batch_size: int,
    seed: int,
    patched: bool = True,
) -> tuple[float, float, int, str]:
    """(largest absolute parameter difference after ``steps`` updates, largest absolute
    change of DomainBed's parameters over them (what the difference is measured against),
    number of parameter tensors compared, the patch's note) for one algorithm, in float64.

    Raises:
        ParityError: the adapter's name mapping does not cover both sides.
    """
    from domaingrad.algorithms import algorithm_class

    theirs_h = dict(db_registry.default_hparams(adapter.domainbed, DATASET))
    theirs_h["batch_size"] = batch_size  # what the updates get (ARM's context size)
    theirs_h.update(adapter.hparams)
    ours_h = our_hparams(adapter, theirs_h)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    use_patch = adapter.patch is not None and patched
    patch = adapter.patch(db_algorithms) if use_patch else contextlib.nullcontext("")
    try:
        with patch as patch_note:
            seed_all(seed)
            with quiet():  # DomainBed's URM and ADRMX print while they are built
                theirs = db_algorithms.get_algorithm_class(adapter.domainbed)(
                    INPUT_SHAPE, NUM_CLASSES, domains, theirs_h
                )
            seed_all(seed)
            ours = algorithm_class(adapter.name)(INPUT_SHAPE, NUM_CLASSES, domains, ours_h)
            ours.total_steps = steps
            pairs = matched_parameters(adapter, ours, theirs)
            with torch.no_grad():
                for _, p, q in pairs:
                    p.copy_(q)
            if adapter.rng == "generator" and not isinstance(getattr(ours, "generator", None), torch.Generator):
                raise ParityError(f"{adapter.key}: rng 'generator' needs a torch.Generator as ours.generator")
            if adapter.setup is not None:
                adapter.setup(ours, theirs)
            initial = [q.detach().clone() for _, _, q in pairs]
            for step, batch in enumerate(minibatches(steps, domains, batch_size, seed + 1)):
                draws: dict[str, list] = {"randperm": [], "lambda": []}
                seed_all(seed + 100 + step)
                if adapter.rng == "generator":
                    ours.generator.manual_seed(seed + 100 + step)
                with recording(ours, draws) if adapter.rng == "replay" else contextlib.nullcontext():
                    ours.update([(x.clone(), y.clone()) for x, y in batch])
                seed_all(seed + 100 + step)
                with replaying(draws) if adapter.rng == "replay" else contextlib.nullcontext(), quiet():
                    theirs.update([(x.clone(), y.clone()) for x, y in batch])
            diff = max(float((p.detach() - q.detach()).abs().max()) for _, p, q in pairs)
            moved = max(float((q.detach() - q0).abs().max()) for (_, _, q), q0 in zip(pairs, initial))
    finally:
        torch.set_default_dtype(previous)
    return diff, moved, len({id(p) for _, p, _ in pairs}), patch_note or ""


def matched_parameters(
    adapter: Adapter, ours: torch.nn.Module, theirs: torch.nn.Module
) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(our name, our parameter, DomainBed's) for every parameter the adapter maps.

    Raises:
        ParityError: a name maps to nothing, shapes differ, or a DomainBed parameter (not
            listed as unused) is reached by none of ours.
    """
    their_params = dict(theirs.named_parameters(remove_duplicate=False))
    pairs = []
    reached = set()
    for name, p in ours.named_parameters(remove_duplicate=False):
        target = adapter.names(name)
        if target is None:
            continue
        if target not in their_params:
            raise ParityError(f"{adapter.name}: our parameter {name} maps to {target}, which DomainBed lacks")
        q = their_params[target]
        if p.shape != q.shape:
            raise ParityError(f"{adapter.name}: {name} {tuple(p.shape)} vs DomainBed {target} {tuple(q.shape)}")
        pairs.append((name, p, q))
        reached.add(id(q))
    unreached = [n for n, q in their_params.items() if id(q) not in reached and n not in adapter.unused]
    if unreached:
        raise ParityError(f"{adapter.name}: no domaingrad parameter maps to DomainBed's {', '.join(unreached)}")
    return pairs


def compare(
    adapter: Adapter,
    db_algorithms: types.ModuleType,
    db_registry: types.ModuleType,
    steps: int,
    domains: int,
    batch_size: int,
    seed: int,
    tol: float,
) -> Result:
    """The :class:`Result` of one algorithm (SKIP when DomainBed's class needs a missing module)."""
    missing = [m for m in adapter.requires if importlib.util.find_spec(m) is None]
    if missing:
        return Result(adapter.key, "SKIP", None, 0, f"DomainBed's {adapter.domainbed} needs {', '.join(missing)}", None)
    diff, moved, count, patch_note = max_difference(
        adapter, db_algorithms, db_registry, steps, domains, batch_size, seed
    )
    notes = [n for n in (adapter.note, patch_note) if n]
    if adapter.patch is not None and adapter.report_unpatched:
        raw, _, _, _ = max_difference(adapter, db_algorithms, db_registry, steps, domains, batch_size, seed, False)
        notes.append(f"unpatched: {raw:.3g}")
    return Result(adapter.key, "PASS" if diff <= tol else "FAIL", diff, count, "; ".join(notes), moved)


def table(results: list[Result], tol: float) -> str:
    lines = [
        "| algorithm | result | max abs parameter difference | max parameter change | parameter tensors | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        moved = "-" if r.max_change is None else f"{r.max_change:.3g}"
        lines.append(f"| {r.name} | {r.status} | {diff} | {moved} | {r.compared or '-'} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domainbed", required=True, help="root folder of a DomainBed checkout")
    parser.add_argument(
        "--algorithms", nargs="+", default=None, metavar="NAME", help="default: all of " + ", ".join(ADAPTERS)
    )
    parser.add_argument("--steps", type=int, default=5, help="updates per algorithm (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per domain per update (default 8)")
    parser.add_argument("--domains", type=int, default=3, help="training domains (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-10, help="largest allowed difference (default 1e-10)")
    parser.add_argument(
        "--commit", default=None, help="the checkout's commit, shown in the output (default: git rev-parse HEAD)"
    )
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    try:
        names = args.algorithms or list(ADAPTERS)
        unknown = [n for n in names if n not in ADAPTERS]
        if unknown:
            raise ParityError(
                f"--algorithms: no adapter for {', '.join(unknown)}; known: {', '.join(ADAPTERS)} "
                "(add one to ADAPTERS in scripts/parity_domainbed.py)"
            )
        if args.steps < 1 or args.batch_size < 2 or args.domains < 2:
            raise ParityError("--steps must be >= 1, --batch-size >= 2 and --domains >= 2")
        db_algorithms, db_registry = import_domainbed(args.domainbed)
        threads = torch.get_num_threads()
        print(f"DomainBed checkout: {args.domainbed} (commit {args.commit or checkout_commit(args.domainbed)})")
        print(
            f"torch {torch.__version__}, float64, CPU, {threads} thread(s); input {INPUT_SHAPE}, {NUM_CLASSES} "
            f"classes, {args.domains} domains x {args.batch_size} inputs, {args.steps} updates, tol {args.tol:g}"
        )
        results = []
        for name in names:
            result = compare(
                ADAPTERS[name],
                db_algorithms,
                db_registry,
                args.steps,
                args.domains,
                args.batch_size,
                args.seed,
                args.tol,
            )
            print(
                f"{result.name:<24} {result.status}  "
                f"{'-' if result.max_abs_diff is None else f'{result.max_abs_diff:.3g}'}",
                flush=True,
            )
            results.append(result)
    except ParityError as exc:
        print(f"parity_domainbed: error: {exc}", file=sys.stderr)
        return 2
    text = table(results, args.tol)
    print()
    print(text)
    print(f"\nnot in DomainBed (not compared): {', '.join(NOT_IN_DOMAINBED)}")
    if args.markdown:
        Path(args.markdown).write_text(f"{text}\n\nNot in DomainBed (not compared): {', '.join(NOT_IN_DOMAINBED)}.\n")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
