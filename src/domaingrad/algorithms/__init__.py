"""Training algorithms, registered by name (DomainBed's ``algorithms.get_algorithm_class``)."""
from __future__ import annotations

from ..errors import DomainGradError
from .base import Algorithm
from .erm import ERM
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
}


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``.

    Raises:
        DomainGradError: for an unknown name, listing the valid ones.
    """
    if name not in ALGORITHMS:
        raise DomainGradError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "ANDMask", "AgrRand", "AgrSum", "Algorithm", "CorGrad", "ERM", "GradientSurgery",
           "PCGrad", "SANDMask", "algorithm_class"]
