"""Model selection on hand-made records whose answers are worked out by hand in the comments."""
from __future__ import annotations

import pytest

from domaingrad.errors import DomainGradError
from domaingrad.report.records import load_sweep
from domaingrad.report.selection import (IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod,
                                         OracleSelectionMethod, Seed002SelectionMethod, resolve_methods, select)
from tests.report.conftest import make_record, write_job


def _run(hparams_seed, rows, test_envs=(0,), **kw):
    """Records of one run; rows = (step, in_accs, out_accs)."""
    return [make_record(step, i, o, test_envs=list(test_envs), hparams_seed=hparams_seed, **kw) for step, i, o in rows]


# Two hparams draws, test env 0, three envs.
#   h0: step 0 val (.5+.6)/2=.55 test .10 | step 1 val .70 test .20 | step 2 val .60 test .30 (env0_out .99)
#   h1: step 0 val (.8+.6)/2=.70 test .40 | step 1 val .85 test .50 | step 2 val .50 test .60 (env0_out .40)
H0 = [(0, [.10, .9, .9], [.30, .5, .6]), (100, [.20, .9, .9], [.30, .7, .7]), (200, [.30, .9, .9], [.99, .6, .6])]
H1 = [(0, [.40, .9, .9], [.30, .8, .6]), (100, [.50, .9, .9], [.30, .9, .8]), (200, [.60, .9, .9], [.40, .5, .5])]


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
    # between runs: sorted(...)[::-1] puts the LAST run with the best val first (job "b", test .33)
    write_job(sweep_dir, "a", _run(0, [(0, [.11, .9, .9], [0, .7, .7]), (100, [.22, .9, .9], [0, .7, .7])]))
    write_job(sweep_dir, "b", _run(1, [(0, [.33, .9, .9], [0, .7, .7])]))
    (chosen,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert chosen.test_acc == pytest.approx(0.33)
    write_job(sweep_dir, "b", _run(1, [(0, [.33, .9, .9], [0, .6, .6])]))
    (chosen,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert (chosen.test_acc, chosen.step) == (pytest.approx(0.11), 0)


def test_leave_one_domain_out(sweep_dir):
    # hparams 0, test env 0: the [0] run reports env0_in; runs [0,1] and [0,2] give env1_in / env2_in.
    #   step 0: val (.6 + .6) / 2 = .60, test .30 ; step 100: val (.7 + .3) / 2 = .50, test .40 -> .30
    write_job(sweep_dir, "h0_t0", _run(0, [(0, [.30, .9, .9], [.5] * 3), (100, [.40, .9, .9], [.5] * 3)]))
    write_job(sweep_dir, "h0_t01", _run(0, [(0, [.9, .6, .9], [.5] * 3), (100, [.9, .7, .9], [.5] * 3)],
                                        test_envs=(0, 1)))
    write_job(sweep_dir, "h0_t02", _run(0, [(0, [.9, .9, .6], [.5] * 3), (100, [.9, .9, .3], [.5] * 3)],
                                        test_envs=(0, 2)))
    # hparams 1 lacks its [0, 2] run: no LOO score although its val would be 1.0
    write_job(sweep_dir, "h1_t0", _run(1, [(0, [.99, .9, .9], [.5] * 3)]))
    write_job(sweep_dir, "h1_t01", _run(1, [(0, [.9, 1.0, .9], [.5] * 3)], test_envs=(0, 1)))
    chosen = select(load_sweep(sweep_dir).records, LeaveOneOutSelectionMethod)
    assert [(c.test_env, c.hparams_seed, c.step) for c in chosen] == [(0, 0, 0)]
    assert (chosen[0].val_acc, chosen[0].test_acc) == (pytest.approx(0.60), pytest.approx(0.30))
    # training-domain validation ignores the two-test-env runs: h0 vals .5/.5, h1 val .5 -> last run h1, .99
    (iid,) = select(load_sweep(sweep_dir).records, IIDAccuracySelectionMethod)
    assert (iid.hparams_seed, iid.test_acc) == (1, pytest.approx(0.99))


def test_seed002_reports_test_part_of_held_out_domain(sweep_dir):
    # test env 2, 70/10/20 records: val = mean source out (10% validation) accs
    #   h0 step 0: val (.7+.7)/2=.70, env2_test .55 ; step 100: val .60, env2_test .80
    #   h1 step 0: val .65, env2_test .95                      -> h0 step 0: .55 (not env2_in .9)
    write_job(sweep_dir, "a", [
        make_record(0, [.9, .9, .9], [.7, .7, .1], test_envs=[2], test_accs=[.8, .6, .55]),
        make_record(100, [.9, .9, .9], [.6, .6, .1], test_envs=[2], test_accs=[.8, .6, .80])])
    write_job(sweep_dir, "b", [make_record(0, [.9, .9, .9], [.6, .7, .1], test_envs=[2], hparams_seed=1,
                                           test_accs=[.8, .6, .95])])
    records = load_sweep(sweep_dir).records
    assert resolve_methods("auto", records) == [Seed002SelectionMethod]
    (chosen,) = select(records, Seed002SelectionMethod)
    assert (chosen.hparams_seed, chosen.step, chosen.test_acc) == (0, 0, pytest.approx(0.55))
    # DMG's in-domain number on 70/10/20 runs: the source domains' test parts, (.8 + .6) / 2
    assert chosen.in_domain_acc == pytest.approx(0.70)


def test_auto_selection_and_refusals(sweep_dir):
    write_job(sweep_dir, "a", _run(0, H0))
    records = load_sweep(sweep_dir).records
    assert [m.key for m in resolve_methods("auto", records)] == ["iid", "loo", "oracle"]
    with pytest.raises(DomainGradError, match="seed002 needs runs with args.split_protocol"):
        resolve_methods("seed002", records)
    write_job(sweep_dir, "b", [make_record(0, [.9] * 3, [.7] * 3, test_accs=[.5] * 3)])
    with pytest.raises(DomainGradError, match="mixes runs"):
        resolve_methods("auto", load_sweep(sweep_dir).records)
