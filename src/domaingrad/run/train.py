"""One training run, DomainBed's ``train.py`` with exact resume.

Protocol (Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021;
DomainBed's ``scripts/train.py``): every environment is split into *out* (holdout) and
*in*; the algorithm trains on the in splits of the non-test environments, one minibatch
per training domain per step; every ``checkpoint_freq`` steps (and at the last step)
every environment's in and out split is evaluated and one record is appended to
``results.jsonl`` with DomainBed's keys. On image datasets with hparam
``data_augmentation`` the training environments are evaluated on augmented images, as
DomainBed does (``TrainArgs.clean_eval`` turns that off).
"""
from __future__ import annotations

import collections
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, models
from ..algorithms import Algorithm, algorithm_class
from ..data import (SPLIT_PROTOCOLS, MultipleDomainDataset, Split, dataset_class, get_dataset, split_environment,
                    split_environment_70_10_20)
from ..data.folders import CORRUPT_POLICIES
from ..errors import DomainGradError, NonFiniteLossError
from ..hparams import parse_hparams_json, resolve_hparams
from ..rng import seed_hash
from .evaluation import accuracy
from .output import CHECKPOINT, DONE, MODEL, RunDirectory, atomic_torch_save
from .provenance import run_provenance


@dataclass
class TrainArgs:
    """Arguments of one run; field names and meaning are DomainBed's ``train.py`` args.

    ``steps`` and ``checkpoint_freq`` of None mean the dataset's defaults (5001 and 100
    for the MNIST datasets, 5001 and 300 for image folders). ``hparams`` is the JSON
    text of ``--hparams``.

    Image datasets (not DomainBed arguments): ``weights`` is the featurizer's initial
    weights, ``none``, ``imagenet`` (torchvision's cache) or a state-dict path; None
    means DomainBed's choice, ``imagenet`` for the torchvision backbones (ResNet,
    AlexNet) and ``none`` for MNIST_CNN (see :mod:`domaingrad.models.weights`).
    ``image_size`` is the side of the square network input (DomainBed: 224);
    ``num_workers`` the DataLoader worker processes (None: DomainBed's 8, at most the
    CPU count); ``class_map`` a class-name mapping file; ``corrupt_images`` ``error`` or
    ``skip`` (see :mod:`domaingrad.data.folders`).

    ``split_protocol`` (not a DomainBed argument): ``domainbed`` (in/out by
    ``holdout_fraction``) or ``70/10/20``, the per-domain train/validation/test parts of
    Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient
    Surgery", ICCV 2021 (Section 4.1), recorded as ``env{i}_in_acc`` /
    ``env{i}_out_acc`` / ``env{i}_test_acc`` (``holdout_fraction`` is then unused).

    ``clean_eval`` (not a DomainBed argument): on image datasets with hparam
    ``data_augmentation`` true, DomainBed builds every non-test environment with the
    augmenting transform and evaluates those same datasets, so the training
    environments' in and out splits (and, under ``70/10/20``, their test parts) are
    scored on augmented images, freshly drawn at every checkpoint; test environments
    never are. That is the default (False), as in the published DomainBed tables.
    True scores every split on clean images; training-domain validation can then
    select other checkpoints. The draws of checkpoint ``step`` for split ``s``
    (``in``/``out``/``test``) of environment i come from ``seed_hash(seed,
    "evaluation", step, s, i)``, so resumed runs repeat them. In-memory datasets
    (the MNIST family, Debug28) are never augmented, as in DomainBed.
    """

    dataset: str = "ColoredMNIST"
    algorithm: str = "ERM"
    test_envs: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    checkpoint_freq: int | None = None
    hparams: str | None = None
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int = 0
    data_dir: str | None = None
    output_dir: str = "train_output"
    holdout_fraction: float = 0.2
    uda_holdout_fraction: float = 0.0
    task: str = "domain_generalization"
    skip_model_save: bool = False
    save_model_every_checkpoint: bool = False
    eval_batch_size: int = 512
    device: str = "auto"
    progress: bool | None = None
    weights: str | None = None
    image_size: int = 224
    num_workers: int | None = None
    class_map: str | None = None
    corrupt_images: str = "error"
    split_protocol: str = "domainbed"
    clean_eval: bool = False


