"""Paper reproductions: ``EXPERIMENTS`` maps a name to (module, one-line description);
each module has ``run(data_dir, restarts, steps, seed) -> results`` and
``format_table(results) -> str``."""

from __future__ import annotations

from domaingrad.reproduce import fishr_colored_mnist

EXPERIMENTS = {
    "fishr-colored-mnist": (
        fishr_colored_mnist,
        "Fishr paper, IRM-setup Colored MNIST: ERM / IRM / V-REx / Fishr train, test and "
        "gray-test accuracy (MLP, full batch, 501 steps, 10 restarts)",
    ),
}

__all__ = ["EXPERIMENTS"]
