"""One training run: arguments (:mod:`.args`), the run (:mod:`.train`), its console
output (:mod:`.console`) and files (:mod:`.output`): checkpoints, results.jsonl records,
exact resume."""

from __future__ import annotations

from .args import TrainArgs, check_args
from .evaluation import accuracy
from .train import RunOutcome, TrainingRun, run_training, train

__all__ = ["RunOutcome", "TrainArgs", "TrainingRun", "accuracy", "check_args", "run_training", "train"]
