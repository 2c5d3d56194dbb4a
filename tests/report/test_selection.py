"""Model selection on hand-made records whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from domaingrad.errors import DomainGradError
from domaingrad.report.records import load_sweep
from domaingrad.report.selection import (
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
    Split701020SelectionMethod,
    resolve_methods,
    select,
)
from tests.report.conftest import make_record, write_job


def _run(hparams_seed, rows, test_envs=(0,), **kw):
    """Records of one run; rows = (step, in_accs, out_accs)."""
    return [make_record(step, i, o, test_envs=list(test_envs), hparams_seed=hparams_seed, **kw) for step, i, o in rows]


# Two hparams draws, test env 0, three envs.
#   h0: step 0 val (.5+.6)/2=.55 test .10 | step 1 val .70 test .20 | step 2 val .60 test .30 (env0_out .99)
#   h1: step 0 val (.8+.6)/2=.70 test .40 | step 1 val .85 test .50 | step 2 val .50 test .60 (env0_out .40)
H0 = [
    (0, [0.10, 0.9, 0.9], [0.30, 0.5, 0.6]),
    (100, [0.20, 0.9, 0.9], [0.30, 0.7, 0.7]),
    (200, [0.30, 0.9, 0.9], [0.99, 0.6, 0.6]),
]
H1 = [
    (0, [0.40, 0.9, 0.9], [0.30, 0.8, 0.6]),
    (100, [0.50, 0.9, 0.9], [0.30, 0.9, 0.8]),
    (200, [0.60, 0.9, 0.9], [0.40, 0.5, 0.5]),
]


@pytest.fixture
def two_draws(sweep_dir):
    write_job(sweep_dir, "a", _run(0, H0))
    write_job(sweep_dir, "b", _run(1, H1))
    return load_sweep(sweep_dir).records


def test_training_domain_validation_picks_best_checkpoint_then_best_hparams(two_draws):
    # h0's best checkpoint has val .70, h1's has val .85 (step 100) -> reported env0_in_acc .50
    (chosen,) = select(two_draws, IIDAccuracySelectionMethod)
    assert (chosen.hparams_seed, chosen.step) == (1, 100)
    assert chosen.val_acc == pytest.approx(0.85)
    assert chosen.test_acc == pytest.approx(0.50)
    # in-domain (DomainBed records): mean source out-acc at that checkpoint = (.9 + .8) / 2
    assert chosen.in_domain_acc == pytest.approx(0.85)


def test_oracle_uses_last_checkpoint_and_test_env_out_acc(two_draws):
    # last checkpoints: h0 step 200 (env0_out .99, in .30), h1 step 200 (env0_out .40, in .60) -> h0, .30
    (chosen,) = select(two_draws, OracleSelectionMethod)
    assert (chosen.hparams_seed, chosen.step) == (0, 200)
    assert (chosen.val_acc, chosen.test_acc) == (pytest.approx(0.99), pytest.approx(0.30))
    assert chosen.in_domain_acc == pytest.approx(0.6)  # (.6 + .6) / 2 at h0 step 200


def test_ties_are_broken_as_domainbed(sweep_dir):
    # within a run: Python's max keeps the FIRST best checkpoint (step 0, test .11, not step 100's .22);
    # between runs: the highest hparams_seed among the best val (h1, test .33)
    write_job(sweep_dir, "a", _run(0, [(0, [0.11, 0.9, 0.9], [0, 0.7, 0.7]), (100, [0.22, 0.9, 0.9], [0, 0.7, 0.7])]))
    write_job(sweep_dir, "b", _run(1, [(0, [0.33, 0.9, 0.9], [0, 0.7, 0.7])]))
    (chosen,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert chosen.test_acc == pytest.approx(0.33)
    write_job(sweep_dir, "b", _run(1, [(0, [0.33, 0.9, 0.9], [0, 0.6, 0.6])]))
    (chosen,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert (chosen.test_acc, chosen.step) == (pytest.approx(0.11), 0)


def test_leave_one_domain_out(sweep_dir):
    # hparams 0, test env 0: the [0] run reports env0_in; runs [0,1] and [0,2] give env1_in / env2_in.
    #   step 0: val (.6 + .6) / 2 = .60, test .30 ; step 100: val (.7 + .3) / 2 = .50, test .40 -> .30
    write_job(sweep_dir, "h0_t0", _run(0, [(0, [0.30, 0.9, 0.9], [0.5] * 3), (100, [0.40, 0.9, 0.9], [0.5] * 3)]))
    write_job(
        sweep_dir,
        "h0_t01",
        _run(0, [(0, [0.9, 0.6, 0.9], [0.5] * 3), (100, [0.9, 0.7, 0.9], [0.5] * 3)], test_envs=(0, 1)),
    )
    write_job(
        sweep_dir,
        "h0_t02",
        _run(0, [(0, [0.9, 0.9, 0.6], [0.5] * 3), (100, [0.9, 0.9, 0.3], [0.5] * 3)], test_envs=(0, 2)),
    )
    # hparams 1 lacks its [0, 2] run: no LOO score although its val would be 1.0
    write_job(sweep_dir, "h1_t0", _run(1, [(0, [0.99, 0.9, 0.9], [0.5] * 3)]))
    write_job(sweep_dir, "h1_t01", _run(1, [(0, [0.9, 1.0, 0.9], [0.5] * 3)], test_envs=(0, 1)))
    chosen = select(load_sweep(sweep_dir).records, LeaveOneOutSelectionMethod)
    assert [(c.test_env, c.hparams_seed, c.step) for c in chosen] == [(0, 0, 0)]
    assert (chosen[0].val_acc, chosen[0].test_acc) == (pytest.approx(0.60), pytest.approx(0.30))
    # training-domain validation ignores the two-test-env runs: h0 vals .5/.5, h1 val .5 -> last run h1, .99
    (iid,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert (iid.hparams_seed, iid.test_acc) == (1, pytest.approx(0.99))


def test_70_10_20_reports_test_part_of_held_out_domain(sweep_dir):
    # test env 2, 70/10/20 records: val = mean source out (10% validation) accs
    #   h0 step 0: val (.7+.7)/2=.70, env2_test .55 ; step 100: val .60, env2_test .80
    #   h1 step 0: val .65, env2_test .95                      -> h0 step 0: .55 (not env2_in .9)
    write_job(
        sweep_dir,
        "a",
        [
            make_record(0, [0.9, 0.9, 0.9], [0.7, 0.7, 0.1], test_envs=[2], test_accs=[0.8, 0.6, 0.55]),
            make_record(100, [0.9, 0.9, 0.9], [0.6, 0.6, 0.1], test_envs=[2], test_accs=[0.8, 0.6, 0.80]),
        ],
    )
    write_job(
        sweep_dir,
        "b",
        [make_record(0, [0.9, 0.9, 0.9], [0.6, 0.7, 0.1], test_envs=[2], hparams_seed=1, test_accs=[0.8, 0.6, 0.95])],
    )
    records = load_sweep(sweep_dir).records
    assert resolve_methods("auto", records) == [Split701020SelectionMethod]
    (chosen,) = select(records, Split701020SelectionMethod)
    assert (chosen.hparams_seed, chosen.step, chosen.test_acc) == (0, 0, pytest.approx(0.55))
    # DMG's in-domain number on 70/10/20 runs: the source domains' test parts, (.8 + .6) / 2
    assert chosen.in_domain_acc == pytest.approx(0.70)


def test_auto_selection_and_refusals(sweep_dir):
    write_job(sweep_dir, "a", _run(0, H0))
    records = load_sweep(sweep_dir).records
    assert [m.key for m in resolve_methods("auto", records)] == ["iid", "loo", "oracle"]
    with pytest.raises(DomainGradError, match="--selection 70/10/20 needs runs with args.split_protocol"):
        resolve_methods("70/10/20", records)
    write_job(sweep_dir, "b", [make_record(0, [0.9] * 3, [0.7] * 3, test_accs=[0.5] * 3)])
    with pytest.raises(DomainGradError, match="mixes runs"):
        resolve_methods("auto", load_sweep(sweep_dir).records)


# The same validation accuracy for all three methods: a draw's single-test-env run (test env 0)
# has env0_in = the reported accuracy and every out acc = val (training-domain validation:
# (val + val) / 2; oracle: env0_out); its runs [0, 1] and [0, 2] have env1_in / env2_in = val
# (leave-one-out: (val + val) / 2). These halves and quarters are exact, so ties are exact.
METHODS = [IIDAccuracySelectionMethod, OracleSelectionMethod, LeaveOneOutSelectionMethod]


def _draw(sweep_dir, name, hparams_seed, rows):
    """Jobs of one hparams draw; rows = (step, reported, val) in results.jsonl order."""
    write_job(sweep_dir, name, _run(hparams_seed, [(step, [rep, 0.9, 0.9], [val] * 3) for step, rep, val in rows]))
    for other in (1, 2):
        pair = [(step, [val if i == other else 0.9 for i in range(3)], [0.5] * 3) for step, _, val in rows]
        write_job(sweep_dir, f"{name}_0{other}", _run(hparams_seed, pair, test_envs=(0, other)))


def _chosen(sweep_dir, method):
    (chosen,) = select(load_sweep(sweep_dir).records, method)
    return chosen


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.key)
def test_equal_validation_keeps_highest_hparams_seed(sweep_dir, method):
    # three draws with val .5, their jobs named against the hparams order: h2 (.20) in "a", h0 (.00)
    # in "b", h1 (.10) in "c"; DomainBed sorts the draws by hparams_seed, then keeps the last best: h2
    for name, hparams_seed, reported in (("a", 2, 0.20), ("b", 0, 0.00), ("c", 1, 0.10)):
        _draw(sweep_dir, name, hparams_seed, [(0, reported, 0.5)])
    chosen = _chosen(sweep_dir, method)
    assert (chosen.hparams_seed, chosen.test_acc, chosen.val_acc) == (2, 0.20, 0.5)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.key)
def test_nan_validation_counts_as_minus_infinity_between_draws(sweep_dir, method):
    # h0 val .25 (reported .10) beats h1 val NaN (reported .90), although h1 is later and higher
    one, two = sweep_dir / "one", sweep_dir / "two"
    _draw(one, "a", 0, [(0, 0.10, 0.25)])
    _draw(one, "b", 1, [(0, 0.90, math.nan)])
    chosen = _chosen(one, method)
    assert (chosen.hparams_seed, chosen.test_acc, chosen.val_acc) == (0, 0.10, 0.25)
    # every draw NaN: a tie at minus infinity, so the highest hparams_seed (h1 in job "c", .30), not
    # the last job ("d", h0)
    _draw(two, "c", 1, [(0, 0.30, math.nan)])
    _draw(two, "d", 0, [(0, 0.40, math.nan)])
    chosen = _chosen(two, method)
    assert (chosen.hparams_seed, chosen.test_acc) == (1, 0.30) and math.isnan(chosen.val_acc)


def test_checkpoints_within_a_run_as_domainbed(sweep_dir):
    # one draw whose results.jsonl lists step 100 (val .5, reported .20) before step 0 (val .5, .10):
    # training-domain validation takes the first best in record order (step 100), leave-one-out the
    # first best in increasing step (step 0), the oracle the largest step (100)
    _draw(sweep_dir, "a", 0, [(100, 0.20, 0.5), (0, 0.10, 0.5)])
    iid, loo = _chosen(sweep_dir, IIDAccuracySelectionMethod), _chosen(sweep_dir, LeaveOneOutSelectionMethod)
    assert (iid.step, iid.test_acc) == (100, 0.20) and (loo.step, loo.test_acc) == (0, 0.10)
    assert _chosen(sweep_dir, OracleSelectionMethod).step == 100
    # step 100 (val .5, .20) then step 0 (val NaN, .70): in record order the NaN comes second and
    # never wins (training-domain validation: .20); in step order it comes first, and Python's max
    # (DomainBed's Q.argmax) never replaces a NaN first candidate (leave-one-out: step 0, .70)
    _draw(sweep_dir, "a", 0, [(100, 0.20, 0.5), (0, 0.70, math.nan)])
    iid, loo = _chosen(sweep_dir, IIDAccuracySelectionMethod), _chosen(sweep_dir, LeaveOneOutSelectionMethod)
    assert (iid.step, iid.test_acc, iid.val_acc) == (100, 0.20, 0.5)
    assert (loo.step, loo.test_acc) == (0, 0.70) and math.isnan(loo.val_acc)


def test_hparams_seeds_that_cannot_be_ordered_are_refused(sweep_dir):
    _draw(sweep_dir, "a", 0, [(0, 0.10, 0.5)])
    _draw(sweep_dir, "b", "draw-b", [(0, 0.20, 0.5)])
    for method in METHODS:
        with pytest.raises(
            DomainGradError,
            match="cannot order the runs by args.hparams_seed: values 0, 'draw-b' mix integers and strings",
        ):
            select(load_sweep(sweep_dir).records, method)
