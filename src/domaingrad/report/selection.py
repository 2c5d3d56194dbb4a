"""Model selection, as DomainBed's ``domainbed/model_selection.py`` defines it, plus seed 002's protocol.

A *group* is (trial_seed, dataset, algorithm, test_env) (``reporting.get_grouped_records``;
a record with two test envs belongs to two groups). Within a group a *run* is the records
sharing ``hparams_seed``. Each method scores a run by one checkpoint (``run_acc`` ->
val_acc, test_acc); the group's number is the test_acc of the run with the highest
val_acc (``sweep_acc``).

Ties are broken as DomainBed's code breaks them: within a run the first checkpoint in
record order with the highest val_acc (Python's ``max``); between runs the last run in
record order (``sorted(...)[::-1]``). Records come job by job, jobs sorted by directory
name (DomainBed uses ``os.listdir`` order, which is arbitrary), so ties are the only case
where numbers can differ from a given DomainBed invocation.
"""
from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Callable, Iterable

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


def group_by(records: Iterable[dict], key: Callable[[dict], object]) -> list[tuple[object, list[dict]]]:
    """(key, records) in order of first appearance, like DomainBed's ``Q.group``."""
    groups: dict[object, tuple[object, list[dict]]] = {}
    for r in records:
        k = key(r)
        hashable = k if isinstance(k, Hashable) else json.dumps(k)  # DomainBed's misc.hashable
        groups.setdefault(hashable, (k, []))[1].append(r)
    return list(groups.values())


def _argmax(choices: list[Choice]) -> Choice:
    return max(choices, key=lambda c: c.val_acc)  # first maximum, as DomainBed's Q.argmax


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
        """Per run (hparams_seed) of one group, its choice, best val_acc first (DomainBed's order)."""
        scored = [(cls.run_acc(run), run) for _, run in group_by(records, lambda r: r["args"]["hparams_seed"])]
        scored = [s for s in scored if s[0] is not None]
        return sorted(scored, key=lambda s: s[0].val_acc)[::-1]

    @classmethod
    def sweep_acc(cls, records: list[dict]) -> Choice | None:
        """The choice of the run with the best val_acc in one group, or None if no run qualifies."""
        accs = cls.hparams_accs(records)
        return accs[0][0] if accs else None


class OracleSelectionMethod(SelectionMethod):
    """Test-domain validation (oracle): the LAST checkpoint of each run, val = test env out-acc."""

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
    """Training-domain validation: the checkpoint with the best mean out-acc over the training envs."""

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
        return _argmax([cls.step_acc(r) for r in test_records])


class Seed002SelectionMethod(IIDAccuracySelectionMethod):
    """Seed 002 (Mansilla et al. 2021, Sec. 4.1): 70/10/20 split of every domain; the checkpoint
    (and hparams) with the best mean validation (10%) accuracy of the source domains; reported =
    accuracy on the 20% test part of the held-out domain (``env{test}_test_acc``)."""

    key = "seed002"
    name = "source-domain validation, held-out domain test split (seed 002, 70/10/20)"
    test_key = "env{}_test_acc"


class LeaveOneOutSelectionMethod(SelectionMethod):
    """Leave-one-domain-out cross-validation: needs, for every training env v, runs with test
    envs {test, v} of the same hparams; val = mean over v of env{v}_in_acc at the same step."""

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
        val_accs = list(val_accs[:test_env]) + list(val_accs[test_env + 1:])
        if any(v == -1 for v in val_accs):
            return None
        return Choice(float(np.sum(val_accs) / (n_envs - 1)), test_records[0][f"env{test_env}_in_acc"],
                      test_records[0])

    @classmethod
    def run_acc(cls, run_records: list[dict]) -> Choice | None:
        steps = [cls.step_acc(rs) for _, rs in group_by(run_records, lambda r: r["step"])]
        steps = [s for s in steps if s is not None]
        return _argmax(steps) if steps else None


METHODS: dict[str, type[SelectionMethod]] = {
    m.key: m for m in (IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod,
                       Seed002SelectionMethod)}


def protocol_of(records: list[dict]) -> str:
    """``"70/10/20"`` if the runs use seed 002's split, ``"domainbed"`` otherwise.

    Raises:
        DomainGradError: if the sweep mixes both kinds of runs.
    """
    kinds = {r["args"].get("split_protocol") == SPLIT_70_10_20 for r in records}
    if kinds == {True, False}:
        raise DomainGradError("the sweep mixes runs with args.split_protocol '70/10/20' and DomainBed's in/out "
                              "split; report them from separate sweep directories")
    return SPLIT_70_10_20 if kinds == {True} else "domainbed"


def resolve_methods(selection: str, records: list[dict]) -> list[type[SelectionMethod]]:
    """The methods for ``--selection``: ``auto`` = seed002 for 70/10/20 runs, else DomainBed's
    three (as collect_results prints); ``all`` = DomainBed's three (+ seed002 for 70/10/20 runs).

    Raises:
        DomainGradError: for an unknown name, or seed002 on runs without the 70/10/20 split.
    """
    seed002 = protocol_of(records) == SPLIT_70_10_20
    domainbed = [IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod]
    if selection == "auto":
        return [Seed002SelectionMethod] if seed002 else domainbed
    if selection == "all":
        return domainbed + ([Seed002SelectionMethod] if seed002 else [])
    if selection not in METHODS:
        raise DomainGradError(f"unknown selection method {selection!r}; valid: auto, all, {', '.join(METHODS)}")
    if selection == "seed002" and not seed002:
        raise DomainGradError("--selection seed002 needs runs with args.split_protocol '70/10/20' and "
                              "env{i}_test_acc keys; these runs use DomainBed's in/out split (use iid, loo or oracle)")
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
        out.append(Selected(trial_seed, dataset, algorithm, test_env, choice.record["args"]["hparams_seed"],
                            choice.record["step"], float(choice.val_acc), float(choice.test_acc),
                            in_domain_accuracy(choice.record, test_env)))
    return out
