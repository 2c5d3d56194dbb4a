"""What every analysis shares: its output files, the run it measures, batches, figures.

Outputs
    An analysis named ``NAME`` writes ``NAME.json`` (everything it measured, with the
    arguments), ``NAME.csv`` (one row per measurement, long format) and ``NAME.png`` into
    ``--output-dir``. Existing files are never overwritten: :class:`Outputs` refuses
    before any work starts unless ``--force`` is given.

Sources
    An analysis measures either a run it trains itself (:func:`add_training_arguments`,
    :func:`training_args`, then :func:`prepare_run` and ``run.train_step()``), or a
    finished run of ``domaingrad train`` (:func:`load_run`: its ``model.pkl`` or a
    ``model_step{N}.pkl`` of ``--save-model-every-checkpoint``), rebuilt from the saved
    arguments with the same data, splits and algorithm.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data import Split
from ..errors import DomainGradError
from ..hparams import parse_hparams_json
from ..layout import MODEL, RESULTS
from ..run import TrainArgs, TrainingRun
from ..run.output import atomic_write_bytes, read_records

# -- outputs ------------------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output-dir`` (required) and ``--force``."""
    parser.add_argument("--output-dir", required=True, help="directory for NAME.json, NAME.csv and NAME.png")
    parser.add_argument("--force", action="store_true", help="overwrite this analysis's files if they exist")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Outputs:
    """The three files of one analysis in ``directory``; checks before work starts.

    Raises:
        DomainGradError: (at construction) a file exists and ``force`` is false, or the
            directory cannot be created.
    """

    def __init__(self, directory: str | os.PathLike, name: str, force: bool = False):
        self.directory = Path(directory)
        self.name = name
        if str(directory) == "":
            raise DomainGradError("--output-dir is empty; give the directory for the analysis's files")
        existing = [p for p in self.paths if p.exists()]
        if existing and not force:
            raise DomainGradError(
                f"{', '.join(map(str, existing))} exist(s); choose another --output-dir or pass --force to overwrite"
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DomainGradError(f"cannot create --output-dir {self.directory}: {exc.strerror or exc}") from exc

    @property
    def paths(self) -> list[Path]:
        """``NAME.json``, ``NAME.csv``, ``NAME.png``."""
        return [self.directory / f"{self.name}.{ext}" for ext in ("json", "csv", "png")]

    def write(self, summary: dict[str, Any], rows: Sequence[dict[str, Any]], figure: Figure | None) -> list[Path]:
        """Write the JSON summary, the CSV rows (columns: union of the rows' keys, first-seen
        order) and the figure; returns the paths written."""
        json_path, csv_path, png_path = self.paths
        text = json.dumps(_finite(summary), indent=2, sort_keys=True, default=_json_default) + "\n"
        atomic_write_bytes(json_path, text.encode())
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(csv_path, buffer.getvalue().encode())
        written = [json_path, csv_path]
        if figure is not None:
            save_figure(figure, png_path)
            written.append(png_path)
        return written


def save_figure(figure: Figure, path: Path) -> None:
    """Draw ``figure`` on the Agg canvas (no display, pyplot untouched) into ``path``, atomically."""
    tmp = path.with_name(path.name + ".tmp.png")
    FigureCanvasAgg(figure).print_png(str(tmp))
    tmp.replace(path)


def new_figure(panels: int, width: float = 4.0, height: float = 3.2, columns: int | None = None) -> tuple[Figure, list]:
    """A figure with ``panels`` axes on a grid (``columns`` per row, default all in one row)."""
    columns = columns or panels
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]
    return figure, axes


# -- the run measured ---------------------------------------------------------------------


def add_training_arguments(
    parser: argparse.ArgumentParser,
    algorithm: str | None = "ERM",
    dataset: str = "ColoredMNIST",
    steps: int = 300,
) -> None:
    """The options of a run an analysis trains itself (``domaingrad train``'s names):
    ``--dataset``, ``--algorithm`` (unless ``algorithm`` is None), ``--test-envs``,
    ``--hparams``, ``--steps``, ``--seed``, ``--data-dir``, ``--device``."""
    parser.add_argument("--dataset", default=dataset, help=f"dataset name or folder:PATH (default {dataset})")
    if algorithm is not None:
        parser.add_argument("--algorithm", default=algorithm, help=f"algorithm name (default {algorithm})")
    parser.add_argument("--test-envs", type=int, nargs="+", default=[0], help="held-out environments (default 0)")
    parser.add_argument("--hparams", default=None, help="JSON object of hyperparameter overrides")
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--data-dir", default=None, help="data root (default: the embedded digits)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def training_args(ns: argparse.Namespace, **overrides: Any) -> TrainArgs:
    """The :class:`~domaingrad.run.TrainArgs` of the options of :func:`add_training_arguments`
    (``overrides`` win), with the analysis's own output directory as the run's."""
    values: dict[str, Any] = {
        "dataset": ns.dataset,
        "algorithm": getattr(ns, "algorithm", "ERM"),
        "test_envs": list(ns.test_envs),
        "hparams": parse_hparams_json(ns.hparams) if ns.hparams else None,
        "steps": ns.steps,
        "seed": ns.seed,
        "data_dir": ns.data_dir,
        "device": ns.device,
        "output_dir": str(Path(getattr(ns, "output_dir", ".")) / "run"),
        "progress": False,
    }
    values.update(overrides)
    return TrainArgs(**values)


