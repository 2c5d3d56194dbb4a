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

from .. import models
from ..algorithms import Algorithm, algorithm_class, resolve_algorithm_name
from ..data import ImageFolderDataset, dataset_class, resolve_dataset_name
from ..data.folders import CORRUPT_POLICIES
from ..errors import DomainGradError
from ..hparams import parse_hparams_json
from ..layout import SPLIT_70_10_20, SPLIT_DOMAINBED, SPLIT_PROTOCOLS
from ..registry import resolve_hparams

#: DomainBed's ``--task`` values; only domain generalization is implemented
TASKS = ("domain_generalization",)


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

    ``task`` and ``uda_holdout_fraction`` are DomainBed's: only
    ``domain_generalization`` is implemented, so ``task`` must keep that value and
    ``uda_holdout_fraction`` (the share of each test environment given unlabelled to
    domain-adaptation methods) its default 0; :func:`check_args` refuses others.

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


def check_task(task: str, uda_holdout_fraction: float) -> None:
    """Refuse DomainBed's ``--task domain_adaptation`` and a non-zero
    ``--uda_holdout_fraction``: only domain generalization is implemented (a train run
    and a sweep check the same way).

    Raises:
        DomainGradError: naming the argument and what to do.
    """
    if task not in TASKS:
        raise DomainGradError(
            f"--task {task} is not supported yet; domaingrad implements "
            f"{', '.join(TASKS)} (DomainBed's default task) only: leave --task at its default"
        )
    if uda_holdout_fraction != 0:
        raise DomainGradError(
            f"--uda-holdout-fraction {uda_holdout_fraction} is not supported yet: it gives part of the "
            "test environments to domain-adaptation methods, which domaingrad does not implement; leave it at 0"
        )


def check_args(args: TrainArgs) -> CheckedArgs:
    """Every check that needs no data: names, numbers, choices, hyperparameters.

    Also refused here, before any data is read: a ``task`` other than
    ``domain_generalization`` or a non-zero ``uda_holdout_fraction`` (domain adaptation
    is not implemented), a ``holdout_fraction`` outside (0, 1) under the ``domainbed``
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
    check_task(args.task, args.uda_holdout_fraction)
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
    if args.eval_batch_size < 1:
        raise DomainGradError(f"--eval-batch-size must be a positive integer, got {args.eval_batch_size}")
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
