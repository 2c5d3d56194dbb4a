"""Multi-domain datasets, DomainBed's in/out splits, and in-memory minibatch sampling.

A DG dataset is an ordered list of environments (domains); each environment is a
labelled dataset (any object with the :class:`Environment` interface). For in-memory
data an environment holds two tensors (:class:`TensorEnvironment`), so a minibatch is
one ``index_select`` on each: no per-sample Python work in the training loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from ..errors import DomainGradError, DomainGradWarning
from ..rng import seed_hash


class DataWarning(DomainGradWarning):
    """Data that trains but is very likely not what the user meant (a training set with a
    single class, say); shown on stderr."""


class Environment(Protocol):
    """What splits, training streams and evaluation use of one environment (domain):
    :class:`TensorEnvironment` in memory, :class:`~domaingrad.data.images.ImageEnvironment`
    for image folders.

    Attributes:
        name: the environment's name.
        y: labels, int64 of shape (N,).
    """

    name: str
    y: torch.Tensor

    def __len__(self) -> int:
        """N, the number of samples."""
        ...

    def batches(
        self, indices: torch.Tensor, batch_size: int, augment_seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The samples at ``indices`` (int64 (n,)) in order, as (x, y) batches of at most
        ``batch_size``; ``augment_seed`` None reads them unaugmented."""
        ...


class MinibatchStream(Protocol):
    """An endless training stream (what :meth:`MultipleDomainDataset.minibatches`
    returns): each ``next()`` gives one (x, y) per training split; ``state_dict`` /
    ``load_state_dict`` save and restore its position for exact resume."""

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]: ...

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TensorEnvironment:
    """One environment (domain) held in memory.

    Attributes:
        name: the environment's name (DomainBed's, e.g. ``"+90%"`` or ``"15"``).
        x: inputs, float32 of shape (N, *input_shape).
        y: labels, int64 of shape (N,).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"environment {self.name!r}: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, indices: torch.Tensor, batch_size: int, augment_seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the samples at ``indices`` in order as (x, y) batches of at most ``batch_size``.

        Raises:
            DomainGradError: for an ``augment_seed``: in-memory datasets have no
                augmentation (DomainBed augments image folders only).
        """
        if augment_seed is not None:
            raise DomainGradError(
                f"environment {self.name!r} is held in memory and has no augmentation; "
                "evaluate it without an augmentation seed"
            )
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            yield self.x[idx], self.y[idx]


class MultipleDomainDataset:
    """An ordered list of environments with a common input shape and label set.

    Subclasses set ``ENVIRONMENTS`` (names, in DomainBed's order) and fill
    ``self.environments``, ``self.input_shape`` and ``self.num_classes``. Class
    attributes give DomainBed's per-dataset defaults.

    Attributes:
        environments: the environments in order; ``dataset[i]`` is environment i.
        input_shape: shape of one input, e.g. (2, 28, 28).
        num_classes: number of classes.
        source: a human-readable line saying where the data came from (logged by runs).
    """

    ENVIRONMENTS: ClassVar[list[str]] = []
    N_STEPS: ClassVar[int] = 5001  # DomainBed's default number of training steps
    CHECKPOINT_FREQ: ClassVar[int] = 100  # DomainBed's default checkpoint frequency
    SMALL_IMAGES: ClassVar[bool] = False  # selects the small-image hyperparameter defaults
    #: whether hparam ``data_augmentation`` applies: DomainBed augments image folders only
    AUGMENTS: ClassVar[bool] = False

    environments: Sequence[Environment]
    input_shape: tuple[int, ...]
    num_classes: int
    source: str = ""
    #: lines about the data a run should log (e.g. classes missing from a domain)
    report: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.environments)

    def __getitem__(self, index: int) -> Environment:
        return self.environments[index]

    @property
    def environment_names(self) -> list[str]:
        return [env.name for env in self.environments]

    def minibatches(
        self,
        splits: Sequence[Split],
        batch_size: int,
        seed: int,
        class_balanced: bool = False,
        augment: bool = False,
        pin_memory: bool = False,
    ) -> MinibatchStream:
        """The endless training stream over ``splits`` (one batch per split per step).

        In-memory datasets draw with :class:`InfiniteMinibatches` (``augment`` and
        ``pin_memory`` do not apply); image-folder datasets override this to load in
        DataLoader workers.
        """
        return InfiniteMinibatches(splits, batch_size, seed, class_balanced)