def prepare_run(args: TrainArgs) -> TrainingRun:
    """The prepared run of ``args`` (data, splits, seeded algorithm), not trained; nothing
    is written. Step it with ``run.train_step()``.

    Raises:
        DomainGradError: for any bad argument (see :func:`domaingrad.run.check_args`).
    """
    return TrainingRun.prepare(args)


@dataclass
class LoadedRun:
    """A finished run rebuilt: ``run.algorithm`` holds the saved weights (eval mode).

    Attributes:
        run: the prepared run (data, splits, algorithm) of the saved arguments.
        path: the model file read.
        step: the checkpoint step of a ``model_step{N}.pkl``, None for ``model.pkl``.
        records: the run's results.jsonl records when the directory has them, else [].
    """

    run: TrainingRun
    path: Path
    step: int | None
    records: list[dict[str, Any]]


def model_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``model_step{N}.pkl`` files of a run (``--save-model-every-checkpoint``) as
    (N, path), by step."""
    found = []
    for path in Path(run_dir).glob("model_step*.pkl"):
        digits = path.stem[len("model_step") :]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def load_run(path: str | os.PathLike, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished run from its directory (``model.pkl``) or a model file.

    Raises:
        DomainGradError: no model file, an unreadable one, or saved arguments this
            version cannot rebuild (e.g. a dataset whose files moved).
    """
    path = Path(path)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        raise DomainGradError(
            f"{path}: no {MODEL}; expected a finished run of `domaingrad train` (without --skip-model-save) "
            "or the path of a model_step{N}.pkl file"
        )
    try:
        saved = torch.load(file, map_location="cpu", weights_only=False)
        args = TrainArgs.from_dict({**saved["args"], "device": device, "progress": False})
    except DomainGradError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DomainGradError(f"cannot read {file} as a domaingrad model file ({exc})") from exc
    run = TrainingRun.prepare(args)
    run.algorithm.load_state_dict(saved["model_dict"])
    run.algorithm.eval()
    digits = file.stem[len("model_step") :] if file.stem.startswith("model_step") else ""
    records: list[dict[str, Any]] = []
    if (file.parent / RESULTS).is_file():
        records = read_records(file.parent / RESULTS)[0]
    return LoadedRun(run, file, int(digits) if digits.isdigit() else None, records)


def run_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's results.jsonl (lines cut by a kill skipped).

    Raises:
        DomainGradError: the directory has no results.jsonl.
    """
    file = Path(run_dir) / RESULTS
    if not file.is_file():
        raise DomainGradError(f"{run_dir}: no {RESULTS}; expected the directory of a `domaingrad train` run")
    return read_records(file)[0]


# -- batches ------------------------------------------------------------------------------


def sample_batch(
    split: Split, size: int, generator: torch.Generator, label: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``size`` samples of ``split`` drawn without replacement (all of them if fewer),
    only of class ``label`` when given; None when the split has no such sample.

    Returns:
        ``(x, y)`` with x of shape (n, *input_shape) and y int64 of shape (n,), n <= size.
    """
    indices = split.indices
    if label is not None:
        indices = indices[split.y == label]
    if len(indices) == 0:
        return None
    chosen = indices[torch.randperm(len(indices), generator=generator)[:size]]
    return next(iter(split.env.batches(chosen, len(chosen))))


def flatten_grads(grads: Iterable[torch.Tensor], leading: int = 1) -> torch.Tensor:
    """Concatenate gradient tensors along their parameter dims: each of shape
    (*lead, *param_shape) with ``leading`` lead dims -> (*lead, total parameters)."""
    grads = list(grads)
    lead = grads[0].shape[:leading]
    return torch.cat([g.reshape(*lead, -1) for g in grads], dim=-1)


__all__ = [
    "LoadedRun",
    "Outputs",
    "add_output_arguments",
    "add_training_arguments",
    "flatten_grads",
    "load_run",
    "model_files",
    "new_figure",
    "prepare_run",
    "run_records",
    "sample_batch",
    "save_figure",
    "training_args",
]
