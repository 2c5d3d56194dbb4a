"""Training algorithms, registered by name (DomainBed's ``algorithms.get_algorithm_class``)."""
from __future__ import annotations

from ..errors import DomainGradError
from .base import Algorithm
from .alignment import CORAL, DANN, MMD
from .dmg import DMG, MultiHeaded
from .dropout import RSC, DropBlock, GSNRDropBlock, MetaGSNR
from .erm import ERM
from .fishr import Fishr
from .invariance import IRM, SD, VREx
from .meta import MLDG, Fish
from .mixing import Mixup
from .robust import GroupDRO
from .surgery import ANDMask, AgrRand, AgrSum, CorGrad, GradientSurgery, PCGrad, SANDMask

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


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``.

    Raises:
        DomainGradError: for an unknown name, listing the valid ones.
    """
    if name not in ALGORITHMS:
        raise DomainGradError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "algorithm_class", *ALGORITHMS]
