"""One training run: checkpoints, results.jsonl records, exact resume."""
from __future__ import annotations

from .evaluation import accuracy
from .train import TrainArgs, TrainingRun, train

__all__ = ["TrainArgs", "TrainingRun", "accuracy", "train"]
