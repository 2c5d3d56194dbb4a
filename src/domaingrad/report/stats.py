"""Paired Wilcoxon signed-rank tests of each algorithm against a baseline, as Mansilla et al. do.

Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery", ICCV
2021, Sec. 4.4, Fig. 3, Table 1: 20 independent runs per
(dataset, method, held-out domain); "the paired Wilcoxon test ... in terms of mean
difference (with a significance level of 0.05)" between Deep-All (ERM) and each other
method, per held-out domain; an asterisk marks p < 0.05. Here the paired samples are the
selected accuracies of the algorithm and of the baseline for the same (dataset, test env,
trial seed): runs with the same trial seed share the in/out splits, as the paper's runs
share the 70/10/20 split. Two-sided test, ``scipy.stats.wilcoxon`` with its defaults
(exact distribution for small samples without ties).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

from .selection import Selected
from .tables import Table

#: the significance level of Mansilla et al. (ICCV 2021, Sec. 4.4)
ALPHA = 0.05


@dataclass(frozen=True)
class PairedTest:
    """One Wilcoxon test: ``algorithm`` vs ``baseline`` on one (dataset, test env).

    ``differences`` are algorithm minus baseline accuracies (fractions) in trial-seed
    order; ``p_value`` is None when there is no pair.
    """

    dataset: str
    test_env: int
    algorithm: str
    baseline: str
    metric: str
    trial_seeds: list[int]
    differences: list[float]
    statistic: float | None
    p_value: float | None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def smallest_p_value(n_pairs: int) -> float:
    """The smallest p-value :func:`paired_tests` can give with ``n_pairs`` pairs, whatever the accuracies.

    Computed with the test itself (``scipy.stats.wilcoxon`` with its defaults, two-sided):
    the most extreme samples, all ``n_pairs`` differences of one sign, once with distinct
    magnitudes (the exact distribution: 2 / 2**n) and once all equal (ties, which
    some scipy versions test with the normal approximation); the smaller p-value. Zero
    differences are dropped by the test, so they can only raise it. 1.0 for no pair.
    """
    if n_pairs < 1:
        return 1.0
    return _smallest_p_value(n_pairs)


@functools.cache
def _smallest_p_value(n_pairs: int) -> float:
    from scipy import stats  # only needed with --baseline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about tiny samples
        distinct = stats.wilcoxon([float(i) for i in range(1, n_pairs + 1)]).pvalue
        tied = stats.wilcoxon([1.0] * n_pairs).pvalue
    return float(min(distinct, tied))


def pairs_needed(alpha: float = ALPHA, most: int = 50) -> int | None:
    """The fewest pairs with which :func:`paired_tests` can give p < ``alpha`` (None if more than ``most``)."""
    return next((n for n in range(1, most + 1) if smallest_p_value(n) < alpha), None)


def paired_tests(selected: list[Selected], baseline: str, metric: str = "test_acc") -> list[PairedTest]:
    """Wilcoxon signed-rank test of every algorithm against ``baseline`` per (dataset, test env),
    pairing the selected numbers (``metric`` of :class:`Selected`) by trial seed."""
    from scipy import stats  # imported here: scipy is only needed with --baseline

    table: dict[tuple[str, int, str], dict[int, float]] = {}
    for s in selected:
        table.setdefault((s.dataset, s.test_env, s.algorithm), {})[s.trial_seed] = getattr(s, metric)
    tests = []
    for (dataset, test_env, algorithm), values in sorted(table.items(), key=lambda kv: repr(kv[0])):
        reference = table.get((dataset, test_env, baseline))
        if algorithm == baseline or reference is None:
            continue
        seeds = sorted(set(values) & set(reference))
        diffs = [values[t] - reference[t] for t in seeds]
        statistic = p_value = None
        if seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy warns for all-zero differences and tiny samples
                result = stats.wilcoxon([values[t] for t in seeds], [reference[t] for t in seeds])
            statistic, p_value = float(result.statistic), float(result.pvalue)
            p_value = None if math.isnan(p_value) else p_value
        tests.append(PairedTest(dataset, test_env, algorithm, baseline, metric, seeds, diffs, statistic, p_value))
    return tests


def attach_p_values(tables: list[Table], tests: list[PairedTest]) -> None:
    """Store each test's p-value in the matching per-dataset table cell (``Cell.p_value``)."""
    by_key = {(t.dataset, t.test_env, t.algorithm): t.p_value for t in tests}
    for table in tables:
        if table.dataset is None:
            continue
        for algorithm, row in zip(table.rows, table.cells):
            for env, cell in enumerate(row):
                cell.p_value = by_key.get((table.dataset, env, algorithm))


def too_few_pairs_note(tests: list[PairedTest]) -> str | None:
    """A warning when some test cannot reach p < 0.05 because it has too few pairs (:func:`smallest_p_value`)."""
    small = sorted(
        {len(t.trial_seeds) for t in tests if t.trial_seeds and smallest_p_value(len(t.trial_seeds)) >= ALPHA}
    )
    if not small:
        return None
    n = small[-1]
    return (
        f"some tests pair only {', '.join(map(str, small))} trial seed(s): with n pairs the smallest p-value of "
        f"the two-sided Wilcoxon test used is 2/2^n with its exact distribution ({smallest_p_value(n):.4f} for "
        f"n={n}), so p < {ALPHA} needs at least "
        f"{pairs_needed()} trials (Mansilla et al., ICCV 2021, use 20 runs)"
    )
