"""One training run, DomainBed's ``train.py`` with exact resume.

Protocol (Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021;
DomainBed's ``scripts/train.py``): every environment is split into *out* (holdout) and
*in*; the algorithm trains on the in splits of the non-test environments, one minibatch
per training domain per step; every ``checkpoint_freq`` steps (and at the last step)
every environment's in and out split is evaluated and one record is appended to
``results.jsonl`` with DomainBed's keys. On image datasets with hparam
``data_augmentation`` the training environments are evaluated on augmented images, as
DomainBed does (``TrainArgs.clean_eval`` turns that off).

With ``uda_holdout_fraction`` > 0 each test environment's in split also gives up a
*uda* split (:func:`~domaingrad.data.base.split_uda`), evaluated as ``env{k}_uda_acc``;
under ``task="domain_adaptation"`` every step draws ``batch_size`` inputs from each uda
split (an endless stream, like the training one, seeded apart from it) and passes them,
without labels, as ``update(minibatches, unlabeled)`` (DomainBed's ``train.py``).

The arguments are in :mod:`.args` (checked once, by :func:`~.args.check_args`), what
the run prints in :mod:`.console`, its files in :mod:`.output`.
"""

from __future__ import annotations

import collections
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
import torch

from .. import precision
from ..algorithms import Algorithm
from ..data import (
    MultipleDomainDataset,
    Split,
    dataset_class,
    get_dataset,
    split_environment,
    split_environment_70_10_20,
)
from ..data.base import MinibatchStream, split_uda
from ..errors import DomainGradError, NonFiniteLossError
from ..layout import CHECKPOINT, DONE, MODEL, model_step_file
from ..registry import load_initial_weights
from ..rng import seed_hash
from .args import (
    DOMAIN_ADAPTATION,
    CheckedArgs,
    TrainArgs,
    check_args,
    comparable,
    has_test_parts,
    initial_weights,
    resolve_device,
)
from .console import RunConsole
from .evaluation import accuracy, auto_eval_batch_size
from .output import RESUME_AUTO_ARGS, RunDirectory, RunFinishedError, atomic_torch_save
from .provenance import run_provenance


