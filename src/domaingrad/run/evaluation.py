"""Accuracy of an algorithm on a split (DomainBed's ``misc.accuracy``), and the default
evaluation batch size."""

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


#: ``--eval-batch-size auto`` by device type. On CPU, 64 (DomainBed's evaluation batch):
#: MNIST_CNN and ResNet forward passes cost less per image at 64 than at 512 there
#: (``benchmarks/bench_evaluation.py``, docs/benchmarks.md). On CUDA, 512: larger batches
#: keep the device busy (not measured here: no GPU; pass ``--eval-batch-size`` to choose).
AUTO_EVAL_BATCH_SIZE = {"cpu": 64, "cuda": 512}


def auto_eval_batch_size(algorithm: Algorithm, device: torch.device | str) -> int:
    """The batch size of ``--eval-batch-size auto`` for ``algorithm`` on ``device``.

    An algorithm whose predictions depend on the batch they come in (ARM's context: the
    batch is the adaptation set) fixes it with a class attribute ``eval_batch_size``; for
    every other one it is :data:`AUTO_EVAL_BATCH_SIZE` of the device type (512 for other
    accelerators). Deterministic: the same run always evaluates in the same batches, so a
    resumed run gives the records of an uninterrupted one.
    """
    fixed = getattr(type(algorithm), "eval_batch_size", None)
    if isinstance(fixed, int) and fixed > 0:
        return fixed
    return AUTO_EVAL_BATCH_SIZE.get(torch.device(device).type, 512)