@dataclass
class Split:
    """A subset of one environment, given by indices into it.

    Attributes:
        env: the parent environment.
        indices: int64 tensor of shape (n,), positions in ``env``.
        augment_seed: None (the default) reads the samples unaugmented; an integer
            reads them through the training augmentation, the draw of the sample at
            position p seeded by ``seed_hash(augment_seed, p)`` (image folders only; see
            :meth:`augmented`).
    """

    env: Environment
    indices: torch.Tensor
    augment_seed: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def augmented(self, seed: int) -> Split:
        """The same samples read through the training augmentation, every draw a
        function of ``seed`` and the sample's position (DomainBed evaluates the training
        environments of image datasets on augmented images)."""
        return Split(self.env, self.indices, int(seed))

    @property
    def y(self) -> torch.Tensor:
        """Labels of the split, int64 of shape (n,)."""
        return self.env.y[self.indices]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the split in order as (x, y) batches of at most ``batch_size`` (read
        through the environment's own ``batches``, so image folders load in workers),
        augmented when ``augment_seed`` is set."""
        if self.augment_seed is None:
            yield from self.env.batches(self.indices, batch_size)
        else:
            yield from self.env.batches(self.indices, batch_size, augment_seed=self.augment_seed)


def split_environment(
    env: Environment, holdout_fraction: float, trial_seed: int, env_index: int
) -> tuple[Split, Split]:
    """DomainBed's in/out split of one environment.

    The environment's positions are shuffled by ``np.random.RandomState(seed_hash(
    trial_seed, env_index))``; the first ``int(len(env) * holdout_fraction)`` form the
    *out* split (validation), the rest the *in* split (DomainBed ``train.py`` +
    ``misc.split_dataset``), so the same trial seed gives DomainBed's split.

    Returns:
        (out_split, in_split), disjoint and together covering the environment.

    Raises:
        DomainGradError: if ``holdout_fraction`` is outside [0, 1) or the environment
            has no samples (its in split would be empty).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DomainGradError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    check_not_empty(env, env_index)
    keys = np.arange(len(env))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_out = int(len(env) * holdout_fraction)
    if n_out == 0 and holdout_fraction > 0:
        _warn_empty_out(
            env, env_index, f"holdout_fraction {holdout_fraction} of its {len(env)} sample(s) rounds down to none"
        )
    keys_t = torch.from_numpy(keys)
    return Split(env, keys_t[:n_out]), Split(env, keys_t[n_out:])


def split_uda(in_split: Split, uda_holdout_fraction: float, trial_seed: int, env_index: int) -> tuple[Split, Split]:
    """DomainBed's unlabelled (*uda*) split of a test environment, carved out of its in
    split.

    DomainBed's ``train.py`` (Gulrajani and Lopez-Paz, "In Search of Lost Domain
    Generalization", ICLR 2021) first splits every environment into out and in
    (:func:`split_environment`); then, for each test environment, it shuffles the
    positions *within the in split* by ``np.random.RandomState(seed_hash(trial_seed,
    env_index))`` (the same seed as the in/out split) and gives the first
    ``int(len(in_split) * uda_holdout_fraction)`` to the uda split, the rest stay in.
    The uda samples are handed to the algorithm without labels under
    ``--task domain_adaptation`` and are evaluated as ``env{k}_uda_acc``; the test
    environment's in accuracy is then measured on the remaining in samples only.

    Args:
        in_split: the environment's in split (positions into its environment).
        uda_holdout_fraction: share of the in split moved to the uda split, in [0, 1).
        trial_seed: the run's trial seed.
        env_index: the environment's index in the dataset.

    Returns:
        (uda_split, in_split): disjoint, together exactly the given in split; the uda
        split is empty when the fraction rounds down to no sample.

    Raises:
        DomainGradError: if ``uda_holdout_fraction`` is outside [0, 1).
    """
    if not 0.0 <= uda_holdout_fraction < 1.0:
        raise DomainGradError(f"uda_holdout_fraction must be in [0, 1), got {uda_holdout_fraction}")
    keys = np.arange(len(in_split))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_uda = int(len(in_split) * uda_holdout_fraction)
    positions = in_split.indices[torch.from_numpy(keys)]
    return Split(in_split.env, positions[:n_uda]), Split(in_split.env, positions[n_uda:])


def split_environment_70_10_20(env: Environment, trial_seed: int, env_index: int) -> tuple[Split, Split, Split]:
    """The split of one domain of Mansilla, Echeveste, Milone, Ferrante, "Domain
    Generalization via Gradient Surgery", ICCV 2021, Section 4.1: 70% for
    training, 10% for validation (model selection), 20% for testing.

    The positions are shuffled as in :func:`split_environment` (same seed), then the
    first ``int(0.2 n)`` form the test part, the next ``int(0.1 n)`` the validation part
    and the rest the training part.

    Returns:
        (in_split (70%), out_split (10%), test_split (20%)), disjoint, together covering
        the environment; ``in``/``out`` keep DomainBed's record keys.

    Raises:
        DomainGradError: if the environment has no samples.
    """
    check_not_empty(env, env_index)
    keys = np.arange(len(env))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_test, n_val = int(len(env) * 0.2), int(len(env) * 0.1)
    if n_val == 0:
        _warn_empty_out(env, env_index, f"the 10% validation part of its {len(env)} sample(s) rounds down to none")
    keys_t = torch.from_numpy(keys)
    return (
        Split(env, keys_t[n_test + n_val :]),
        Split(env, keys_t[n_test : n_test + n_val]),
        Split(env, keys_t[:n_test]),
    )


