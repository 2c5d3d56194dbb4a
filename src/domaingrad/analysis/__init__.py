"""Gradient analyses: the diagnostic experiments the gradient-based methods rest on.

Each analysis is a library function (tensors or a run in, a typed result out) in its own
module and a subcommand ``domaingrad analyze NAME`` that writes ``NAME.json``,
``NAME.csv`` and ``NAME.png`` into ``--output-dir`` (see :mod:`._common`). The names and
modules are listed in :data:`ANALYSES`; nothing heavy is imported until one runs.
"""

from __future__ import annotations

#: analysis name -> (module under domaingrad.analysis, one-line summary for ``--help``)
ANALYSES: dict[str, tuple[str, str]] = {
    "similarity": (
        "similarity",
        "within- vs between-domain cosine similarity of per-sample gradients during ERM "
        "(Mansilla et al., ICCV 2021, Sec. 4.3, Fig. 2)",
    ),
    "angles": (
        "angles",
        "the angle law of random vectors (CorGrad, eqs. 8-10, Fig. 3) and the angles of real per-domain "
        "gradients per network, layer and slice with PCGrad's modification ratio (Fig. 5)",
    ),
    "modification": (
        "modification",
        "modification ratio and frequency of surgery runs over training, ten groups of steps (CorGrad, Figs. 6-7)",
    ),
    "gsnr": (
        "gsnr",
        "per-parameter gradient signal-to-noise ratio per layer (Michalkiewicz et al., ICCV 2023) and the "
        "masked-feature loss difference of RSC and GSNR-DropBlock runs over training",
    ),
    "dmg-masks": (
        "dmg_masks",
        "DMG's domain-specific masks: mask x domain accuracies, Mask-Ens vs Pred-Ens, sIoU over training "
        "(Chattopadhyay et al., ECCV 2020, Tables 4-5)",
    ),
    "gradient-variance": (
        "variance",
        "distance between per-domain gradient variances (what Fishr penalises) over training, any algorithm "
        "(Rame et al., ICML 2022)",
    ),
    "mixed-batches": (
        "mixed",
        "gradient surgery on per-domain vs randomly mixed batches (Mansilla et al., ICCV 2021, Fig. 4)",
    ),
}

__all__ = ["ANALYSES"]
