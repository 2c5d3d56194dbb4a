"""A transcription of DomainBed's reporting code, used only as a test oracle.

From facebookresearch/DomainBed (MIT licence): ``domainbed/lib/query.py`` (the parts used),
``domainbed/model_selection.py``, ``domainbed/lib/reporting.py`` (get_grouped_records) and
``domainbed/scripts/collect_results.py`` (format_mean, print_results_tables, returning the
table texts instead of printing them). Kept close to the original line by line so that a
reader can compare; the report package shares no code with it. Transcribed from commit
b93c22a: ``Q.group`` returns its groups sorted by key, ``Q.sorted`` ranks a NaN key as minus
infinity and ``Q.argmax`` is Python's ``max`` -- together they decide ties and NaN, which
``test_domainbed_parity.py`` exercises.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import json

import numpy as np


def hashable(obj):
    try:
        hash(obj)
        return obj
    except TypeError:
        return json.dumps({"_": obj}, sort_keys=True)


def make_selector_fn(selector):
    if isinstance(selector, str):
        if "," in selector:
            parts = selector.split(",")
            return lambda obj: tuple(make_selector_fn(p.strip())(obj) for p in parts)
        if "." in selector:
            parts = selector.split(".")

            def f(obj):
                for p in parts:
                    obj = obj[p]
                return obj

            return f
        return lambda obj: obj[selector]
    return selector


class Q:
    def __init__(self, list_):
        self._list = list_

    def __len__(self):
        return len(self._list)

    def __getitem__(self, key):
        return self._list[key]

    def __iter__(self):
        return iter(self._list)

    def append(self, item):
        self._list.append(item)

    def group(self, selector):
        selector = make_selector_fn(selector)
        groups = {}
        for x in self._list:
            group = selector(x)
            group_key = hashable(group)
            if group_key not in groups:
                groups[group_key] = (group, Q([]))
            groups[group_key][1].append(x)
        return Q([groups[key] for key in sorted(groups.keys())])

    def map(self, fn):
        if len(inspect.signature(fn).parameters) > 1:
            return Q([fn(*x) for x in self._list])
        return Q([fn(x) for x in self._list])

    def select(self, selector):
        selector = make_selector_fn(selector)
        return Q([selector(x) for x in self._list])

    def mean(self):
        return float(np.mean(self._list))

    def filter(self, fn):
        return Q([x for x in self._list if fn(x)])

    def filter_equals(self, selector, value):
        selector = make_selector_fn(selector)
        return self.filter(lambda r: selector(r) == value)

    def filter_not_none(self):
        return self.filter(lambda r: r is not None)

    def argmax(self, selector_fn):
        selector_fn = make_selector_fn(selector_fn)
        return max(self._list, key=selector_fn)

    def unique(self):
        result, result_set = [], set()
        for x in self._list:
            if hashable(x) not in result_set:
                result_set.add(hashable(x))
                result.append(x)
        return Q(result)

    def sorted(self, key=None):
        if key is None:

            def key(x):
                return x

        def key2(x):
            x = key(x)
            if isinstance(x, (np.floating, float)) and np.isnan(x):
                return float("-inf")
            return x

        return Q(sorted(self._list, key=key2))


def get_test_records(records):
    return records.filter(lambda r: len(r["args"]["test_envs"]) == 1)


class SelectionMethod:
    @classmethod
    def hparams_accs(self, records):
        return (
            records.group("args.hparams_seed")
            .map(lambda _, run_records: (self.run_acc(run_records), run_records))
            .filter(lambda x: x[0] is not None)
            .sorted(key=lambda x: x[0]["val_acc"])[::-1]
        )

    @classmethod
    def sweep_acc(self, records):
        _hparams_accs = self.hparams_accs(records)
        if len(_hparams_accs):
            return _hparams_accs[0][0]["test_acc"]
        return None


class OracleSelectionMethod(SelectionMethod):
    @classmethod
    def run_acc(self, run_records):
        run_records = run_records.filter(lambda r: len(r["args"]["test_envs"]) == 1)
        if not len(run_records):
            return None
        test_env = run_records[0]["args"]["test_envs"][0]
        chosen_record = run_records.sorted(lambda r: r["step"])[-1]
        return {"val_acc": chosen_record[f"env{test_env}_out_acc"], "test_acc": chosen_record[f"env{test_env}_in_acc"]}


class IIDAccuracySelectionMethod(SelectionMethod):
    @classmethod
    def _step_acc(self, record):
        test_env = record["args"]["test_envs"][0]
        val_env_keys = []
        for i in itertools.count():
            if f"env{i}_out_acc" not in record:
                break
            if i != test_env:
                val_env_keys.append(f"env{i}_out_acc")
        return {"val_acc": np.mean([record[key] for key in val_env_keys]), "test_acc": record[f"env{test_env}_in_acc"]}

    @classmethod
    def run_acc(self, run_records):
        test_records = get_test_records(run_records)
        if not len(test_records):
            return None
        return test_records.map(self._step_acc).argmax("val_acc")


class LeaveOneOutSelectionMethod(SelectionMethod):
    @classmethod
    def _step_acc(self, records):
        test_records = get_test_records(records)
        if len(test_records) != 1:
            return None
        test_env = test_records[0]["args"]["test_envs"][0]
        n_envs = 0
        for i in itertools.count():
            if f"env{i}_out_acc" not in records[0]:
                break
            n_envs += 1
        val_accs = np.zeros(n_envs) - 1
        for r in records.filter(lambda r: len(r["args"]["test_envs"]) == 2):
            val_env = (set(r["args"]["test_envs"]) - set([test_env])).pop()
            val_accs[val_env] = r[f"env{val_env}_in_acc"]
        val_accs = list(val_accs[:test_env]) + list(val_accs[test_env + 1 :])
        if any([v == -1 for v in val_accs]):
            return None
        val_acc = np.sum(val_accs) / (n_envs - 1)
        return {"val_acc": val_acc, "test_acc": test_records[0][f"env{test_env}_in_acc"]}

    @classmethod
    def run_acc(self, records):
        step_accs = records.group("step").map(lambda step, step_records: self._step_acc(step_records)).filter_not_none()
        if len(step_accs):
            return step_accs.argmax("val_acc")
        return None


def get_grouped_records(records):
    result = collections.defaultdict(lambda: [])
    for r in records:
        for test_env in r["args"]["test_envs"]:
            group = (r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["algorithm"], test_env)
            result[group].append(r)
    return Q(
        [
            {"trial_seed": t, "dataset": d, "algorithm": a, "test_env": e, "records": Q(r)}
            for (t, d, a, e), r in result.items()
        ]
    )


def format_mean(data, latex):
    if len(data) == 0:
        return None, None, "X"
    mean = 100 * np.mean(list(data))
    err = 100 * np.std(list(data) / np.sqrt(len(data)))
    if latex:
        return mean, err, f"{mean:.1f} $\\pm$ {err:.1f}"
    return mean, err, f"{mean:.1f} +/- {err:.1f}"


def results_tables(records, selection_method, alg_names, dataset_names, num_envs, latex=False):
    """print_results_tables, returning {dataset or "Averages": table rows} instead of printing."""
    records = Q(records)
    grouped_records = (
        get_grouped_records(records)
        .map(lambda group: {**group, "sweep_acc": selection_method.sweep_acc(group["records"])})
        .filter(lambda g: g["sweep_acc"] is not None)
    )
    out = {}
    for dataset in dataset_names:
        test_envs = range(num_envs[dataset])
        table = [[None for _ in [*test_envs, "Avg"]] for _ in alg_names]
        for i, algorithm in enumerate(alg_names):
            means = []
            for j, test_env in enumerate(test_envs):
                trial_accs = grouped_records.filter_equals(
                    "dataset, algorithm, test_env", (dataset, algorithm, test_env)
                ).select("sweep_acc")
                mean, err, table[i][j] = format_mean(trial_accs, latex)
                means.append(mean)
            if None in means:
                table[i][-1] = "X"
            else:
                table[i][-1] = f"{sum(means) / len(means):.1f}"
        out[dataset] = table
    table = [[None for _ in [*dataset_names, "Avg"]] for _ in alg_names]
    for i, algorithm in enumerate(alg_names):
        means = []
        for j, dataset in enumerate(dataset_names):
            trial_averages = (
                grouped_records.filter_equals("algorithm, dataset", (algorithm, dataset))
                .group("trial_seed")
                .map(lambda trial_seed, group: group.select("sweep_acc").mean())
            )
            mean, err, table[i][j] = format_mean(trial_averages, latex)
            means.append(mean)
        if None in means:
            table[i][-1] = "X"
        else:
            table[i][-1] = f"{sum(means) / len(means):.1f}"
    out["Averages"] = table
    return out
