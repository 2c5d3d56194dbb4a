"""The arguments of one training run: :class:`TrainArgs`, checked once by :func:`check_args`.

Field names and meaning are DomainBed's ``scripts/train.py`` arguments (Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021) plus domaingrad's own.
In Python ``hparams`` is a dict; on disk (records, ``model.pkl``, a sweep's job
arguments) it is JSON text, as DomainBed writes ``args.hparams``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from .. import models, precision
from ..algorithms import ALGORITHMS, Algorithm, algorithm_class, resolve_algorithm_name
from ..data import ImageFolderDataset, dataset_class, resolve_dataset_name
from ..data.folders import CORRUPT_POLICIES
from ..errors import DomainGradError
from ..hparams import parse_hparams_json
from ..layout import SPLIT_70_10_20, SPLIT_DOMAINBED, SPLIT_PROTOCOLS
from ..registry import resolve_hparams

#: DomainBed's ``--task`` values
TASKS = ("domain_generalization", "domain_adaptation")
DOMAIN_GENERALIZATION, DOMAIN_ADAPTATION = TASKS


@dataclass
class TrainArgs:
    """Arguments of one run; field names and meaning are DomainBed's ``train.py`` args.

    ``steps`` and ``checkpoint_freq`` of None mean the dataset's defaults (5001 and 100
    for the MNIST datasets, 5001 and 300 for image folders). ``hparams`` is a dict of
    hyperparameter overrides (the command line parses ``--hparams`` JSON into it); JSON
    text is accepted too (DomainBed's form, e.g. from an older sweep's job arguments).

    ``dataset`` and ``algorithm`` are registered names, ``folder:PATH`` (datasets) or
    ``package.module:Class`` specs of the user's own classes (see
    :mod:`domaingrad.plugins`).

    Image datasets (not DomainBed arguments): ``weights`` is the featurizer's initial
    weights, ``none``, ``imagenet`` (torchvision's cache) or a state-dict path; None
    means DomainBed's choice, ``imagenet`` for the torchvision backbones (ResNet,
    AlexNet) and ``none`` for MNIST_CNN (see :mod:`domaingrad.models.weights`).
    ``image_size`` is the side of the square network input (DomainBed: 224);
    ``num_workers`` the DataLoader worker processes (None: DomainBed's 8, at most the
    CPU count); ``class_map`` a class-name mapping file; ``corrupt_images`` ``error`` or
    ``skip`` (see :mod:`domaingrad.data.folders`).

    ``split_protocol`` (not a DomainBed argument): one of
    :data:`domaingrad.layout.SPLIT_PROTOCOLS`: ``domainbed`` (in/out by
    ``holdout_fraction``) or the per-domain train/validation/test parts of Mansilla,
    Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021
    (Section 4.1; :data:`domaingrad.layout.SPLIT_70_10_20`), recorded as
    ``env{i}_in_acc`` / ``env{i}_out_acc`` / ``env{i}_test_acc`` (``holdout_fraction`` is
    then unused).

    ``task`` and ``uda_holdout_fraction`` are DomainBed's. ``uda_holdout_fraction`` in
    [0, 1) is the share of each test environment's in split set aside as its *uda*
    split (:func:`domaingrad.data.base.split_uda`), whatever the task, as DomainBed
    does (so domain-generalization and domain-adaptation runs of the same trial seed
    see the same splits); each non-empty uda split is evaluated as ``env{k}_uda_acc``,
    ``k`` counting the test environments with a non-empty uda split in index order
    (DomainBed's key: with ``test_envs [2]`` it is ``env0_uda_acc``). Under
    ``task="domain_adaptation"`` (which needs ``uda_holdout_fraction > 0``) each step
    also draws ``batch_size`` unlabelled inputs from every uda split and passes their
    list to ``update(minibatches, unlabeled)``; only algorithms whose
    ``uses_unlabeled`` is true accept that task, :func:`check_args` refuses the others.
    The 70/10/20 split protocol has no uda split (``uda_holdout_fraction`` must be 0).

    ``holdout_fraction`` is in (0, 1) under the ``domainbed`` protocol: 0 would leave
    every out split empty, and training-domain validation (DomainBed's model selection)
    could not select anything.

    ``clean_eval`` (not a DomainBed argument): on image datasets with hparam
    ``data_augmentation`` true, DomainBed builds every non-test environment with the
    augmenting transform and evaluates those same datasets, so the training
    environments' splits are scored on augmented images, freshly drawn at every
    checkpoint; test environments never are. That is the default (False), as in the
    published DomainBed tables. True scores every split on clean images;
    training-domain validation can then select other checkpoints. The draws of
    checkpoint ``step`` for split ``s`` (``in``/``out``/``test``) of environment i come
    from ``seed_hash(seed, "evaluation", step, s, i)``, so resumed runs repeat them.
    In-memory datasets (the MNIST family, Debug28) are never augmented, as in DomainBed.

    How a run executes (not DomainBed arguments): ``eval_batch_size`` None (``auto``) is
    :func:`domaingrad.run.evaluation.auto_eval_batch_size` (64 on CPU, 512 on CUDA, or
    the algorithm's own); ``amp`` ``off``/``bf16``/``fp16`` and ``channels_last``
    ``auto``/``on``/``off`` are :mod:`domaingrad.precision`'s; ``deterministic`` turns
    off ``cudnn.benchmark`` (on for CUDA runs otherwise) and makes torch use
    deterministic kernels only (:func:`domaingrad.precision.backend_settings`).
    """

    dataset: str = "ColoredMNIST"
    algorithm: str = "ERM"
    test_envs: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    checkpoint_freq: int | None = None
    hparams: dict[str, Any] | str | None = None
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
    eval_batch_size: int | None = None
    device: str = "auto"
    progress: bool | None = None
    weights: str | None = None
    image_size: int = 224
    num_workers: int | None = None
    class_map: str | None = None
    corrupt_images: str = "error"
    split_protocol: str = "domainbed"
    clean_eval: bool = False
    amp: str = "off"
    channels_last: str = "auto"
    deterministic: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainArgs:
        """The arguments saved as a dict (a sweep job's arguments, a record's ``args``).

        Raises:
            DomainGradError: for a key that is not a train argument.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DomainGradError(
                f"unknown train argument(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def overrides(self) -> dict[str, Any]:
        """``hparams`` as a dict (JSON text parsed).

        Raises:
            DomainGradError: malformed JSON text or a value that is not an object.
        """
        if isinstance(self.hparams, str):
            return parse_hparams_json(self.hparams)
        return dict(self.hparams or {})

    def record(self) -> dict[str, Any]:
        """The arguments as records, ``model.pkl`` and the resume state store them:
        every field, ``hparams`` as sorted JSON text or None (DomainBed's ``args.hparams``)."""
        values = asdict(self)
        values["test_envs"] = list(self.test_envs)
        overrides = self.overrides()
        values["hparams"] = json.dumps(overrides, sort_keys=True) if overrides else None
        return values


def comparable(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved arguments with ``hparams`` in the form :meth:`TrainArgs.record` writes, so
    the text ``'{"lr": 1e-3}'`` of an older checkpoint matches ``{"lr": 0.001}``."""
    values = dict(saved)
    text = values.get("hparams")
    if isinstance(text, str):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return values
        values["hparams"] = json.dumps(parsed, sort_keys=True) if parsed else None
    return values


@dataclass(frozen=True)
class CheckedArgs:
    """Arguments that passed :func:`check_args`, with what checking them resolved.

    Attributes:
        args: the arguments.
        algorithm_class: the class ``args.algorithm`` names.
        hparams: the run's hyperparameters (``hparams_seed``/``trial_seed`` draw plus
            ``args.hparams``).
    """

    args: TrainArgs
    algorithm_class: type[Algorithm]
    hparams: dict[str, Any]


def unlabeled_algorithms() -> list[str]:
    """The registered algorithms that use unlabelled test-environment data (their class
    has ``uses_unlabeled`` true), i.e. those ``--task domain_adaptation`` accepts."""
    from ..algorithms import ALGORITHMS

    return sorted(name for name in ALGORITHMS if getattr(algorithm_class(name), "uses_unlabeled", False))


def check_task(
    task: str, uda_holdout_fraction: float, algorithm: type[Algorithm] | None = None, name: str = ""
) -> None:
    """Check DomainBed's ``--task`` and ``--uda_holdout_fraction`` (a train run and a
    sweep check the same way).

    ``task`` is one of :data:`TASKS`; ``uda_holdout_fraction`` is in [0, 1) and must be
    above 0 under ``domain_adaptation`` (DomainBed stops with "Not enough unlabeled
    samples for domain adaptation" otherwise). Under ``domain_adaptation`` the
    algorithm class, when given, must use the unlabelled data (``uses_unlabeled``):
    a method that would silently ignore them is refused, so that no run is reported as
    domain adaptation when it was domain generalization.

    Raises:
        DomainGradError: naming the argument and what to do.
    """
    if task not in TASKS:
        raise DomainGradError(f"--task {task} is not a task; expected one of: {', '.join(TASKS)}")
    if not 0 <= uda_holdout_fraction < 1:
        raise DomainGradError(
            f"--uda-holdout-fraction must be in [0, 1), got {uda_holdout_fraction}: it is the share of each "
            "test environment's in split given unlabelled to domain-adaptation methods"
        )
    if task == DOMAIN_ADAPTATION and uda_holdout_fraction == 0:
        raise DomainGradError(
            "--task domain_adaptation needs unlabelled test-environment data: give --uda-holdout-fraction "
            "in (0, 1), e.g. 0.2 (the share of each test environment's in split passed unlabelled to update)"
        )
    if task == DOMAIN_ADAPTATION and algorithm is not None and not getattr(algorithm, "uses_unlabeled", False):
        users = unlabeled_algorithms()
        raise DomainGradError(
            f"--task domain_adaptation: {name or algorithm.__name__} does not use unlabelled data (its update "
            "ignores DomainBed's `unlabeled` argument), so the run would be domain generalization; use an "
            f"algorithm that does ({', '.join(users) if users else 'none is registered'}), or "
            "--task domain_generalization"
        )


def check_args(args: TrainArgs) -> CheckedArgs:
    """Every check that needs no data: names, numbers, choices, hyperparameters.

    Also refused here, before any data is read: an unknown ``task``, a
    ``uda_holdout_fraction`` outside [0, 1) (or non-zero under the 70/10/20 protocol),
    ``domain_adaptation`` without a uda fraction or with an algorithm that does not use
    unlabelled data (:func:`check_task`), a ``holdout_fraction`` outside (0, 1) under the ``domainbed``
    protocol, ``test_envs`` naming every environment of a dataset whose environments are
    known from its class (``ENVIRONMENTS``; the others are checked by the data layer when
    the training stream is built), and a ``class_map`` for a dataset without class
    folders.

    Every given hyperparameter is checked (type, choices, range) whether or not the
    run's model uses it (:func:`domaingrad.registry.resolve_hparams`).

    Raises:
        DomainGradError: naming the bad argument and what is expected.
    """
    # names in their canonical spelling (``debug28`` -> ``Debug28``), so records,
    # checkpoints and model.pkl hold the registered name whatever the user typed
    args = replace(args, dataset=resolve_dataset_name(args.dataset), algorithm=resolve_algorithm_name(args.algorithm))
    data_cls = dataset_class(args.dataset)
    cls = algorithm_class(args.algorithm)
    check_task(args.task, args.uda_holdout_fraction, cls, args.algorithm)
    if args.split_protocol == SPLIT_70_10_20 and args.uda_holdout_fraction != 0:
        raise DomainGradError(
            f"--uda-holdout-fraction {args.uda_holdout_fraction} applies to DomainBed's in/out split only: "
            f"use --split-protocol {SPLIT_DOMAINBED}, or leave it at 0 under {SPLIT_70_10_20}"
        )
    if args.split_protocol == SPLIT_DOMAINBED and not 0 < args.holdout_fraction < 1:
        raise DomainGradError(
            f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}: it is the share of every "
            "environment held out as its out split, which training-domain validation selects on "
            "(0 leaves every out split empty); DomainBed's default is 0.2"
        )
    if not args.test_envs:
        raise DomainGradError("--test-envs needs at least one environment index")
    if len(set(args.test_envs)) != len(args.test_envs):
        raise DomainGradError(f"--test-envs lists an environment twice: {list(args.test_envs)}")
    names = list(getattr(data_cls, "ENVIRONMENTS", []) or [])
    if names and set(range(len(names))) <= set(args.test_envs):
        raise DomainGradError(
            f"--test-envs {' '.join(map(str, args.test_envs))} names every environment of {args.dataset} "
            f"({', '.join(f'{i}={n}' for i, n in enumerate(names))}), leaving none to train on; "
            "leave at least one environment out of --test-envs"
        )
    if args.class_map is not None and not issubclass(data_cls, ImageFolderDataset):
        raise DomainGradError(
            f"--class-map applies only to image-folder datasets (PACS, VLCS, ..., folder:PATH), whose class "
            f"folders it maps; {args.dataset} has no class folders: drop --class-map"
        )
    for name in ("steps", "checkpoint_freq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DomainGradError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise DomainGradError(f"--eval-batch-size must be a positive integer or auto, got {args.eval_batch_size}")
    check_precision(args, cls)
    if args.image_size < 1:
        raise DomainGradError(f"--image-size must be a positive integer, got {args.image_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise DomainGradError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.split_protocol not in SPLIT_PROTOCOLS:
        raise DomainGradError(
            f"--split-protocol must be one of {', '.join(SPLIT_PROTOCOLS)}, got {args.split_protocol!r}"
        )
    if args.corrupt_images not in CORRUPT_POLICIES:
        raise DomainGradError(
            f"--corrupt-images must be one of {', '.join(CORRUPT_POLICIES)}, got {args.corrupt_images!r}"
        )
    hparams = resolve_hparams(args.algorithm, args.dataset, args.hparams_seed, args.trial_seed, args.overrides())
    return CheckedArgs(args, cls, hparams)


def check_precision(args: TrainArgs, cls: type[Algorithm]) -> None:
    """Refuse an unknown ``amp`` or ``channels_last`` value, and ``amp="fp16"`` for an
    algorithm that does not route its steps through the loss scaler
    (:meth:`~domaingrad.algorithms.Algorithm.fp16_ready`).

    Raises:
        DomainGradError: with the valid values, or the fp16-ready algorithms.
    """
    if args.amp not in precision.AMP_MODES:
        raise DomainGradError(f"--amp must be one of {', '.join(precision.AMP_MODES)}, got {args.amp!r}")
    if args.channels_last not in precision.MEMORY_FORMATS:
        raise DomainGradError(
            f"--channels-last must be one of {', '.join(precision.MEMORY_FORMATS)}, got {args.channels_last!r}"
        )
    if args.amp == "fp16" and not cls.fp16_ready():
        ready = sorted(name for name, c in ALGORITHMS.items() if c.fp16_ready())
        raise DomainGradError(
            f"--amp fp16 needs loss scaling, which {args.algorithm}'s update does not do (fp16-ready: "
            f"{', '.join(ready)}); use --amp bf16 (no loss scaling needed) or --amp off"
        )


def has_test_parts(args: TrainArgs) -> bool:
    """Whether the run's environments have a test part (``env{i}_test_acc``)."""
    return args.split_protocol == SPLIT_70_10_20


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