class TrainingRun:
    """A prepared run: data, splits, algorithm and minibatch stream, ready to step.

    Build it with :meth:`prepare`; :func:`train` drives it. ``train_step`` is public so
    the benchmark can time exactly what the loop does per step.
    """

    def __init__(self, args: TrainArgs, hparams: dict[str, Any], dataset: MultipleDomainDataset,
                 in_splits: list[Split], out_splits: list[Split], algorithm: Algorithm,
                 minibatches: Iterator[list[tuple[torch.Tensor, torch.Tensor]]], device: torch.device,
                 test_splits: Sequence[Split] = ()):
        self.args = args
        self.hparams = hparams
        self.dataset = dataset
        self.in_splits = in_splits
        self.out_splits = out_splits
        #: the 20% test parts under the 70/10/20 protocol, else empty
        self.test_splits = list(test_splits)
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

    @classmethod
    def prepare(cls, args: TrainArgs) -> "TrainingRun":
        """Validate the arguments, build data and algorithm, and seed everything.

        Raises:
            DomainGradError: for any bad argument, with the valid choices.
        """
        validate_args(args)
        hparams = resolve_hparams(args.algorithm, args.dataset, args.hparams_seed, args.trial_seed,
                                  parse_hparams_json(args.hparams))
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        dataset = get_dataset(args.dataset, args.data_dir, args.seed, image_size=args.image_size,
                              num_workers=args.num_workers, class_map=args.class_map,
                              corrupt_images=args.corrupt_images)
        for env in args.test_envs:
            if not 0 <= env < len(dataset):
                raise DomainGradError(
                    f"test env {env} is out of range: {args.dataset} has {len(dataset)} environments, "
                    f"0..{len(dataset) - 1} ({', '.join(dataset.environment_names)})")
        in_splits, out_splits, test_splits = [], [], []
        for i, env in enumerate(dataset.environments):
            if args.split_protocol == "70/10/20":
                in_split, out_split, test_split = split_environment_70_10_20(env, args.trial_seed, i)
                test_splits.append(test_split)
            else:
                out_split, in_split = split_environment(env, args.holdout_fraction, args.trial_seed, i)
            in_splits.append(in_split)
            out_splits.append(out_split)
        device = resolve_device(args.device)
        try:
            with models.use_weights(initial_weights(args, dataset.input_shape, hparams)):
                algorithm = algorithm_class(args.algorithm)(
                    dataset.input_shape, dataset.num_classes, len(dataset) - len(args.test_envs), hparams)
        except ValueError as exc:  # e.g. torch rejecting a negative learning rate
            raise DomainGradError(f"cannot build {args.algorithm} with these hyperparameters: {exc}") from exc
        algorithm.to(device)
        train_splits = [s for i, s in enumerate(in_splits) if i not in args.test_envs]
        minibatches = dataset.minibatches(train_splits, hparams["batch_size"], seed_hash(args.seed, "minibatches"),
                                          hparams["class_balanced"], augment=hparams["data_augmentation"],
                                          pin_memory=device.type == "cuda")
        return cls(args, hparams, dataset, in_splits, out_splits, algorithm, minibatches, device, test_splits)

    def train_step(self) -> dict[str, float]:
        """One step: draw one minibatch per training domain, ``update``, log its values.

        ``step_time`` (seconds, DomainBed's key) covers the draw, the transfer to the
        device and the update.
        """
        start = time.perf_counter()
        batch = [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                 for x, y in next(self.minibatches)]
        values = self.algorithm.update(batch)
        self.checkpoint_vals["step_time"].append(time.perf_counter() - start)
        for key, value in values.items():
            self.checkpoint_vals[key].append(value)
        return values

    def evaluation_split(self, split: Split, prefix: str, env: int, step: int) -> Split:
        """The split as the checkpoint at ``step`` evaluates it: augmented when
        :attr:`augment_eval` is on and ``env`` is a training environment (seeded by
        ``seed_hash(seed, "evaluation", step, prefix, env)``), otherwise as is."""
        if self.augment_eval and env not in self.args.test_envs:
            return split.augmented(seed_hash(self.args.seed, "evaluation", step, prefix, env))
        return split

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """``env{i}_in_acc`` and ``env{i}_out_acc`` for every environment (and
        ``env{i}_test_acc`` under the 70/10/20 protocol), at checkpoint ``step`` (which
        seeds the augmentation of the training environments, see :class:`TrainArgs`)."""
        accs = {}
        for prefix, splits in (("in", self.in_splits), ("out", self.out_splits), ("test", self.test_splits)):
            for i, split in enumerate(splits):
                # training environments' in/out splits go through predict_source with the
                # environment's training-domain index (model selection on the source
                # domains, e.g. DMG's own-domain mask); test environments and the
                # 70/10/20 test parts through predict
                domain = self.train_envs.index(i) if prefix != "test" and i in self.train_envs else None
                accs[f"env{i}_{prefix}_acc"] = accuracy(self.algorithm, self.evaluation_split(split, prefix, i, step),
                                                        self.args.eval_batch_size, self.device, domain=domain)
        return accs

    def make_record(self, step: int) -> dict[str, Any]:
        """The results.jsonl record of a checkpoint at ``step`` (DomainBed's keys)."""
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch}
        for key, values in self.checkpoint_vals.items():
            record[key] = float(np.mean(values))
        record.update(self.evaluate(step))
        record["mem_gb"] = (torch.cuda.max_memory_allocated() / 1024 ** 3
                            if self.device.type == "cuda" else 0.0)
        record["hparams"] = self.hparams
        record["args"] = asdict(self.args)
        record["wall_time"] = self.previous_wall_time + time.perf_counter() - self.started
        record["provenance"] = self.provenance
        self.checkpoint_vals = collections.defaultdict(list)
        return record

    def resume_state(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": record["step"], "record": record, "args": asdict(self.args), "hparams": self.hparams,
            "algorithm": self.algorithm.training_state(), "minibatches": self.minibatches.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_resume_state(self, state: dict[str, Any]) -> int:
        """Restore a saved state; returns the first step still to run."""
        self.algorithm.load_training_state(state["algorithm"])
        self.minibatches.load_state_dict(state["minibatches"])
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
        return {"args": asdict(self.args), "model_input_shape": self.dataset.input_shape,
                "model_num_classes": self.dataset.num_classes,
                "model_num_domains": len(self.dataset) - len(self.args.test_envs),
                "model_hparams": self.hparams, "model_dict": self.algorithm.state_dict()}


def initial_weights(args: TrainArgs, input_shape: tuple[int, ...], hparams: dict[str, Any]) -> str:
    """The weights spec of the run: ``args.weights``, or when None DomainBed's choice:
    ``imagenet`` for the torchvision backbones, ``none`` for MNIST_CNN."""
    if args.weights is not None:
        return args.weights
    return "none" if models.backbone_name(input_shape, hparams) == "mnist_cnn" else "imagenet"


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU.

    Raises:
        DomainGradError: for CUDA requested on a machine without it, or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DomainGradError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DomainGradError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device


def validate_args(args: TrainArgs) -> None:
    """Cheap checks made before any data is loaded.

    Raises:
        DomainGradError: naming the bad argument and what is expected.
    """
    dataset_class(args.dataset)
    algorithm_class(args.algorithm)
    if not args.test_envs:
        raise DomainGradError("--test-envs needs at least one environment index")
    if len(set(args.test_envs)) != len(args.test_envs):
        raise DomainGradError(f"--test-envs lists an environment twice: {args.test_envs}")
    for name in ("steps", "checkpoint_freq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DomainGradError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.eval_batch_size < 1:
        raise DomainGradError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
    if args.image_size < 1:
        raise DomainGradError(f"--image-size must be a positive integer, got {args.image_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise DomainGradError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.split_protocol not in SPLIT_PROTOCOLS:
        raise DomainGradError(f"--split-protocol must be one of {', '.join(SPLIT_PROTOCOLS)}, "
                              f"got {args.split_protocol!r}")
    if args.corrupt_images not in CORRUPT_POLICIES:
        raise DomainGradError(f"--corrupt-images must be one of {', '.join(CORRUPT_POLICIES)}, "
                              f"got {args.corrupt_images!r}")


def _fmt(value: float) -> str:
    return "  nan" if math.isnan(value) else f"{value:.3f}"


def results_table(run: TrainingRun, record: dict[str, Any]) -> str:
    """Per-environment accuracy table of one record, as printed at the end of a run."""
    names = run.dataset.environment_names
    width = max(4, *(len(n) for n in names))
    has_test = run.args.split_protocol == "70/10/20"
    lines = [f"{'env':>3}  {'name':<{width}}  {'role':<5}  {'in_acc':>6}  {'out_acc':>7}"
             + (f"  {'test_acc':>8}" if has_test else "")]
    for i, name in enumerate(names):
        role = "test" if i in run.args.test_envs else "train"
        lines.append(f"{i:>3}  {name:<{width}}  {role:<5}  {_fmt(record[f'env{i}_in_acc']):>6}  "
                     f"{_fmt(record[f'env{i}_out_acc']):>7}"
                     + (f"  {_fmt(record[f'env{i}_test_acc']):>8}" if has_test else ""))
    return "\n".join(lines)


def _checkpoint_line(run: TrainingRun, record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>5}", f"epoch {record['epoch']:.2f}"]
    parts += [f"{k} {record[k]:.4f}" for k in sorted(record)
              if k not in ("step", "epoch", "hparams", "args", "mem_gb", "wall_time") and not k.startswith("env")
              and isinstance(record[k], float)]
    parts += [f"env{i} {record[f'env{i}_in_acc']:.3f}/{record[f'env{i}_out_acc']:.3f}"
              for i in range(len(run.dataset))]
    return " | ".join(parts)


def _summary(run: TrainingRun, record: dict[str, Any]) -> dict[str, float]:
    """Mean training-domain validation (out) accuracy and mean test-domain in accuracy."""
    train = float(np.mean([record[f"env{i}_out_acc"] for i in run.train_envs]))
    test = float(np.mean([record[f"env{i}_in_acc"] for i in run.args.test_envs]))
    return {"train": train, "test": test}


def train(args: TrainArgs, stream=None) -> dict[str, Any]:
    """Run (or resume) one training run and return its last results record.

    Writes ``results.jsonl``, ``out.txt``, ``checkpoint.pt`` while running, then
    ``model.pkl`` and ``done`` (see :mod:`domaingrad.run.output`). A run killed at any
    moment and started again with the same arguments continues from its last checkpoint
    and ends with the same records and weights as an uninterrupted run.

    Raises:
        DomainGradError: bad arguments, or an output directory holding a finished run or
            a run with other arguments.
        NonFiniteLossError: an update returned a NaN or infinite value; the last good
            checkpoint and its records are kept and no ``done`` is written.
    """
    stream = stream or sys.stdout
    out = RunDirectory(args.output_dir)
    validate_args(args)
    defaults = asdict(TrainArgs())
    if getattr(dataset_class(args.dataset), "AUGMENTS", False):
        # a run checkpointed before clean_eval existed evaluated on clean images: it resumes
        # only as such (with --clean-eval), never switching evaluation half-way
        defaults["clean_eval"] = True
    saved = out.check_startable(asdict(args), defaults=defaults)
    run = TrainingRun.prepare(args)
    out.path.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        tqdm.write(line, file=stream)
        out.log(line)

    start_step, last_record = 0, None
    if saved is not None:
        start_step = run.load_resume_state(saved)
        last_record = out.reconcile_results(saved)[-1]
        say(f"resuming from the checkpoint at step {saved['step']}")
    say(f"domaingrad {__version__} | {args.algorithm} on {args.dataset} | test envs {args.test_envs} | "
        f"{run.steps} steps on {run.device}")
    say(f"data: {run.dataset.source}")
    for line in run.dataset.report:
        say(f"data: {line}")
    say(f"hparams: {run.hparams}")
    if run.dataset.AUGMENTS:
        say("evaluation: training environments on augmented images (DomainBed's; --clean-eval for clean ones), "
            "test environments on clean images" if run.augment_eval else "evaluation: every split on clean images")
    say(f"featurizer: {models.backbone_name(run.dataset.input_shape, run.hparams)}, initial weights: "
        f"{initial_weights(args, run.dataset.input_shape, run.hparams)}")

    last_checkpoint = saved["step"] if saved is not None else None
    reported_failures = 0
    bar = tqdm(total=run.steps, initial=start_step, disable=None if args.progress is None else not args.progress,
               file=sys.stderr, dynamic_ncols=True, unit="step")
    try:
        for step in range(start_step, run.steps):
            values = run.train_step()
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                say(f"non-finite value at step {step}: {bad}")
                raise NonFiniteLossError(step, bad, last_checkpoint)
            bar.update(1)
            if step % run.checkpoint_freq == 0 or step == run.steps - 1:
                record = run.make_record(step)
                out.save_checkpoint(run.resume_state(record))
                out.append_record(record)
                if args.save_model_every_checkpoint:
                    atomic_torch_save(run.model_file(), out.file(f"model_step{step}.pkl"))
                last_checkpoint, last_record = step, record
                summary = _summary(run, record)
                bar.set_postfix_str(f"train-domain acc {summary['train']:.3f} | test-domain acc "
                                    f"{summary['test']:.3f}")
                say(_checkpoint_line(run, record))
                failures = getattr(run.dataset, "load_failures", [])
                if len(failures) > reported_failures:
                    say(f"data: skipped {len(failures) - reported_failures} image(s) that failed to decode "
                        f"while loading: {', '.join(failures[reported_failures:])}")
                    reported_failures = len(failures)
    finally:
        bar.close()
        close = getattr(run.minibatches, "close", None)
        if close is not None:
            close()  # stop DataLoader workers

    assert last_record is not None
    if not args.skip_model_save:
        atomic_torch_save(run.model_file(), out.file(MODEL))
    out.file(DONE).write_text("done")
    out.file(CHECKPOINT).unlink(missing_ok=True)
    say("per-environment accuracy at the last step:\n" + results_table(run, last_record))
    return last_record