def _warn_empty_out(env: Environment, env_index: int, why: str) -> None:
    warnings.warn(
        f"environment {env_index} ({env.name!r}) gets an empty out (validation) split: {why}; its out "
        "accuracy will be NaN and training-domain validation cannot select on it. Give it more samples",
        DataWarning,
        stacklevel=3,
    )


def check_not_empty(env: Environment, env_index: int) -> None:
    """Refuse an environment without samples before it is split: its in split would be
    empty, and DomainBed's epoch count (the smallest in split over the batch size)
    would divide by zero.

    Raises:
        DomainGradError: naming the environment.
    """
    if len(env) == 0:
        raise DomainGradError(
            f"environment {env_index} ({env.name!r}) has no samples; every environment needs samples to train "
            "on or to be evaluated: check the dataset's files, or give it more data"
        )


def check_training_splits(splits: Sequence[Split], batch_size: int) -> None:
    """The checks every training stream makes before drawing.

    Warns (:class:`DataWarning`, on stderr) when the training splits together hold a
    single class: every classifier then predicts it, and the accuracies measure nothing.

    Raises:
        DomainGradError: no training split (every environment is a test environment), a
            batch size below 1, or a training split without samples.
    """
    if not splits:
        raise DomainGradError(
            "no training environment: every environment is a test environment; leave at least one "
            "environment out of --test-envs"
        )
    if batch_size < 1:
        raise DomainGradError(f"batch_size must be a positive integer, got {batch_size}")
    for split in splits:
        if len(split) == 0:
            raise DomainGradError(f"environment {split.env.name!r} has no training samples; lower holdout_fraction")
    classes = torch.unique(torch.cat([split.y for split in splits]))
    if len(classes) == 1:
        names = ", ".join(repr(split.env.name) for split in splits)
        warnings.warn(
            f"the training data (environments {names}) holds a single class (label {int(classes[0])}): "
            "a classifier trained on it predicts that class for every input, which makes it trivial and "
            "its accuracies meaningless; check the labels, the class folders and --test-envs",
            DataWarning,
            stacklevel=3,
        )


class InfiniteMinibatches:
    """Endless minibatches, one per training split, drawn from memory.

    Like DomainBed's ``InfiniteDataLoader``, each batch is drawn uniformly *with
    replacement* (or, with ``class_balanced``, with probability inversely proportional
    to the class frequency of the split). All randomness comes from one
    ``torch.Generator`` whose state is saved and restored for exact resume.

    Args:
        splits: the training splits, one per training environment.
        batch_size: samples per environment per step.
        seed: seed of the sampling generator.
        class_balanced: DomainBed's ``class_balanced`` hyperparameter.

    Each ``next()`` returns a list of (x, y) with x of shape (batch_size, *input_shape).

    Raises:
        DomainGradError: a bad batch size, an empty split, or a split of an environment
            that is not a :class:`TensorEnvironment` (image folders have their own stream).
    """

    def __init__(self, splits: Sequence[Split], batch_size: int, seed: int, class_balanced: bool = False):
        check_training_splits(splits, batch_size)
        self.splits = list(splits)
        self.envs: list[TensorEnvironment] = []
        for split in self.splits:
            if not isinstance(split.env, TensorEnvironment):
                raise DomainGradError(
                    f"environment {split.env.name!r} is not held in memory "
                    f"({type(split.env).__name__}); draw its minibatches with its "
                    "dataset's minibatches()"
                )
            self.envs.append(split.env)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.weights: list[torch.Tensor | None] = []
        for split in self.splits:
            if class_balanced:
                y = split.y
                counts = torch.bincount(y).double()
                self.weights.append((1.0 / counts)[y])
            else:
                self.weights.append(None)

    def __iter__(self) -> InfiniteMinibatches:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = []
        for split, env, weights in zip(self.splits, self.envs, self.weights):
            if weights is None:
                pos = torch.randint(len(split), (self.batch_size,), generator=self.generator)
            else:
                pos = torch.multinomial(weights, self.batch_size, replacement=True, generator=self.generator)
            idx = split.indices[pos]
            batches.append((env.x[idx], env.y[idx]))
        return batches

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