class TrainingRun:
    """A prepared run: data, splits, algorithm and minibatch stream, ready to step.

    Build it with :meth:`prepare`; :func:`train` drives it. ``train_step`` is public so
    the benchmark can time exactly what the loop does per step.

    ``uda_splits`` are the non-empty uda splits of the test environments in index order
    (``env{k}_uda_acc`` is the k-th, DomainBed's key), ``uda_minibatches`` their endless
    unlabelled stream under ``task="domain_adaptation"`` (None otherwise).
    """

    def __init__(
        self,
        args: TrainArgs,
        hparams: dict[str, Any],
        dataset: MultipleDomainDataset,
        in_splits: list[Split],
        out_splits: list[Split],
        algorithm: Algorithm,
        minibatches: MinibatchStream,
        device: torch.device,
        test_splits: Sequence[Split] = (),
        uda_splits: Sequence[Split] = (),
        uda_minibatches: MinibatchStream | None = None,
    ):
        self.args = args
        self.hparams = hparams
        self.dataset = dataset
        self.in_splits = in_splits
        self.out_splits = out_splits
        #: the 20% test parts under the 70/10/20 protocol, else empty
        self.test_splits = list(test_splits)
        #: the test environments' non-empty uda splits (DomainBed's order and keys)
        self.uda_splits = list(uda_splits)
        self.uda_minibatches = uda_minibatches
        self.provenance = run_provenance(device)
        #: seconds spent in this process since the run (or its resumption) started
        self.started = time.perf_counter()
        #: wall-clock seconds of earlier sessions of this run (set when resuming)
        self.previous_wall_time = 0.0
        self.algorithm = algorithm
        self.minibatches = minibatches
        self.device = device
        self.steps = args.steps or dataset.N_STEPS
        self.checkpoint_freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
        self.steps_per_epoch = min(len(s) / hparams["batch_size"] for s in in_splits)
        self.train_envs = [i for i in range(len(dataset)) if i not in args.test_envs]
        #: whether the training environments are evaluated on augmented images (DomainBed)
        self.augment_eval = bool(dataset.AUGMENTS and hparams["data_augmentation"] and not args.clean_eval)
        self.checkpoint_vals: dict[str, list[float]] = collections.defaultdict(list)
        algorithm.total_steps = self.steps
        #: the batch size of every evaluation pass (``--eval-batch-size``, or auto's choice)
        self.eval_batch_size = args.eval_batch_size or auto_eval_batch_size(algorithm, device)
        self.channels_last = precision.use_channels_last(args.channels_last, device, dataset.input_shape)

    @classmethod
    def prepare(cls, args: TrainArgs | CheckedArgs) -> TrainingRun:
        """Build data and algorithm and seed everything; ``args`` are checked here unless
        they come checked (:func:`~.args.check_args`).

        The algorithm is built with random featurizers, then the run's initial weights
        (:func:`~.args.initial_weights`) are loaded into them
        (:func:`domaingrad.registry.load_initial_weights`).

        Raises:
            DomainGradError: for any bad argument, with the valid choices.
        """
        checked = args if isinstance(args, CheckedArgs) else check_args(args)
        args, hparams = checked.args, checked.hparams
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        dataset = get_dataset(
            args.dataset,
            args.data_dir,
            args.seed,
            image_size=args.image_size,
            num_workers=args.num_workers,
            class_map=args.class_map,
            corrupt_images=args.corrupt_images,
        )
        for test_env in args.test_envs:
            if not 0 <= test_env < len(dataset):
                raise DomainGradError(
                    f"test env {test_env} is out of range: {args.dataset} has {len(dataset)} environments, "
                    f"0..{len(dataset) - 1} ({', '.join(dataset.environment_names)})"
                )
        in_splits, out_splits, test_splits, uda_splits = [], [], [], []
        for i, env in enumerate(dataset.environments):
            if has_test_parts(args):
                in_split, out_split, test_split = split_environment_70_10_20(env, args.trial_seed, i)
                test_splits.append(test_split)
            else:
                out_split, in_split = split_environment(env, args.holdout_fraction, args.trial_seed, i)
            if i in args.test_envs and args.uda_holdout_fraction > 0:
                # DomainBed carves the uda split out of the in split, whatever the task
                uda_split, in_split = split_uda(in_split, args.uda_holdout_fraction, args.trial_seed, i)
                if len(uda_split):
                    uda_splits.append(uda_split)
            in_splits.append(in_split)
            out_splits.append(out_split)
        if args.task == DOMAIN_ADAPTATION and not uda_splits:
            raise DomainGradError(
                f"--task domain_adaptation: --uda-holdout-fraction {args.uda_holdout_fraction} leaves no "
                f"unlabelled sample in test environment(s) {' '.join(map(str, args.test_envs))} (DomainBed: "
                "'Not enough unlabeled samples for domain adaptation'); raise --uda-holdout-fraction"
            )
        device = resolve_device(args.device)
        try:
            algorithm = checked.algorithm_class(
                dataset.input_shape, dataset.num_classes, len(dataset) - len(args.test_envs), hparams
            )
        except ValueError as exc:  # e.g. torch rejecting a negative learning rate
            raise DomainGradError(f"cannot build {args.algorithm} with these hyperparameters: {exc}") from exc
        load_initial_weights(algorithm, initial_weights(args, dataset.input_shape, hparams))
        algorithm.to(device)
        if precision.use_channels_last(args.channels_last, device, dataset.input_shape):
            algorithm.to(memory_format=torch.channels_last)
        algorithm.grad_scaler = precision.grad_scaler(device, args.amp)
        train_splits = [s for i, s in enumerate(in_splits) if i not in args.test_envs]
        minibatches = dataset.minibatches(
            train_splits,
            hparams["batch_size"],
            seed_hash(args.seed, "minibatches"),
            hparams["class_balanced"],
            augment=hparams["data_augmentation"],
            pin_memory=device.type == "cuda",
        )
        uda_minibatches = None
        if args.task == DOMAIN_ADAPTATION:
            # test environments are never augmented (DomainBed builds them with the
            # evaluation transform); class_balanced weighs by the uda split's labels, as
            # DomainBed's make_weights_for_balanced_classes(uda) does
            uda_minibatches = dataset.minibatches(
                uda_splits,
                hparams["batch_size"],
                seed_hash(args.seed, "uda_minibatches"),
                hparams["class_balanced"],
                augment=False,
                pin_memory=device.type == "cuda",
            )
        return cls(
            args,
            hparams,
            dataset,
            in_splits,
            out_splits,
            algorithm,
            minibatches,
            device,
            test_splits,
            uda_splits,
            uda_minibatches,
        )

    def train_step(self) -> dict[str, float]:
        """One step: draw one minibatch per training domain (and, under domain
        adaptation, one unlabelled batch per uda split), ``update``, log its values.

        ``step_time`` (seconds, DomainBed's key) covers the draws, the transfer to the
        device and the update.
        """
        start = time.perf_counter()
        batch = [(self._to_device(x), y.to(self.device, non_blocking=True)) for x, y in next(self.minibatches)]
        unlabeled = None
        if self.uda_minibatches is not None:
            unlabeled = [self._to_device(x) for x, _ in next(self.uda_minibatches)]
        with precision.autocast(self.device, self.args.amp):
            values = self.algorithm.update(batch) if unlabeled is None else self.algorithm.update(batch, unlabeled)
        self.checkpoint_vals["step_time"].append(time.perf_counter() - start)
        for key, value in values.items():
            self.checkpoint_vals[key].append(value)
        return values

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return precision.to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)

    def evaluation_split(self, split: Split, prefix: str, env: int, step: int) -> Split:
        """The split as the checkpoint at ``step`` evaluates it: augmented when
        :attr:`augment_eval` is on and ``env`` is a training environment (seeded by
        ``seed_hash(seed, "evaluation", step, prefix, env)``), otherwise as is."""
        if self.augment_eval and env not in self.args.test_envs:
            return split.augmented(seed_hash(self.args.seed, "evaluation", step, prefix, env))
        return split

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """``env{i}_in_acc`` and ``env{i}_out_acc`` for every environment (and
        ``env{i}_test_acc`` under the 70/10/20 protocol, ``env{k}_uda_acc`` for the k-th
        uda split), at checkpoint ``step`` (which seeds the augmentation of the training
        environments, see :class:`TrainArgs`)."""
        with precision.autocast(self.device, self.args.amp):
            return self._evaluate(step)

    def _evaluate(self, step: int) -> dict[str, float]:
        accs = {}
        for prefix, splits in (("in", self.in_splits), ("out", self.out_splits), ("test", self.test_splits)):
            for i, split in enumerate(splits):
                # training environments' in/out splits go through predict_source with the
                # environment's training-domain index (model selection on the source
                # domains, e.g. DMG's own-domain mask); test environments and the
                # 70/10/20 test parts through predict
                domain = self.train_envs.index(i) if prefix != "test" and i in self.train_envs else None
                accs[f"env{i}_{prefix}_acc"] = accuracy(
                    self.algorithm,
                    self.evaluation_split(split, prefix, i, step),
                    self.eval_batch_size,
                    self.device,
                    domain=domain,
                )
        for k, split in enumerate(self.uda_splits):  # test environments: predict, never augmented
            accs[f"env{k}_uda_acc"] = accuracy(self.algorithm, split, self.eval_batch_size, self.device)
        return accs

    def make_record(self, step: int) -> dict[str, Any]:
        """The results.jsonl record of a checkpoint at ``step`` (DomainBed's keys)."""
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch}
        for key, values in self.checkpoint_vals.items():
            record[key] = float(np.mean(values))
        record.update(self.evaluate(step))
        record["mem_gb"] = torch.cuda.max_memory_allocated() / 1024**3 if self.device.type == "cuda" else 0.0
        record["hparams"] = self.hparams
        record["args"] = self.args.record()
        record["wall_time"] = self.previous_wall_time + time.perf_counter() - self.started
        record["provenance"] = self.provenance
        self.checkpoint_vals = collections.defaultdict(list)
        return record

    def resume_state(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": record["step"],
            "record": record,
            "args": self.args.record(),
            "hparams": self.hparams,
            "algorithm": self.algorithm.training_state(),
            "minibatches": self.minibatches.state_dict(),
            "uda_minibatches": None if self.uda_minibatches is None else self.uda_minibatches.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_resume_state(self, state: dict[str, Any]) -> int:
        """Restore a saved state; returns the first step still to run."""
        self.algorithm.load_training_state(state["algorithm"])
        self.minibatches.load_state_dict(state["minibatches"])
        if self.uda_minibatches is not None:
            self.uda_minibatches.load_state_dict(state["uda_minibatches"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.previous_wall_time = state["record"].get("wall_time", 0.0)
        self.started = time.perf_counter()
        return state["step"] + 1

    def model_file(self) -> dict[str, Any]:
        """DomainBed's ``model.pkl`` content."""
        return {
            "args": self.args.record(),
            "model_input_shape": self.dataset.input_shape,
            "model_num_classes": self.dataset.num_classes,
            "model_num_domains": len(self.dataset) - len(self.args.test_envs),
            "model_hparams": self.hparams,
            "model_dict": self.algorithm.state_dict(),
        }


@dataclass
class RunOutcome:
    """What :func:`run_training` leaves: the run (its algorithm trained) and every record
    of ``results.jsonl``, also those of earlier sessions of a resumed run."""

    run: TrainingRun
    records: list[dict[str, Any]]


def _resume_defaults(args: TrainArgs) -> dict[str, Any]:
    """The value of each argument in a saved run that predates it."""
    defaults = TrainArgs().record()
    if getattr(dataset_class(args.dataset), "AUGMENTS", False):
        # a run checkpointed before clean_eval existed evaluated on clean images: it resumes
        # only as such (with --clean-eval), never switching evaluation half-way
        defaults["clean_eval"] = True
    return defaults


def run_training(args: TrainArgs, stream: IO[str] | None = None) -> RunOutcome:
    """Run (or resume) one training run in ``args.output_dir``.

    Writes ``results.jsonl``, ``out.txt``, ``checkpoint.pt`` while running, then
    ``model.pkl`` and ``done`` (see :mod:`domaingrad.layout`). A run killed at any moment
    and started again with the same arguments continues from its last checkpoint and
    ends with the same records and weights (and ``model_step{N}.pkl`` files) as an
    uninterrupted run. The run holds the directory's lock while it runs: a second process
    on the same directory is refused. Lines go to ``stream`` (default stdout) and
    ``out.txt``.

    Raises:
        RunFinishedError: the directory holds this run, finished (:func:`train` reports
            it and returns its last record).
        DomainGradError: bad arguments; an empty, unwritable or in-use output directory;
            or one holding a finished run or a run with other arguments. All before any
            training step.
        NonFiniteLossError: an update returned a NaN or infinite value; the last good
            checkpoint and its records are kept and no ``done`` is written.
    """
    checked = check_args(args)
    out = RunDirectory(args.output_dir)
    defaults = _resume_defaults(args)
    if out.is_done:  # a finished run is only read (and cleaned of what a kill left)
        out.check_startable(args.record(), defaults=defaults, normalize=comparable)
    out.check_writable()
    with out.locked():
        with out.writing():
            out.remove_stale_files()
        saved = out.check_startable(args.record(), defaults=defaults, normalize=comparable)
        if saved is not None:  # "auto" arguments resume with the value the run started with
            kept = {k: saved["args"][k] for k in RESUME_AUTO_ARGS if getattr(args, k) is None and k in saved["args"]}
            checked = replace(checked, args=replace(args, **kept))
        return _run_locked(checked, out, saved, stream)


def _run_locked(
    checked: CheckedArgs, out: RunDirectory, saved: dict[str, Any] | None, stream: IO[str] | None
) -> RunOutcome:
    """The run of :func:`run_training` in its locked directory, from ``saved`` (a resume
    state) or from scratch."""
    with precision.backend_settings(resolve_device(checked.args.device), checked.args.deterministic):
        return _run_prepared(checked, out, saved, stream)


def _run_prepared(
    checked: CheckedArgs, out: RunDirectory, saved: dict[str, Any] | None, stream: IO[str] | None
) -> RunOutcome:
    args = checked.args
    run = TrainingRun.prepare(checked)
    console = RunConsole(stream, out.log, args.progress)

    start_step, records = 0, []
    with out.writing():  # the first writes: a clear error, not a traceback, if they fail
        if saved is not None:
            start_step = run.load_resume_state(saved)
            records = out.reconcile_results(saved)
        console.header(run, None if saved is None else saved["step"])
    last_checkpoint = saved["step"] if saved is not None else None
    console.start_bar(run.steps, start_step)
    try:
        for step in range(start_step, run.steps):
            values = run.train_step()
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                console.say(f"non-finite value at step {step}: {bad}")
                raise NonFiniteLossError(step, bad, last_checkpoint)
            console.step_done()
            if step % run.checkpoint_freq == 0 or step == run.steps - 1:
                record = run.make_record(step)
                if args.save_model_every_checkpoint:
                    # before the resume state: a kill after this write repeats the step and
                    # rewrites the same file, a kill before it resumes from the previous one
                    atomic_torch_save(run.model_file(), out.file(model_step_file(step)))
                out.save_checkpoint(run.resume_state(record))
                out.append_record(record)
                last_checkpoint = step
                records.append(record)
                console.checkpoint(run, record)
    finally:
        console.close_bar()
        for batches in (run.minibatches, run.uda_minibatches):
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stop DataLoader workers

    if not args.skip_model_save:
        atomic_torch_save(run.model_file(), out.file(MODEL))
    out.file(DONE).write_text("done")
    out.file(CHECKPOINT).unlink(missing_ok=True)  # a kill before this: the next start removes it
    console.final(run, records[-1])
    return RunOutcome(run, records)


def train(args: TrainArgs, stream: IO[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run and return its last results record (see
    :func:`run_training`, which also returns the trained algorithm and every record).

    On a directory that holds this very run, finished, nothing is trained: a line says
    so and where its results are, and its last record is returned (so a script may
    rerun the same command until it succeeds).

    Raises:
        DomainGradError: bad arguments or output directory (see :func:`run_training`).
        NonFiniteLossError: an update returned a NaN or infinite value.
    """
    try:
        return run_training(args, stream).records[-1]
    except RunFinishedError as finished:
        print(f"domaingrad: {finished}", file=stream or sys.stdout)
        return finished.records[-1]
