"""Model selection, as DomainBed's ``domainbed/model_selection.py`` defines it, plus the 70/10/20 protocol.

The three methods are those of Gulrajani and Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021, Sec. 3 (training-domain validation, leave-one-domain-out
cross-validation, test-domain validation = oracle); the fourth is the protocol of Mansilla,
Echeveste, Milone and Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021,
Sec. 4.1 (70/10/20 split of every domain).

A *group* is (trial_seed, dataset, algorithm, test_env) (``reporting.get_grouped_records``;
a record with two test envs belongs to two groups). Within a group a *run* is the records
sharing ``hparams_seed``. Each method scores a run by one checkpoint (``run_acc`` ->
val_acc, test_acc); the group's number is the test_acc of the run with the highest
val_acc (``sweep_acc``).

Ties and NaN are handled exactly as DomainBed's code (``domainbed/lib/query.py``) handles
them, in every case; ``tests/report/test_domainbed_parity.py`` checks this against a
transcription of that code on sweeps full of ties and NaN:

* Between runs (all methods): ``Q.group`` orders the runs by ``hparams_seed`` (its groups
  come out sorted by key), ``Q.sorted`` ranks them by val_acc with a NaN val_acc counted
  as minus infinity, and the ranking is reversed (``[::-1]`` of a stable sort). So on
  equal val_acc the run with the HIGHEST hparams_seed wins, whatever the order of the
  job directories; a run whose val_acc is NaN loses to every run with a number, and if
  every run's val_acc is NaN the highest hparams_seed wins. Accuracies are ratios of
  counts, so equal accuracies are exactly equal floats, not rounding accidents.
* Within a run, training-domain validation and leave-one-domain-out take Python's
  ``max`` over the checkpoints (``Q.argmax``): on equal val_acc the FIRST checkpoint wins,
  in record order (the order of the lines of results.jsonl) for training-domain
  validation, in increasing ``step`` for leave-one-domain-out (``Q.group("step")`` sorts
  the steps). ``max`` compares with ``>``, which is false for NaN: a NaN val_acc at a
  later checkpoint never wins (minus infinity), but a NaN val_acc at the first
  checkpoint is never beaten and is chosen; the run then carries val_acc NaN into the
  ranking between runs, where it counts as minus infinity. (A NaN accuracy comes from an
  empty split, so in domaingrad's runs it is NaN at every checkpoint of the run, and
  then the first checkpoint is chosen by any reading.)
* Test-domain validation takes each run's checkpoint with the largest ``step`` (the last
  such record in record order if a step repeats); its val_acc (the test env's out split)
  may be NaN and then counts as minus infinity between runs.

Records come job by job, jobs sorted by directory name, each job's lines in file order
(DomainBed reads the jobs in ``os.listdir`` order, which only matters for the order of
records of one run spread over several job directories).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import DomainGradError
from .names import count_environments
from .records import SPLIT_70_10_20


@dataclass(frozen=True)
class Choice:
    """The checkpoint a method picks for one run: its validation and reported accuracy (fractions)."""

    val_acc: float
    test_acc: float
    record: dict


@dataclass(frozen=True)
class Selected:
    """The outcome of model selection for one group (trial seed, dataset, algorithm, test env).

    ``test_acc`` is the reported accuracy (a fraction in [0, 1]); ``in_domain_acc`` the
    mean over the training environments of the held-out accuracy at the chosen checkpoint
    (DMG's in-domain number, see :func:`in_domain_accuracy`).
    """

    trial_seed: int
    dataset: str
    algorithm: str
    test_env: int
    hparams_seed: object
    step: float
    val_acc: float
    test_acc: float
    in_domain_acc: float


def single_test_env(records: Iterable[dict]) -> list[dict]:
    """Records of runs with exactly one test env (``model_selection.get_test_records``)."""
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


def ranking_key(value: float) -> float:
    """DomainBed's ``Q.sorted`` key for an accuracy: the value, or minus infinity for NaN."""
    return float("-inf") if isinstance(value, float) and math.isnan(value) else value


def sorted_groups(
    records: Iterable[dict], key: Callable[[dict], int | float | str], what: str
) -> list[tuple[int | float | str, list[dict]]]:
    """(key, records) with the keys in increasing order, like DomainBed's ``Q.group``.

    Records keep their order within a group. ``key`` returns an int, float or str
    (:func:`.records.record_error` checks ``step`` and ``hparams_seed``); ``what`` names
    it in the error.

    Raises:
        DomainGradError: if the keys cannot be ordered (integers mixed with strings;
            DomainBed's ``sorted`` raises TypeError there).
    """
    groups: dict[int | float | str, list[dict]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    try:
        keys = sorted(groups)
    except TypeError:
        shown = ", ".join(repr(k) for k in list(groups)[:4])
        raise DomainGradError(
            f"cannot order the runs by {what}: values {shown} mix integers and strings. "
            f"DomainBed sorts the runs of a (trial_seed, dataset, algorithm, test_env) "
            f"by {what}; make {what} all integers (or all strings) in these runs"
        ) from None
    return [(k, groups[k]) for k in keys]


def _first_max(choices: list[Choice]) -> Choice:
    # Python's max, as DomainBed's Q.argmax: the first maximum; NaN never compares greater,
    # so a NaN first candidate is kept and a later NaN never wins (module docstring).
    return max(choices, key=lambda c: c.val_acc)


class SelectionMethod:
    """Base class: subclasses define ``run_acc`` (``model_selection.SelectionMethod``)."""

    #: short name used on the command line
    key = ""
    #: DomainBed's name of the method (printed in table headers)
    name = ""

    @classmethod
    def run_acc(cls, run_records: list[dict]) -> Choice | None:
        raise NotImplementedError

    @classmethod
    def hparams_accs(cls, records: list[dict]) -> list[tuple[Choice, list[dict]]]:
        """Per run (hparams_seed) of one group, its choice and records, in DomainBed's ranking.

        Runs in increasing hparams_seed, stably sorted by val_acc (NaN = minus infinity),
        reversed: best val_acc first and, among equal val_acc, the highest hparams_seed
        first. Runs without a choice (``run_acc`` None) are left out.

        Raises:
            DomainGradError: if the group mixes integer and string hparams_seeds.
        """
        runs = sorted_groups(records, lambda r: r["args"]["hparams_seed"], "args.hparams_seed")
        scored = [(cls.run_acc(run), run) for _, run in runs]
        kept = [(choice, run) for choice, run in scored if choice is not None]
        return sorted(kept, key=lambda s: ranking_key(s[0].val_acc))[::-1]

    @classmethod
    def sweep_acc(cls, records: list[dict]) -> Choice | None:
        """The choice of the first run of :meth:`hparams_accs`, or None if no run qualifies."""
        accs = cls.hparams_accs(records)
        return accs[0][0] if accs else None


class OracleSelectionMethod(SelectionMethod):
    """Test-domain validation (oracle): the LAST checkpoint of each run, val = test env out-acc.

    The checkpoint with the largest ``step`` (of equal steps, the last record); a NaN
    val_acc counts as minus infinity when the runs are ranked (see the module docstring).
    """

    key = "oracle"
    name = "test-domain validation set (oracle)"

    @classmethod
    def run_acc(cls, run_records: list[dict]) -> Choice | None:
        run_records = single_test_env(run_records)
        if not run_records:
            return None
        test_env = run_records[0]["args"]["test_envs"][0]
        chosen = sorted(run_records, key=lambda r: r["step"])[-1]
        return Choice(chosen[f"env{test_env}_out_acc"], chosen[f"env{test_env}_in_acc"], chosen)


class IIDAccuracySelectionMethod(SelectionMethod):
    """Training-domain validation: the checkpoint with the best mean out-acc over the training envs.

    Of equal val_acc the first checkpoint in record order; NaN as Python's ``max`` treats
    it (a NaN first checkpoint is chosen, a later NaN never is; see the module docstring).
    """

    key = "iid"
    name = "training-domain validation set"
    #: record key (format with the test env) of the reported accuracy
    test_key = "env{}_in_acc"

    @classmethod
    def step_acc(cls, record: dict) -> Choice:
        test_env = record["args"]["test_envs"][0]
        val_keys = [f"env{i}_out_acc" for i in range(count_environments(record)) if i != test_env]
        return Choice(float(np.mean([record[k] for k in val_keys])), record[cls.test_key.format(test_env)], record)

    @classmethod
    def run_acc(cls, run_records: list[dict]) -> Choice | None:
        test_records = single_test_env(run_records)
        if not test_records:
            return None
        return _first_max([cls.step_acc(r) for r in test_records])


class Split701020SelectionMethod(IIDAccuracySelectionMethod):
    """The 70/10/20 protocol of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via
    Gradient Surgery", ICCV 2021, Sec. 4.1: every domain split 70/10/20 into train/validation/test;
    "we selected the model that achieves the highest accuracy on the validation set", i.e. the
    checkpoint (and hparams) with the best mean validation (10%) accuracy of the source domains;
    reported = accuracy on the 20% test part of the held-out domain (``env{test}_test_acc``).
    Ties and NaN as in training-domain validation."""

    key = SPLIT_70_10_20
    name = "source-domain validation, held-out domain test split (70/10/20, Mansilla et al. 2021)"
    test_key = "env{}_test_acc"


class LeaveOneOutSelectionMethod(SelectionMethod):
    """Leave-one-domain-out cross-validation: needs, for every training env v, runs with test
    envs {test, v} of the same hparams; val = mean over v of env{v}_in_acc at the same step.

    Steps in increasing order; of equal val_acc the earliest step; NaN as Python's ``max``
    treats it (a NaN at the earliest step is chosen, a later NaN never is; see the module
    docstring)."""

    key = "loo"
    name = "leave-one-domain-out cross-validation"

    @classmethod
    def step_acc(cls, records: list[dict]) -> Choice | None:
        test_records = single_test_env(records)
        if len(test_records) != 1:
            return None
        test_env = test_records[0]["args"]["test_envs"][0]
        n_envs = count_environments(records[0])
        val_accs = np.zeros(n_envs) - 1
        for r in records:
            if len(r["args"]["test_envs"]) == 2:
                val_env = (set(r["args"]["test_envs"]) - {test_env}).pop()
                val_accs[val_env] = r[f"env{val_env}_in_acc"]
        others = list(val_accs[:test_env]) + list(val_accs[test_env + 1 :])
        if any(v == -1 for v in others):
            return None
        return Choice(float(np.sum(others) / (n_envs - 1)), test_records[0][f"env{test_env}_in_acc"], test_records[0])

    @classmethod
    def run_acc(cls, run_records: list[dict]) -> Choice | None:
        steps = [cls.step_acc(rs) for _, rs in sorted_groups(run_records, lambda r: r["step"], "step")]
        choices = [s for s in steps if s is not None]
        return _first_max(choices) if choices else None


METHODS: dict[str, type[SelectionMethod]] = {
    m.key: m
    for m in (IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod, Split701020SelectionMethod)
}


def protocol_of(records: list[dict]) -> str:
    """``"70/10/20"`` if the runs use the 70/10/20 split (Mansilla et al., ICCV 2021, Sec. 4.1),
    ``"domainbed"`` otherwise.

    Raises:
        DomainGradError: if the sweep mixes both kinds of runs.
    """
    kinds = {r["args"].get("split_protocol") == SPLIT_70_10_20 for r in records}
    if kinds == {True, False}:
        raise DomainGradError(
            "the sweep mixes runs with args.split_protocol '70/10/20' and DomainBed's in/out "
            "split; report them from separate sweep directories"
        )
    return SPLIT_70_10_20 if kinds == {True} else "domainbed"


def resolve_methods(selection: str, records: list[dict]) -> list[type[SelectionMethod]]:
    """The methods for ``--selection``: ``auto`` = ``70/10/20`` (:class:`Split701020SelectionMethod`)
    for 70/10/20 runs, else DomainBed's three (as collect_results prints); ``all`` = DomainBed's
    three (+ ``70/10/20`` for 70/10/20 runs).

    Raises:
        DomainGradError: for an unknown name, or ``70/10/20`` on runs without the 70/10/20 split.
    """
    split = protocol_of(records) == SPLIT_70_10_20
    domainbed = [IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod]
    if selection == "auto":
        return [Split701020SelectionMethod] if split else domainbed
    if selection == "all":
        return domainbed + ([Split701020SelectionMethod] if split else [])
    if selection not in METHODS:
        raise DomainGradError(f"unknown selection method {selection!r}; valid: auto, all, {', '.join(METHODS)}")
    if selection == SPLIT_70_10_20 and not split:
        raise DomainGradError(
            f"--selection {SPLIT_70_10_20} needs runs with args.split_protocol '70/10/20' and "
            "env{i}_test_acc keys; these runs use DomainBed's in/out split (use iid, loo or oracle)"
        )
    return [METHODS[selection]]


def in_domain_accuracy(record: dict, test_env: int) -> float:
    """DMG's in-domain accuracy at a checkpoint: mean over the training envs of the source
    held-out split, ``env{i}_test_acc`` when the run has a test part (70/10/20, not used for
    selection, as DMG's source test splits), else ``env{i}_out_acc`` (DomainBed's out split)."""
    kind = "test" if record["args"].get("split_protocol") == SPLIT_70_10_20 else "out"
    train_envs = [i for i in range(count_environments(record)) if i not in record["args"]["test_envs"]]
    return float(np.mean([record[f"env{i}_{kind}_acc"] for i in train_envs]))


def grouped_records(records: list[dict]) -> list[tuple[tuple[int, str, str, int], list[dict]]]:
    """((trial_seed, dataset, algorithm, test_env), records) as ``reporting.get_grouped_records``."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for test_env in r["args"]["test_envs"]:
            key = (r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["algorithm"], test_env)
            groups.setdefault(key, []).append(r)
    return list(groups.items())


def select(records: list[dict], method: type[SelectionMethod]) -> list[Selected]:
    """Run ``method`` on every group; groups where no run qualifies are left out (DomainBed's X)."""
    out = []
    for (trial_seed, dataset, algorithm, test_env), group in grouped_records(records):
        choice = method.sweep_acc(group)
        if choice is None:
            continue
        out.append(
            Selected(
                trial_seed,
                dataset,
                algorithm,
                test_env,
                choice.record["args"]["hparams_seed"],
                choice.record["step"],
                float(choice.val_acc),
                float(choice.test_acc),
                in_domain_accuracy(choice.record, test_env),
            )
        )
    return out
