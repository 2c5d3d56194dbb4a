"""Seeding helpers shared by the protocol (DomainBed's ``misc.seed_hash``)."""

from __future__ import annotations

import hashlib


def seed_hash(*args: object) -> int:
    """Derive an integer seed in [0, 2**31) from any tuple of values.

    Identical to DomainBed's ``misc.seed_hash`` (md5 of ``str(args)``), so splits and
    hyperparameter draws match DomainBed's for the same seeds.
    """
    args_str = str(args)
    return int(hashlib.md5(args_str.encode("utf-8")).hexdigest(), 16) % (2**31)
