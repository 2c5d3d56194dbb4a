"""Training algorithms, registered by name (DomainBed's ``algorithms.get_algorithm_class``).

An algorithm is named by its registered name (:data:`ALGORITHMS`,
``@register_algorithm``), a ``package.module:Class`` spec, or an entry point of the
group ``domaingrad.algorithms`` (see :mod:`domaingrad.plugins`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .. import plugins
from ..errors import DomainGradError
from .alignment import CORAL, DANN, MMD
from .base import Algorithm
from .dmg import DMG, MultiHeaded
from .dropout import DropBlock, GSNRDropBlock, MetaGSNR
from .erm import ERM
from .fishr import Fishr
from .invariance import IRM, SD, VREx
from .meta import MLDG, Fish
from .mixing import Mixup
from .robust import GroupDRO
from .rsc import RSC
from .surgery import AgrRand, AgrSum, ANDMask, CorGrad, GradientSurgery, PCGrad, SANDMask

#: name -> algorithm class; the first docstring line is its description in `domaingrad list`
ALGORITHMS: dict[str, type[Algorithm]] = {
    "ERM": ERM,
    "AgrSum": AgrSum,
    "AgrRand": AgrRand,
    "PCGrad": PCGrad,
    "CorGrad": CorGrad,
    "ANDMask": ANDMask,
    "SANDMask": SANDMask,
    "Fishr": Fishr,
    "IRM": IRM,
    "VREx": VREx,
    "CORAL": CORAL,
    "MMD": MMD,
    "DANN": DANN,
    "GroupDRO": GroupDRO,
    "Mixup": Mixup,
    "MLDG": MLDG,
    "Fish": Fish,
    "SD": SD,
    "DMG": DMG,
    "MultiHeaded": MultiHeaded,
    "RSC": RSC,
    "DropBlock": DropBlock,
    "GSNRDropBlock": GSNRDropBlock,
    "MetaGSNR": MetaGSNR,
}
#: the names domaingrad itself defines (``register_algorithm`` may not replace them)
BUILTIN_ALGORITHMS = frozenset(ALGORITHMS)

A = TypeVar("A", bound=type)


def register_algorithm(name: str) -> Callable[[A], A]:
    """Class decorator registering an :class:`Algorithm` subclass as ``name`` (timm's
    ``register_model`` pattern), so ``--algorithm name``, ``domaingrad.train(algorithm=name)``
    and ``domaingrad.create_algorithm(name, ...)`` find it in this process::

        @register_algorithm("MyAlg")
        class MyAlg(ERM):
            def update(self, minibatches, unlabeled=None): ...

    Registering a user name again replaces the earlier class (with a warning: e.g. a
    notebook cell run twice). Other processes (sweep workers) do not see
    registrations: name the class there as ``package.module:Class`` (importing that
    module runs the decorator too), or declare an entry point.

    Raises:
        TypeError: the decorated object is not an :class:`Algorithm` subclass.
        ValueError: ``name`` is empty, contains a colon or is one of domaingrad's own.
    """
    plugins.check_new_name(name, BUILTIN_ALGORITHMS, "algorithm")

    def decorate(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(
                f"@register_algorithm({name!r}) decorates a subclass of domaingrad.algorithms.Algorithm, got {cls!r}"
            )
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            warnings.warn(
                f"register_algorithm: {name!r} was registered to {ALGORITHMS[name]!r}; it now names {cls!r}",
                stacklevel=2,
            )
        ALGORITHMS[name] = cls
        return cls

    return decorate


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm class named ``name``: a registered name, a ``package.module:Class``
    spec, or an entry point of the group ``domaingrad.algorithms``.

    Raises:
        DomainGradError: for an unknown name (listing the valid ones), or a spec that
            cannot be imported or does not name an :class:`Algorithm` subclass.
    """
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if plugins.is_spec(name):
        return _checked(plugins.load_spec(name, "--algorithm"), name)
    found = plugins.load_entry_point(plugins.ALGORITHM_GROUP, name, "--algorithm")
    if found is not None:
        return _checked(found, f"{name} (entry point)")
    raise DomainGradError(
        f"unknown algorithm {name!r}; valid algorithms: {', '.join(list_algorithms())}, "
        "or package.module:Class for your own class"
    )


def _checked(obj: Any, what: str) -> type[Algorithm]:
    if not (isinstance(obj, type) and issubclass(obj, Algorithm)):
        raise DomainGradError(
            f"--algorithm {what} is {obj!r}, not an algorithm: expected a subclass of "
            "domaingrad.algorithms.Algorithm (update/predict)"
        )
    return obj


def list_algorithms() -> list[str]:
    """Every algorithm name: the registered ones (domaingrad's, then this process's
    ``@register_algorithm`` ones) and the installed entry points (not imported)."""
    names = list(ALGORITHMS)
    return names + [n for n in plugins.entry_point_names(plugins.ALGORITHM_GROUP) if n not in ALGORITHMS]


__all__ = [
    "ALGORITHMS",
    "BUILTIN_ALGORITHMS",
    "CORAL",
    "DANN",
    "DMG",
    "ERM",
    "MLDG",
    "MMD",
    "RSC",
    "SD",
    "ANDMask",
    "AgrRand",
    "AgrSum",
    "Algorithm",
    "CorGrad",
    "DropBlock",
    "Fish",
    "Fishr",
    "GSNRDropBlock",
    "GradientSurgery",
    "GroupDRO",
    "IRM",
    "MetaGSNR",
    "Mixup",
    "MultiHeaded",
    "PCGrad",
    "SANDMask",
    "VREx",
    "algorithm_class",
    "list_algorithms",
    "register_algorithm",
]
