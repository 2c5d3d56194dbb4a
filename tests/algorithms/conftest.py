"""Fixtures of the algorithm tests."""

from __future__ import annotations

import pytest

from domaingrad import models
from tests.algorithms.staged import StagedCNN


@pytest.fixture
def staged_cnn(monkeypatch, request):
    """Every test here runs on StagedCNN, except those on MNIST_CNN or real photographs."""
    if not any(real in request.node.name for real in ("mnist_cnn", "real_pacs")):
        monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: StagedCNN(input_shape))
