"""``domaingrad.train(...)``: one training run from Python, with hyperparameters as a dict.

The run is the one ``domaingrad train`` makes (DomainBed's ``train.py`` protocol,
Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021), with the
same records, checkpoints and resume; the result keeps the trained algorithm in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from .algorithms import ALGORITHMS, Algorithm
from .data import DATASETS, MultipleDomainDataset
from .plugins import spec_of
from .run.args import TrainArgs
from .run.train import run_training


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        records: every results record of the run, in step order (DomainBed's keys:
            ``step``, ``env{i}_in_acc``, ``env{i}_out_acc``, ``loss``, ``hparams``, ...).
        algorithm: the trained algorithm (an ``nn.Module`` on the run's device, in train
            mode); ``algorithm.predict(x)`` gives logits.
        hparams: the run's hyperparameters.
        environments: the environment names, in index order.
        test_envs: the held-out environments.
        output_dir: the run directory (results.jsonl, out.txt, model.pkl, done), or None
            when :func:`train` ran in a temporary directory that is gone.
    """

    records: list[dict[str, Any]]
    algorithm: Algorithm
    hparams: dict[str, Any]
    environments: list[str]
    test_envs: list[int]
    output_dir: Path | None

    @property
    def final(self) -> dict[str, Any]:
        """The record of the last checkpoint."""
        return self.records[-1]

    @property
    def accuracies(self) -> dict[int, dict[str, float]]:
        """Final accuracy per environment: ``{i: {"in": ..., "out": ...}}`` (plus ``"test"``
        under the 70/10/20 split protocol), fractions in [0, 1] (NaN for an empty split).
        The test-domain accuracy DomainBed reports is ``accuracies[t]["in"]`` of a test
        environment ``t``."""
        out: dict[int, dict[str, float]] = {}
        for i in range(len(self.environments)):
            out[i] = {
                kind: self.final[f"env{i}_{kind}_acc"]
                for kind in ("in", "out", "test")
                if f"env{i}_{kind}_acc" in self.final
            }
        return out


def _name(value: str | type, registry: Mapping[str, Any], kind: str) -> str:
    """The name under which ``value`` (a name, or a class) is found: its registered
    name, else its ``module:qualname`` spec."""
    if isinstance(value, str):
        return value
    if not isinstance(value, type):
        raise TypeError(f"{kind} is a name or a class, got {value!r}")
    for name, entry in registry.items():
        if (entry[0] if isinstance(entry, tuple) else entry) is value:
            return name
    return spec_of(value)


def train(
    dataset: str | type[MultipleDomainDataset] = "ColoredMNIST",
    algorithm: str | type[Algorithm] = "ERM",
    test_envs: Sequence[int] = (0,),
    hparams: Mapping[str, Any] | None = None,
    steps: int | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    checkpoint_freq: int | None = None,
    hparams_seed: int = 0,
    trial_seed: int = 0,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    stream: IO[str] | None = None,
    verbose: bool = True,
    **options: Any,
) -> TrainResult:
    """Train one model, as ``domaingrad train`` does, and return the records and the
    trained algorithm.

    Example (the README's main job, at fewer steps)::

        import domaingrad as dg
        result = dg.train(dataset="ColoredMNIST", algorithm="ERM", test_envs=[2],
                          hparams={"batch_size": 32}, steps=101)
        result.accuracies[2]["in"]   # test-domain accuracy of the last checkpoint

    Args:
        dataset: a dataset name (see :func:`domaingrad.list_datasets`), ``folder:PATH``,
            a ``package.module:Class`` spec, or a registered or importable dataset class.
        algorithm: an algorithm name (see :func:`domaingrad.list_algorithms`), a spec,
            or a registered or importable :class:`~domaingrad.algorithms.Algorithm` class.
        test_envs: the held-out environment indices.
        hparams: hyperparameter overrides (name -> value), type-checked; the others
            are the defaults (``hparams_seed`` 0) or the random-search draw.
        steps: training steps (None: the dataset's, 5001).
        output_dir: the run directory; an existing unfinished run with the same
            arguments there is resumed. None: a temporary directory, deleted when the
            run ends (the records and the algorithm stay in the result; nothing else
            is kept).
        checkpoint_freq, hparams_seed, trial_seed, seed, data_dir, device: as the
            options of ``domaingrad train`` (DomainBed's ``train.py`` arguments).
        stream: where the run's lines go (default stdout); ``verbose=False`` silences
            them (``out.txt`` still gets them).
        options: any other :class:`~domaingrad.run.TrainArgs` field (``weights``,
            ``image_size``, ``split_protocol``, ``clean_eval``, ``progress``, ...).

    Raises:
        DomainGradError: bad arguments, data or output directory (see
            ``domaingrad train``), or a non-finite loss (``NonFiniteLossError``).
        TypeError: an unknown option, a dataset or algorithm that is neither a name nor a
            class, or a class without an importable name.
    """
    if hparams is not None and not isinstance(hparams, Mapping):
        raise TypeError(
            f"hparams is a dict of name -> value (JSON text is for the command line), got {type(hparams).__name__}"
        )
    known = {f.name for f in fields(TrainArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"train() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    if not verbose:
        stream = open(os.devnull, "w")
    options.setdefault("progress", False if not verbose else None)
    try:
        with tempfile.TemporaryDirectory(prefix="domaingrad-train-") as scratch:
            directory = Path(output_dir) if output_dir is not None else Path(scratch) / "run"
            args = TrainArgs(
                dataset=_name(dataset, DATASETS, "dataset"),
                algorithm=_name(algorithm, ALGORITHMS, "algorithm"),
                test_envs=[int(e) for e in test_envs],
                steps=steps,
                checkpoint_freq=checkpoint_freq,
                hparams=dict(hparams or {}),
                hparams_seed=hparams_seed,
                trial_seed=trial_seed,
                seed=seed,
                data_dir=None if data_dir is None else str(data_dir),
                output_dir=str(directory),
                device=device,
                **options,
            )
            outcome = run_training(args, stream)
    finally:
        if not verbose and stream is not None:
            stream.close()
    run = outcome.run
    return TrainResult(
        outcome.records,
        run.algorithm,
        run.hparams,
        run.dataset.environment_names,
        list(args.test_envs),
        None if output_dir is None else Path(output_dir),
    )
