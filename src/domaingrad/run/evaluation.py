"""Accuracy of an algorithm on a split (DomainBed's ``misc.accuracy``)."""

from __future__ import annotations

import torch

from ..algorithms import Algorithm
from ..data import Split


@torch.no_grad()
def accuracy(
    algorithm: Algorithm,
    split: Split,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    domain: int | None = None,
) -> float:
    """Fraction of the split's samples whose argmax logit is the label.

    ``domain`` is the split's training-domain index (its position among the training
    domains) for a split of a training environment: the logits then come from
    ``algorithm.predict_source(x, domain)`` (e.g. DMG's own-domain hard mask); None (a
    test environment) uses ``algorithm.predict``.

    The algorithm is put in eval mode for the pass and restored to its previous mode.
    A one-logit output is read as binary (logit > 0), as DomainBed does. An empty split
    has accuracy ``nan``. Image-folder splits are loaded in DataLoader workers; images
    skipped because they fail to decode (``--corrupt-images skip``) do not count.
    """
    if len(split) == 0:
        return float("nan")
    was_training = algorithm.training
    algorithm.eval()
    correct = total = 0
    try:
        for x, y in split.batches(batch_size):
            if len(y) == 0:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = algorithm.predict(x) if domain is None else algorithm.predict_source(x, domain)
            pred = logits.gt(0).long().squeeze(1) if logits.size(1) == 1 else logits.argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
    finally:
        algorithm.train(was_training)
    return correct / total if total else float("nan")
