"""The angle law of CorGrad's eqs. (8)-(10) and the angles of real per-domain gradients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from domaingrad.analysis import angles as A
from domaingrad.analysis._common import prepare_run
from domaingrad.cli import main
from domaingrad.gradients import surgery
from domaingrad.run import TrainArgs
from tests.analysis.plots import check_png

DIMS = (2, 3, 10, 100, 1000)


def quad(f, a, b):
    """Integral on [a, b], split at pi/2 where the density peaks."""
    cuts = [a] + [c for c in (math.pi / 2,) if a < c < b] + [b]
    return sum(integrate.quad(f, lo, hi, limit=200, epsabs=1e-13, epsrel=1e-12)[0] for lo, hi in zip(cuts, cuts[1:]))


@pytest.mark.parametrize("n", DIMS)
def test_density_integrates_to_one_and_the_cdf_is_its_integral(n):
    assert quad(lambda t: float(A.angle_density(t, n)), 0, math.pi) == pytest.approx(1, abs=1e-9)
    for theta in (0.2, 1.0, 1.55, math.pi / 2, 1.6, 2.4, 3.0):
        integral = quad(lambda t: float(A.angle_density(t, n)), 0, theta)
        assert float(A.angle_cdf(theta, n)) == pytest.approx(integral, abs=1e-9), theta
    assert A.angle_cdf([0.0, math.pi / 2, math.pi], n).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-12)
    assert A.angle_density([-0.1, math.pi + 0.1], n).tolist() == [0.0, 0.0]


def test_known_cases_n2_uniform_n3_half_sine():
    theta = np.linspace(0, math.pi, 9)
    assert np.allclose(A.angle_density(theta, 2), 1 / math.pi)  # n = 2: uniform on [0, pi]
    assert np.allclose(A.angle_cdf(theta, 2), theta / math.pi)
    assert np.allclose(A.angle_density(theta, 3), np.sin(theta) / 2)
    assert A.angle_moment(2, 2) == pytest.approx(math.pi**2 / 12, rel=1e-10)  # uniform variance
    assert A.angle_moment(3, 2) == pytest.approx(math.pi**2 / 4 - 2, rel=1e-10)
    assert A.expected_abs_cos(2) == pytest.approx(2 / math.pi, rel=1e-12)
    assert A.expected_abs_cos(3) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("n", DIMS)
def test_mean_is_pi_over_two_and_the_variance_shrinks_like_one_over_n(n):
    assert A.angle_moment(n, 1, center=0.0) == pytest.approx(math.pi / 2, abs=1e-9)
    assert A.angle_moment(n, 1) == pytest.approx(0.0, abs=1e-9)  # symmetric about pi/2
    # theta - pi/2 = -arcsin(c), c = cos(theta) with E c^2 = 1/n, E c^4 = 3/(n(n+2)) for a
    # uniform direction; c^2 + c^4/3 <= arcsin(c)^2 <= (pi/2)^2 c^2 bounds eq. (10)
    var = A.angle_moment(n, 2)
    assert 1 / n + 1 / (n * (n + 2)) <= var <= math.pi**2 / (4 * n)


def test_bad_dimensions_are_refused(tmp_path, capsys):
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="integer >= 2"):
            A.angle_density(1.0, bad)
    out = tmp_path / "none"
    assert main(["analyze", "angles", "--output-dir", str(out), "--dims", "1", "--no-gradients"]) != 0
    assert "--dims must all be >= 2" in capsys.readouterr().err and not out.exists()
    assert main(["analyze", "angles", "--output-dir", str(out), "--slices", "many", "--no-gradients"]) != 0
    assert "--slices" in capsys.readouterr().err
    assert main(["analyze", "angles", "--output-dir", str(out), "--steps", "-1"]) != 0
    assert "--steps >= 0" in capsys.readouterr().err


def test_monte_carlo_agrees_with_eqs_8_to_10():
    """At a fixed seed; the bounds are those a correct law fails with probability ~1e-3
    (KS p-value) or ~6e-5 (4 standard errors) per n under fresh seeds, and the KS test has
    the power to reject the neighbouring law (samples of n = 10 against eq. 8 for n = 3)."""
    checks = A.check_angle_law(DIMS, samples=4000, seed=0)
    assert [c.n for c in checks] == list(DIMS)
    for c in checks:
        assert c.ks_pvalue > 1e-3, c
        assert abs(c.mean_mc - math.pi / 2) < 4 * c.mean_se, c
        assert abs(c.var_mc - c.var_eq10) < 4 * c.var_se, c
        assert c.mean_quad == pytest.approx(math.pi / 2, abs=1e-9)
    ten = A.random_angles(10, 4000, torch.Generator().manual_seed(1)).numpy()
    assert stats.kstest(ten, lambda t: A.angle_cdf(t, 3)).pvalue < 1e-6
    assert stats.kstest(ten, lambda t: A.angle_cdf(t, 10)).pvalue > 1e-3
    cos = np.abs(np.cos(ten))
    assert abs(cos.mean() - A.expected_abs_cos(10)) < 4 * cos.std() / math.sqrt(len(cos))


def test_slices_are_corgrads_pieces():
    shapes = [(64, 1, 3, 3), (64,), (128, 64, 3, 3), (10, 128), (10,), (20,)]
    grads = [torch.randn(2, *s, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(shapes)]
    for min_slice in (16, 1, 100):
        sizes = [A.slice_sizes(g[0].numel(), "auto", min_slice) for g in grads]
        assert all(sum(s) == g[0].numel() and max(s) - min(s) <= 1 for s, g in zip(sizes, grads))
        pieces = surgery.corgrad(grads, order="index", smoothing=None, min_slice=min_slice).stats["pieces"]
        assert sum(map(len, sizes)) == pieces
    assert A.slice_sizes(32) == [16, 16] and A.slice_sizes(10) == [10] and len(A.slice_sizes(10**6)) == 100


def test_gradient_angles_known_answers_ratio_falls_from_slice_to_layer_to_network():
    # tensor 0 (32 elements, two slices of 16): slice 1 identical, slice 2 opposite, so the
    # layer's two gradients are orthogonal; tensor 1 (8 elements, one slice): identical
    t0 = torch.stack([torch.ones(32), torch.cat([torch.ones(16), -torch.ones(16)])])
    t1 = torch.ones(2, 8)
    result = A.gradient_angles([[t0, t1]])
    assert sorted(result["slice"].angles.tolist()) == pytest.approx([0.0, 0.0, math.pi], abs=1e-6)
    assert sorted(result["layer"].angles.tolist()) == pytest.approx([0.0, math.pi / 2], abs=1e-6)
    assert result["network"].angles.tolist() == pytest.approx([math.acos(8 / 40)], abs=1e-12)
    assert [result[g].vectors for g in A.GRANULARITIES] == [1, 2, 3]
    assert result["slice"].dims.tolist() == [16, 16, 8]
    # PCGrad: only the opposite slice conflicts (both ways, |cos| 1)
    assert (result["slice"].conflict_pairs, result["slice"].mod_ratio) == (2.0, pytest.approx(1.0))
    assert result["slice"].mod_freq == pytest.approx(2 / 6)
    assert result["layer"].conflict_pairs == 0 == result["network"].conflict_pairs
    # a domain with a zero gradient: its angles are undefined and left out
    zero = A.gradient_angles([[torch.stack([torch.ones(20), torch.zeros(20)])]] * 2)
    assert zero["layer"].undefined == 2 and len(zero["layer"].angles) == 0
    with pytest.raises(ValueError, match="two domains"):
        A.gradient_angles([[torch.ones(1, 20)]])


def test_model_gradient_angles_pool_draws_of_a_run(single_thread):
    run = prepare_run(TrainArgs(dataset="Debug28", test_envs=[0], hparams={"batch_size": 4}))
    result = A.model_gradient_angles(run, draws=3, seed=0)
    params = [p for p in run.algorithm.network.parameters() if p.requires_grad]
    assert result["layer"].vectors == len(params)
    # 2 training domains: one pair per vector and draw
    assert len(result["layer"].angles) + result["layer"].undefined == 3 * len(params)
    assert len(result["network"].angles) == 3
    again = A.model_gradient_angles(run, draws=3, seed=0)
    assert np.array_equal(again["slice"].angles, result["slice"].angles)
    assert run.algorithm.training  # mode restored


def test_cli_end_to_end_writes_files_and_a_plot(tmp_path, capsys, single_thread):

    out = tmp_path / "angles"
    args = ["analyze", "angles", "--output-dir", str(out), "--dims", "2", "10", "--samples", "500"]
    args += [
        "--dataset",
        "Debug28",
        "--test-envs",
        "0",
        "--steps",
        "1",
        "--draws",
        "2",
        "--hparams",
        '{"batch_size": 4}',
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "network" in printed and "slice" in printed and "wrote" in printed
    summary = json.loads((out / "angles.json").read_text())
    assert [c["n"] for c in summary["law"]] == [2, 10]
    assert set(A.GRANULARITIES) <= set(summary["gradients"]) and summary["gradients"]["step"] == 1
    csv_text = (out / "angles.csv").read_text()
    assert csv_text.startswith("part,") and csv_text.count("\nlaw,") == 2 and csv_text.count("\ngradients,") == 3
    check_png(out / "angles.png", wider_than=600)
    assert main(args) != 0 and "--force" in capsys.readouterr().err  # nothing overwritten
