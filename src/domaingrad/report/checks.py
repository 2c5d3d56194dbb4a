"""What the report checks before and after model selection: runs that must not be merged, and why cells are X.

Merging. A DomainBed sweep (Gulrajani and Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021; ``domainbed/scripts/sweep.py``) varies only
:data:`SWEPT_ARGS`, and the hyperparameters that ``hparams_seed`` and ``trial_seed`` draw;
every other train argument (``steps``, ``checkpoint_freq``, ``holdout_fraction``,
``hparams``, ``data_dir``, ``task``, ``split_protocol``, ...) is the same for every job.
The tables average and compare the runs of a dataset as one experiment, so
:func:`mixed_args` finds the runs of a dataset whose other arguments differ: the report
refuses them unless told to merge them anyway. Not compared: :data:`IMPLIED_ARGS`
(DomainBed's ``seed`` is ``seed_hash`` of the swept arguments) and :data:`UNCOMPARED_ARGS`
(where a run writes and how it is executed, which never changes its records' numbers).

X cells. Every selection method scores only runs with a single test environment
(``model_selection.get_test_records``); leave-one-domain-out cross-validation also needs,
for a run with test environment t and every other environment v, the run with test
environments [t, v] of the same algorithm, ``hparams_seed`` and ``trial_seed``: its
validation accuracy at a step is the mean over v of ``env{v}_in_acc`` of those runs at
that step (environment v was held out of their training, so its in split is unseen
data), and a step without all of them gives no number
(``LeaveOneOutSelectionMethod._step_acc`` returns None). A sweep launched with
``--single-test-envs`` has no such runs, and every leave-one-domain-out cell is X.
:func:`x_cell_notes` says which runs are missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .names import count_environments, order_algorithms, order_datasets
from .records import Flag, Sweep
from .selection import LeaveOneOutSelectionMethod, Selected, SelectionMethod, grouped_records, single_test_env

#: the arguments a DomainBed sweep varies from job to job
SWEPT_ARGS = ("dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed")
#: arguments a sweep derives from the swept ones (``seed = seed_hash(dataset, algorithm,
#: test_envs, hparams_seed, trial_seed)`` in DomainBed's and domaingrad's sweeps)
IMPLIED_ARGS = ("seed",)
#: arguments that say where a run writes and how it is executed, never what it computes
UNCOMPARED_ARGS = (
    "output_dir",
    "skip_model_save",
    "save_model_every_checkpoint",
    "device",
    "progress",
    "num_workers",
    "eval_batch_size",
    "channels_last",
    "deterministic",
)

#: how many job names a message shows per value
_SHOWN = 4


def _value_text(name: str, value: object) -> str:
    """A canonical text for an argument's value; ``hparams`` JSON text is parsed and re-sorted."""
    if name == "hparams" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return repr(value)
    if name == "hparams" and not value:
        value = None
    return json.dumps(value, sort_keys=True, default=repr)


def mixed_args(sweep: Sweep) -> list[tuple[str, str, dict[str, list[str]]]]:
    """The arguments in which the runs of one dataset differ, other than the swept ones.

    Compares every argument of the used records' ``args`` except :data:`SWEPT_ARGS`,
    :data:`IMPLIED_ARGS` and :data:`UNCOMPARED_ARGS`; a record without an argument is not
    compared on it (older records lack newer arguments).

    Returns:
        (dataset, argument, {value as JSON text: sorted job ids}) for every argument
        with more than one value, datasets and arguments in sorted order.
    """
    skip = set(SWEPT_ARGS) | set(IMPLIED_ARGS) | set(UNCOMPARED_ARGS)
    job_of = sweep.job_of()
    values: dict[tuple[str, str], dict[str, set[str]]] = {}
    for r in sweep.records:
        dataset = r["args"]["dataset"]
        for name, value in r["args"].items():
            if name not in skip:
                jobs = values.setdefault((dataset, name), {}).setdefault(_value_text(name, value), set())
                jobs.add(job_of.get(id(r), "?"))
    out = []
    for (dataset, name), by_value in sorted(values.items()):
        if len(by_value) > 1:
            out.append((dataset, name, {v: sorted(jobs) for v, jobs in sorted(by_value.items())}))
    return out


def mixed_args_message(root: Path, differences: list[tuple[str, str, dict[str, list[str]]]]) -> str:
    """What :func:`mixed_args` found, naming each argument, its values and the job directories."""
    parts = []
    for dataset, name, by_value in differences:
        shown = []
        for value, jobs in by_value.items():
            more = f" and {len(jobs) - _SHOWN} more" if len(jobs) > _SHOWN else ""
            shown.append(f"{name}={value} in {len(jobs)} job(s) ({', '.join(jobs[:_SHOWN])}{more})")
        parts.append(f"{dataset}: args.{name} differs: " + "; ".join(shown))
    return (
        f"the runs under {root} differ in arguments that a sweep keeps fixed (only "
        f"{', '.join(SWEPT_ARGS)} vary between the jobs of one sweep), so merging them would average and "
        "compare different experiments in one table: " + " | ".join(parts)
    )


