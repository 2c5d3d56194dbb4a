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
from .adaptive import ARM
from .adversarial import ADRMX, URM
from .alignment import CDANN, CORAL, DANN, MMD, CausIRL_CORAL, CausIRL_MMD
from .base import Algorithm
from .bottleneck import IB_ERM, IB_IRM
from .contrastive import CAD, CondCAD, SelfReg
from .distribution import RDM
from .dmg import DMG, MultiHeaded
from .dropout import DropBlock, GSNRDropBlock, MetaGSNR
from .erm import ERM
from .erm_plus import ERMPlusPlus
from .fishr import Fishr
from .invariance import EQRM, IGA, IRM, SD, VREx
from .meta import MLDG, Fish
from .mixing import Mixup
from .mixstyle import MixStyle
from .multitask import MTL
from .robust import GroupDRO
from .rsc import RSC
from .style import SagNet
from .surgery import AgrRand, AgrSum, ANDMask, CorGrad, GradientSurgery, PCGrad, SANDMask
from .transfer import TRM, Transfer

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
    "MixStyle": MixStyle,
    "CDANN": CDANN,
    "CausIRL_CORAL": CausIRL_CORAL,
    "CausIRL_MMD": CausIRL_MMD,
    "IGA": IGA,
    "IB_ERM": IB_ERM,
    "IB_IRM": IB_IRM,
    "EQRM": EQRM,
    "SelfReg": SelfReg,
    "CAD": CAD,
    "CondCAD": CondCAD,
    "RDM": RDM,
    "ADRMX": ADRMX,
    "URM": URM,
    "ERMPlusPlus": ERMPlusPlus,
    "MTL": MTL,
    "SagNet": SagNet,
    "ARM": ARM,
    "TRM": TRM,
    "Transfer": Transfer,
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


def resolve_algorithm_name(name: str) -> str:
    """The canonical spelling of the algorithm name ``name``, as records, manifests and
    output keep it: a registered or entry-point name whatever its case (``"erm"`` ->
    ``"ERM"``, when only one name matches up to case), a ``package.module:Class`` spec
    unchanged. Nothing is imported.

    Raises:
        DomainGradError: for an unknown name, listing the valid ones and suggesting the
            closest (``"Fisher"``: did you mean Fishr?).
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"an algorithm name is a string, got {name!r}")
    if name in ALGORITHMS or plugins.is_spec(name):
        return name
    known = list_algorithms()
    canonical = plugins.canonical_name(name, known)
    if canonical is not None:
        return canonical
    raise DomainGradError(
        f"unknown algorithm {name!r}; valid algorithms: {', '.join(known)}, "
        f"or package.module:Class for your own class{plugins.did_you_mean(name, known)}"
    )


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm class named ``name``: a registered name, a ``package.module:Class``
    spec, or an entry point of the group ``domaingrad.algorithms``. Names are matched
    case-insensitively when that is unambiguous (:func:`resolve_algorithm_name`).

    Raises:
        DomainGradError: for an unknown name (listing the valid ones, suggesting the
            closest), or a spec that cannot be imported or does not name an
            :class:`Algorithm` subclass.
        TypeError: ``name`` is not a string.
    """
    name = resolve_algorithm_name(name)
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if plugins.is_spec(name):
        return _checked(plugins.load_spec(name, "--algorithm"), name)
    found = plugins.load_entry_point(plugins.ALGORITHM_GROUP, name, "--algorithm")
    if found is None:  # listed a moment ago, gone now (an uninstalled distribution)
        raise DomainGradError(f"--algorithm {name}: its entry point is no longer installed")
    return _checked(found, f"{name} (entry point)")


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
    "ADRMX",
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
    "CAD",
    "CDANN",
    "CausIRL_CORAL",
    "CausIRL_MMD",
    "CondCAD",
    "EQRM",
    "ERMPlusPlus",
    "IB_ERM",
    "IB_IRM",
    "IGA",
    "MixStyle",
    "RDM",
    "SelfReg",
    "URM",
    "ARM",
    "MTL",
    "SagNet",
    "TRM",
    "Transfer",
    "algorithm_class",
    "list_algorithms",
    "register_algorithm",
    "resolve_algorithm_name",
]
