"""Display order and environment names, as DomainBed's collect_results uses them.

DomainBed orders table rows by ``domainbed.algorithms.ALGORITHMS`` and datasets by
``domainbed.datasets.DATASETS``, and labels columns with each dataset's
``ENVIRONMENTS``. These lists are copied here so that reading a sweep needs neither
DomainBed nor torch. Names DomainBed does not know come after, alphabetically (DomainBed
drops unknown datasets from its tables; the report keeps them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: ``domainbed/algorithms.py`` ALGORITHMS, in its order
DOMAINBED_ALGORITHMS = [
    "ERM",
    "Fish",
    "IRM",
    "GroupDRO",
    "Mixup",
    "MLDG",
    "CORAL",
    "MMD",
    "DANN",
    "CDANN",
    "MTL",
    "SagNet",
    "ARM",
    "VREx",
    "RSC",
    "SD",
    "ANDMask",
    "SANDMask",
    "IGA",
    "SelfReg",
    "Fishr",
    "TRM",
    "IB_ERM",
    "IB_IRM",
    "CAD",
    "CondCAD",
    "Transfer",
    "CausIRL_CORAL",
    "CausIRL_MMD",
    "EQRM",
    "RDM",
    "ADRMX",
    "ERMPlusPlus",
    "URM",
]

#: dataset -> environment names: DomainBed's ``domainbed/datasets.py`` (in its DATASETS
#: order), then domaingrad's own datasets
ENVIRONMENT_NAMES: dict[str, list[str]] = {
    "Debug28": ["0", "1", "2"],
    "Debug224": ["0", "1", "2"],
    "ColoredMNIST": ["+90%", "+80%", "-90%"],
    "RotatedMNIST": ["0", "15", "30", "45", "60", "75"],
    "VLCS": ["C", "L", "S", "V"],
    "PACS": ["A", "C", "P", "S"],
    "OfficeHome": ["A", "C", "P", "R"],
    "TerraIncognita": ["L100", "L38", "L43", "L46"],
    "DomainNet": ["clip", "info", "paint", "quick", "real", "sketch"],
    "SVIRO": ["aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"],
    "WILDSCamelyon": [f"hospital_{i}" for i in range(5)],
    "WILDSFMoW": [f"region_{i}" for i in range(6)],
    "ColoredFashionMNIST": ["+90%", "+80%", "-90%"],
    "RotatedFashionMNIST": ["0", "15", "30", "45", "60", "75"],
    **{
        f"Spawrious{kind}_{level}": ["Test", "SC_group_1", "SC_group_2"]
        for kind in ("O2O", "M2M")
        for level in ("easy", "medium", "hard")
    },
}

_ENV_KEY = re.compile(r"^env(\d+)_out_acc$")


def order_algorithms(names: Iterable[str]) -> list[str]:
    """DomainBed's row order: its ALGORITHMS list first, then unknown names alphabetically."""
    names = set(names)
    return [n for n in DOMAINBED_ALGORITHMS if n in names] + sorted(names - set(DOMAINBED_ALGORITHMS))


def order_datasets(names: Iterable[str]) -> list[str]:
    """DomainBed's dataset order (``datasets.DATASETS``), then unknown names alphabetically."""
    names = set(names)
    return [n for n in ENVIRONMENT_NAMES if n in names] + sorted(names - set(ENVIRONMENT_NAMES))


def count_environments(record: dict) -> int:
    """Number of environments of a record: DomainBed counts ``env{i}_out_acc`` keys from 0 up."""
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n


def environment_names(dataset: str, n_envs: int) -> list[str]:
    """Column labels of a dataset's table: its ENVIRONMENTS, or ``env0``, ``env1``, ... when unknown
    or when the records hold a different number of environments."""
    known = ENVIRONMENT_NAMES.get(dataset)
    if known is not None and len(known) == n_envs:
        return list(known)
    return [f"env{i}" for i in range(n_envs)]
