"""What a training run prints: the header, one line per checkpoint, the progress bar and
the final per-environment table. Every line also goes to the run's ``out.txt``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .. import models
from ..version import __version__
from .args import has_test_parts, initial_weights

if TYPE_CHECKING:
    from .train import TrainingRun

#: record keys the checkpoint line leaves out (they are not losses or timings)
_NOT_LOGGED = ("step", "epoch", "hparams", "args", "mem_gb", "wall_time")


def _fmt(value: float) -> str:
    return "  nan" if math.isnan(value) else f"{value:.3f}"


def results_table(run: TrainingRun, record: dict[str, Any]) -> str:
    """Per-environment accuracy table of one record, as printed at the end of a run."""
    names = run.dataset.environment_names
    width = max(4, *(len(n) for n in names))
    has_test = has_test_parts(run.args)
    lines = [
        f"{'env':>3}  {'name':<{width}}  {'role':<5}  {'in_acc':>6}  {'out_acc':>7}"
        + (f"  {'test_acc':>8}" if has_test else "")
    ]
    for i, name in enumerate(names):
        role = "test" if i in run.args.test_envs else "train"
        lines.append(
            f"{i:>3}  {name:<{width}}  {role:<5}  {_fmt(record[f'env{i}_in_acc']):>6}  "
            f"{_fmt(record[f'env{i}_out_acc']):>7}" + (f"  {_fmt(record[f'env{i}_test_acc']):>8}" if has_test else "")
        )
    return "\n".join(lines)


def checkpoint_line(run: TrainingRun, record: dict[str, Any]) -> str:
    """One checkpoint on one line: step, epoch, the logged values, every environment's
    in/out accuracy."""
    parts = [f"step {record['step']:>5}", f"epoch {record['epoch']:.2f}"]
    parts += [
        f"{k} {record[k]:.4f}"
        for k in sorted(record)
        if k not in _NOT_LOGGED and not k.startswith("env") and isinstance(record[k], float)
    ]
    parts += [f"env{i} {record[f'env{i}_in_acc']:.3f}/{record[f'env{i}_out_acc']:.3f}" for i in range(len(run.dataset))]
    return " | ".join(parts)


def summary(run: TrainingRun, record: dict[str, Any]) -> dict[str, float]:
    """Mean training-domain validation (out) accuracy and mean test-domain in accuracy."""
    train = float(np.mean([record[f"env{i}_out_acc"] for i in run.train_envs]))
    test = float(np.mean([record[f"env{i}_in_acc"] for i in run.args.test_envs]))
    return {"train": train, "test": test}


class RunConsole:
    """The output of one run: lines to ``stream`` (through tqdm, so the bar stays below
    them) and to ``log`` (the run's ``out.txt``), and the progress bar on stderr.

    Args:
        stream: where the lines go (default stdout).
        log: called with every line (e.g. :meth:`RunDirectory.log`).
        progress: show the bar (None: only when stderr is a terminal, tqdm's rule).
    """

    def __init__(self, stream: IO[str] | None, log: Callable[[str], None], progress: bool | None):
        self.stream = stream or sys.stdout
        self.log = log
        self.progress = progress
        self.bar: tqdm | None = None
        self.reported_failures = 0

    def say(self, line: str) -> None:
        tqdm.write(line, file=self.stream)
        self.log(line)

    def header(self, run: TrainingRun, resumed_step: int | None) -> None:
        """What the run is: version, algorithm, dataset, device, data, hparams, evaluation, weights."""
        args = run.args
        if resumed_step is not None:
            self.say(f"resuming from the checkpoint at step {resumed_step}")
        self.say(
            f"domaingrad {__version__} | {args.algorithm} on {args.dataset} | test envs {args.test_envs} | "
            f"{run.steps} steps on {run.device}"
        )
        self.say(f"data: {run.dataset.source}")
        for line in run.dataset.report:
            self.say(f"data: {line}")
        self.say(f"hparams: {run.hparams}")
        if run.dataset.AUGMENTS:
            self.say(
                "evaluation: training environments on augmented images (DomainBed's; --clean-eval for clean "
                "ones), test environments on clean images"
                if run.augment_eval
                else "evaluation: every split on clean images"
            )
        self.say(
            f"featurizer: {models.backbone_name(run.dataset.input_shape, run.hparams)}, initial weights: "
            f"{initial_weights(args, run.dataset.input_shape, run.hparams)}"
        )

    def start_bar(self, total: int, initial: int) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=None if self.progress is None else not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            unit="step",
        )

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def checkpoint(self, run: TrainingRun, record: dict[str, Any]) -> None:
        """The bar's accuracies, the checkpoint line, and images newly skipped as unreadable."""
        if self.bar is not None:
            accs = summary(run, record)
            self.bar.set_postfix_str(f"train-domain acc {accs['train']:.3f} | test-domain acc {accs['test']:.3f}")
        self.say(checkpoint_line(run, record))
        failures = getattr(run.dataset, "load_failures", [])
        if len(failures) > self.reported_failures:
            self.say(
                f"data: skipped {len(failures) - self.reported_failures} image(s) that failed to decode "
                f"while loading: {', '.join(failures[self.reported_failures :])}"
            )
            self.reported_failures = len(failures)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def final(self, run: TrainingRun, record: dict[str, Any]) -> None:
        self.say("per-environment accuracy at the last step:\n" + results_table(run, record))