def _pairs_text(pairs: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b}]" for a, b in sorted(pairs))


def no_single_test_env_note(records: list[dict]) -> Flag | None:
    """A note for (dataset, algorithm, test env) that have runs, but none with that test env alone.

    Every selection method reports only single-test-env runs (DomainBed's
    ``get_test_records``), so these cells are X under every method.
    """
    singles = {
        (r["args"]["dataset"], r["args"]["algorithm"], r["args"]["test_envs"][0]) for r in single_test_env(records)
    }
    lacking: dict[tuple[str, str], set[int]] = {}
    for r in records:
        for env in r["args"]["test_envs"]:
            key = (r["args"]["dataset"], r["args"]["algorithm"], env)
            if key not in singles:
                lacking.setdefault(key[:2], set()).add(env)
    if not lacking:
        return None
    shown = "; ".join(
        f"{d} {a}: test env {', '.join(map(str, sorted(lacking[(d, a)])))}"
        for d in order_datasets(k[0] for k in lacking)
        for a in order_algorithms(k[1] for k in lacking if k[0] == d)
        if (d, a) in lacking
    )
    return Flag(
        "no_single_test_env",
        "cells are X under every selection method where a test environment has runs only together with "
        "another test environment: every method reports the accuracy of a run whose test_envs is that "
        f"environment alone (DomainBed's get_test_records), and there is none for {shown}. "
        "Launch those runs (--test-envs with that single environment)",
        level="note",
    )


def loo_missing_pairs_note(records: list[dict], selected: list[Selected], method: type[SelectionMethod]) -> Flag | None:
    """A note naming the runs with two test environments that leave-one-domain-out lacks.

    Only for groups (trial seed, dataset, algorithm, test env) with a single-test-env run
    that the method left without a number; ``method`` must be
    :class:`.selection.LeaveOneOutSelectionMethod` (None otherwise).
    """
    if method is not LeaveOneOutSelectionMethod:
        return None
    chosen = {(s.trial_seed, s.dataset, s.algorithm, s.test_env) for s in selected}
    missing: dict[tuple[str, str], set[tuple[int, int]]] = {}
    no_common_step: set[tuple[str, str, int]] = set()
    n_x = n_groups = 0
    for key, group in grouped_records(records):
        singles = single_test_env(group)
        if not singles:
            continue
        n_groups += 1
        if key in chosen:
            continue
        n_x += 1
        trial_seed, dataset, algorithm, test_env = key
        n_envs = count_environments(singles[0])
        need = {(min(test_env, v), max(test_env, v)) for v in range(n_envs) if v != test_env}
        lacked = False
        for hparams_seed in {r["args"]["hparams_seed"] for r in singles}:
            have = {
                (min(r["args"]["test_envs"]), max(r["args"]["test_envs"]))
                for r in group
                if r["args"]["hparams_seed"] == hparams_seed and len(r["args"]["test_envs"]) == 2
            }
            if need - have:
                missing.setdefault((dataset, algorithm), set()).update(need - have)
                lacked = True
        if not lacked:
            no_common_step.add((dataset, algorithm, test_env))
    if not n_x:
        return None
    how_many = "every cell of its tables is X" if n_x == n_groups else f"{n_x} of {n_groups} groups have no number"
    parts = []
    for dataset in order_datasets([k[0] for k in missing] + [k[0] for k in no_common_step]):
        for algorithm in order_algorithms(k[1] for k in missing if k[0] == dataset):
            parts.append(f"{dataset} {algorithm}: test_envs {_pairs_text(missing[(dataset, algorithm)])}")
        for d, algorithm, env in sorted(no_common_step):
            if d == dataset:
                parts.append(
                    f"{dataset} {algorithm} test env {env}: the runs with two test environments exist but share "
                    "no step with the single-test-env run (or a step has two single-test-env records)"
                )
    return Flag(
        "loo_missing_pairs",
        f"{method.name}: {how_many}. It scores a run with test environment t at a step by the mean, over every "
        "other environment v, of env{v}_in_acc of the run with test_envs [t, v] (same algorithm, hparams_seed and "
        "trial_seed, same step), so it needs runs with two test environments; missing: "
        + "; ".join(parts)
        + ". Launch the sweep without --single-test-envs (DomainBed's default) to run them",
        level="note",
    )
