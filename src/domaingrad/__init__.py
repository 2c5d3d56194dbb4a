"""domaingrad: gradient-based domain generalization under a DomainBed-grade protocol.

The public API (imported on first use, so ``import domaingrad`` and the command line
start fast)::

    import domaingrad as dg
    result = dg.train(dataset="ColoredMNIST", algorithm="ERM", test_envs=[2], steps=101)
    dg.list_datasets(), dg.list_algorithms()
    dg.default_hparams("ERM", "ColoredMNIST"), dg.random_hparams("ERM", "ColoredMNIST", 1, 0)
    dg.create_algorithm("ERM", (2, 28, 28), 2, 2, {"lr": 1e-3})
    dg.get_dataset("ColoredMNIST")

    @dg.register_algorithm("MyAlg")        # or --algorithm my_package.my_module:MyAlg
    class MyAlg(dg.ERM): ...

Layout (lower layers never import higher ones): ``errors``, ``rng``, ``hparams``,
``layout``, ``plugins`` -> :mod:`domaingrad.data` -> :mod:`domaingrad.models` ->
:mod:`domaingrad.gradients` -> :mod:`domaingrad.algorithms` -> :mod:`domaingrad.registry`
-> :mod:`domaingrad.run` -> :mod:`domaingrad.sweep` -> :mod:`domaingrad.report`, with
this module, :mod:`domaingrad.training` and :mod:`domaingrad.cli` on top.
"""

from __future__ import annotations

import importlib

from .version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up

#: public name -> module defining it (imported by ``__getattr__`` on first use)
_EXPORTS = {
    "train": "domaingrad.training",
    "TrainResult": "domaingrad.training",
    "TrainArgs": "domaingrad.run.args",
    "list_algorithms": "domaingrad.algorithms",
    "register_algorithm": "domaingrad.algorithms",
    "Algorithm": "domaingrad.algorithms",
    "ERM": "domaingrad.algorithms",
    "list_datasets": "domaingrad.data",
    "register_dataset": "domaingrad.data",
    "get_dataset": "domaingrad.data",
    "MultipleDomainDataset": "domaingrad.data",
    "TensorEnvironment": "domaingrad.data",
    "create_algorithm": "domaingrad.registry",
    "default_hparams": "domaingrad.registry",
    "random_hparams": "domaingrad.registry",
    "resolve_hparams": "domaingrad.registry",
    "hparam_specs": "domaingrad.registry",
    "HParam": "domaingrad.hparams",
    "DomainGradError": "domaingrad.errors",
}

__all__ = [
    "Algorithm",
    "DomainGradError",
    "ERM",
    "HParam",
    "MultipleDomainDataset",
    "TensorEnvironment",
    "TrainArgs",
    "TrainResult",
    "__version__",
    "create_algorithm",
    "default_hparams",
    "get_dataset",
    "hparam_specs",
    "list_algorithms",
    "list_datasets",
    "random_hparams",
    "register_algorithm",
    "register_dataset",
    "resolve_hparams",
    "train",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'domaingrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from .algorithms import ERM, Algorithm, list_algorithms, register_algorithm
    from .data import MultipleDomainDataset, TensorEnvironment, get_dataset, list_datasets, register_dataset
    from .errors import DomainGradError
    from .hparams import HParam
    from .registry import create_algorithm, default_hparams, hparam_specs, random_hparams, resolve_hparams
    from .run.args import TrainArgs
    from .training import TrainResult, train
