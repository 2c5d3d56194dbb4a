"""domaingrad: gradient-based domain generalization under a DomainBed-grade protocol.

Layout (data -> models -> algorithms -> training run):

- :mod:`domaingrad.data`: multi-domain datasets, in/out splits, minibatch sampling;
- :mod:`domaingrad.models`: featurizers and classifiers;
- :mod:`domaingrad.gradients`: per-domain gradients and gradient surgery rules;
- :mod:`domaingrad.algorithms`: training algorithms (``update``/``predict`` contract);
- :mod:`domaingrad.hparams`: the seeded hyperparameter registry;
- :mod:`domaingrad.run`: one training run (checkpoints, results.jsonl, resume).
"""
from __future__ import annotations

__version__ = "0.1.0"
