"""The angle law of random vectors and the angles of real per-domain gradients.

Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from Perspective of
Gradient Granularity" (CorGrad), ECAI 2024, Sec. 3.2 and Sec. 3.4: the angle between two
random n-dimensional vectors has density p_n(theta) = Gamma(n/2) / (Gamma((n-1)/2)
sqrt(pi)) sin^(n-2)(theta) (eq. 9), concentrates at pi/2 as n grows (variance eq. 10,
Fig. 3), so PCGrad's modification ratio |cos| shrinks with the dimension of the vectors
it compares, and slicing the gradient raises it (Fig. 5).

Part 1 (Fig. 3): eq. (9) and its CDF (eq. 8, closed form), the mean and the variance of
eq. (10) by quadrature, against Monte Carlo angles of pairs of Gaussian vectors: a
Kolmogorov-Smirnov test per n (--dims), the sample mean and variance with their
standard errors.

Part 2 (Fig. 5): per-domain gradients of a model (a finished run with --run, else a
fresh run of --steps steps; 0: the initial network), --draws times one batch per
training domain; the pairwise angles of the domain gradients for the whole network, per
layer (parameter tensor) and per slice (CorGrad's slicing: flat pieces, automatic
count, at least --min-slice elements), with PCGrad's modification ratio and frequency
at each granularity from domaingrad.gradients.surgery.corgrad (domains in index order,
no smoothing).
--no-gradients skips part 2.

Writes angles.json, angles.csv and angles.png (law vs Monte Carlo; variance against n;
angle histograms of the three granularities with the law for their dimension).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import integrate, special, stats
from torch import Tensor

from ..errors import DomainGradError
from ..gradients.per_domain import per_domain_gradients
from ..gradients.surgery import auto_slices, corgrad
from . import _common

GRANULARITIES = ("network", "layer", "slice")

# -- the law (eqs. 8-10) ------------------------------------------------------------------


def _check_dim(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"the dimension n must be an integer >= 2 (the angle of 1-d vectors is 0 or pi), got {n!r}")
    return int(n)


def angle_density(theta: np.ndarray | float, n: int) -> np.ndarray:
    """Eq. (9): density of the angle between two independent isotropic random vectors of
    R^n, ``p_n(theta) = Gamma(n/2) / (Gamma((n-1)/2) sqrt(pi)) sin^(n-2) theta``.

    Args:
        theta: angles in radians, any shape; 0 outside [0, pi].
        n: dimension, an integer >= 2 (n = 2: uniform, 1/pi).

    Returns:
        float64 array of the shape of ``theta`` (per radian).

    Raises:
        ValueError: n is not an integer >= 2.
    """
    n = _check_dim(n)
    t = np.asarray(theta, dtype=np.float64)
    inside = (t >= 0) & (t <= math.pi)
    # the constant through gammaln, finite for large n
    log_c = special.gammaln(n / 2) - special.gammaln((n - 1) / 2) - 0.5 * math.log(math.pi)
    log_p = log_c + special.xlogy(n - 2, np.abs(np.sin(t)))
    return np.where(inside, np.exp(log_p), 0.0)


def angle_cdf(theta: np.ndarray | float, n: int) -> np.ndarray:
    """Eq. (8) in closed form: ``P_n(angle <= theta) = I_{sin^2(theta/2)}((n-1)/2, (n-1)/2)``,
    I the regularised incomplete beta function (``(1 - cos theta) / 2 = sin^2(theta / 2)``
    of a uniform direction is Beta((n-1)/2, (n-1)/2)-distributed).

    Args:
        theta: radians, any shape (clipped to [0, pi]); n: integer >= 2.

    Returns:
        float64 array of the shape of ``theta``, in [0, 1].

    Raises:
        ValueError: n is not an integer >= 2.
    """
    n = _check_dim(n)
    t = np.clip(np.asarray(theta, dtype=np.float64), 0.0, math.pi)
    return special.betainc((n - 1) / 2, (n - 1) / 2, np.sin(t / 2) ** 2)


def angle_moment(n: int, power: int, center: float = math.pi / 2) -> float:
    """``int_0^pi (theta - center)^power p_n(theta) dtheta`` by adaptive quadrature
    (scipy.integrate.quad on [0, pi/2] and [pi/2, pi], where p_n peaks for large n).
    ``angle_moment(n, 2)`` is eq. (10), the variance about the mean pi/2; ``center=0,
    power=1`` the mean.

    Raises:
        ValueError: n is not an integer >= 2.
    """
    n = _check_dim(n)

    def f(t: float) -> float:
        return (t - center) ** power * float(angle_density(t, n))

    halves = ((0.0, math.pi / 2), (math.pi / 2, math.pi))
    return sum(integrate.quad(f, a, b, limit=200, epsabs=1e-13, epsrel=1e-11)[0] for a, b in halves)


def random_angles(n: int, count: int, generator: torch.Generator) -> Tensor:
    """Monte Carlo: the angles of ``count`` pairs of independent N(0, I_n) vectors
    (isotropic, so the angle follows eq. 9), float64, in radians, shape ``(count,)``.
    Drawn in chunks of at most 2^22 numbers from ``generator`` (CPU)."""
    n = _check_dim(n)
    rows = max(1, (1 << 22) // (2 * n))
    out = []
    for start in range(0, count, rows):
        k = min(rows, count - start)
        x, y = torch.randn(2, k, n, generator=generator, dtype=torch.float64).unbind(0)
        cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
        out.append(torch.arccos(cos.clamp(-1.0, 1.0)))
    return torch.cat(out)


@dataclass
class LawCheck:
    """Eq. (9) against ``samples`` Monte Carlo angles in dimension ``n``.

    Attributes:
        ks_statistic, ks_pvalue: Kolmogorov-Smirnov test of the sample against eq. (8)
            (scipy.stats.kstest).
        mean_quad: mean by quadrature (pi/2 by symmetry); mean_mc, mean_se: sample mean
            and its standard error sqrt(Var / samples).
        var_eq10: eq. (10) by quadrature; var_mc: sample variance (about the sample
            mean, ddof 1); var_se: its standard error sqrt((mu4 - Var^2) / samples), mu4
            the fourth central moment by quadrature.
        histogram: density histogram of the sample (``bins + 1`` edges, radians).
    """

    n: int
    samples: int
    ks_statistic: float
    ks_pvalue: float
    mean_quad: float
    mean_mc: float
    mean_se: float
    var_eq10: float
    var_mc: float
    var_se: float
    edges: list[float] = field(repr=False)
    density: list[float] = field(repr=False)


def check_angle_law(dims: Sequence[int] = (2, 3, 10, 100, 1000), samples: int = 20000, seed: int = 0) -> list[LawCheck]:
    """Eqs. (8)-(10) of CorGrad against Monte Carlo, one :class:`LawCheck` per n in ``dims``
    (CorGrad, Sec. 3.2, Fig. 3). The generator is seeded with ``seed`` once, n after n.

    Raises:
        ValueError: a dimension below 2, or ``samples`` < 2.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for n in dims:
        angles = random_angles(n, samples, generator).numpy()
        test = stats.kstest(angles, lambda t, n=n: angle_cdf(t, n))
        var = angle_moment(n, 2)
        spread = 6 * math.sqrt(var)
        density, edges = np.histogram(
            angles, bins=60, range=(max(0.0, math.pi / 2 - spread), min(math.pi, math.pi / 2 + spread)), density=True
        )
        checks.append(
            LawCheck(
                n=int(n),
                samples=samples,
                ks_statistic=float(test.statistic),
                ks_pvalue=float(test.pvalue),
                mean_quad=angle_moment(n, 1, center=0.0),
                mean_mc=float(angles.mean()),
                mean_se=math.sqrt(var / samples),
                var_eq10=var,
                var_mc=float(angles.var(ddof=1)),
                var_se=math.sqrt(max(angle_moment(n, 4) - var**2, 0.0) / samples),
                edges=edges.tolist(),
                density=density.tolist(),
            )
        )
    return checks


def expected_abs_cos(n: int) -> float:
    """E|cos theta| under eq. (9): ``Gamma(n/2) / (sqrt(pi) Gamma((n+1)/2))`` (~ sqrt(2 / (pi
    n))), the mean modification ratio PCGrad would make on random n-vectors that conflict."""
    n = _check_dim(n)
    return math.exp(special.gammaln(n / 2) - special.gammaln((n + 1) / 2) - 0.5 * math.log(math.pi))


# -- real per-domain gradients (Fig. 5) ---------------------------------------------------


def slice_sizes(numel: int, slices: int | str = "auto", min_slice: int = 16) -> list[int]:
    """Sizes of the flat pieces CorGrad cuts a unit of ``numel`` elements into (the rule of
    :func:`domaingrad.gradients.surgery.corgrad` with ``slicing="flat"``): ``n`` =
    :func:`~domaingrad.gradients.surgery.auto_slices` (or ``slices``), at most
    ``max(1, numel // min_slice)``, in ``torch.tensor_split`` sizes."""
    n = auto_slices(numel) if slices == "auto" else int(slices)
    n = min(n, max(1, numel // min_slice), numel)
    q, r = divmod(numel, n)
    return [q + 1] * r + [q] * (n - r)


def _piece_grams(flat: Tensor, sizes: list[int]) -> Tensor:
    """``(P, D, D)`` float64 Gram matrices of consecutive pieces of ``flat`` (D, m), whose
    sizes take at most two values (tensor_split): one batched product per size."""
    flat = flat.to(torch.float64)
    grams, start = [], 0
    for size in dict.fromkeys(sizes):
        count = sizes.count(size)
        block = flat[:, start : start + size * count].reshape(flat.shape[0], count, size)
        grams.append(torch.einsum("dpk,epk->pde", block, block))
        start += size * count
    return torch.cat(grams)


def _pair_angles(gram: Tensor) -> Tensor:
    """Angles (radians, float64) of the pairs i < j of every Gram matrix ``(P, D, D)``:
    shape ``(P, D (D - 1) / 2)``, NaN where a vector is zero."""
    d = gram.shape[-1]
    i, j = torch.triu_indices(d, d, 1)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms[:, i] * norms[:, j]
    cos = torch.where(denom > 0, gram[:, i, j] / denom, torch.full_like(denom, math.nan))
    return torch.arccos(cos.clamp(-1.0, 1.0))


@dataclass
class GranularityAngles:
    """Pairwise angles of the domain gradients at one granularity, pooled over draws.

    Attributes:
        granularity: ``"network"`` (all parameters as one vector), ``"layer"`` (one
            vector per parameter tensor) or ``"slice"`` (CorGrad's pieces).
        vectors: vectors per domain and draw at this granularity.
        angles: ``(K,)`` radians: D (D - 1) / 2 pairs x vectors x draws, those with a zero
            vector (undefined angle) left out; dims: ``(K,)`` their dimension.
        undefined: pairs left out.
        conflict_pairs, mod_freq, mod_ratio: PCGrad at this granularity (corgrad, domains
            in index order, no smoothing), pooled over draws: projections made, their
            frequency (eq. 3) and their mean ratio ``|cos|``.
        random_abs_cos: mean over the angles of E|cos| for random vectors of their
            dimension (:func:`expected_abs_cos`), what eq. (9) predicts for the ratio.
    """

    granularity: str
    vectors: int
    angles: np.ndarray = field(repr=False)
    dims: np.ndarray = field(repr=False)
    undefined: int
    conflict_pairs: float
    mod_freq: float
    mod_ratio: float
    random_abs_cos: float

    def summary(self) -> dict[str, Any]:
        """Everything but the raw angles, with a density histogram (90 bins on [0, pi])."""
        density, edges = np.histogram(self.angles, bins=90, range=(0.0, math.pi), density=len(self.angles) > 0)
        out = {k: v for k, v in asdict(self).items() if k not in ("angles", "dims")}
        dims = self.dims if len(self.dims) else np.zeros(1)
        out.update(
            count=len(self.angles),
            mean_angle=float(np.mean(self.angles)) if len(self.angles) else math.nan,
            std_angle=float(np.std(self.angles)) if len(self.angles) else math.nan,
            obtuse_fraction=float(np.mean(self.angles > math.pi / 2)) if len(self.angles) else math.nan,
            median_dim=float(np.median(dims)),
            histogram_edges=edges.tolist(),
            histogram_density=density.tolist(),
        )
        return out


def gradient_angles(
    grad_sets: Sequence[Sequence[Tensor]], slices: int | str = "auto", min_slice: int = 16
) -> dict[str, GranularityAngles]:
    """Pairwise angles and PCGrad's modification statistics of per-domain gradients at the
    whole-network, per-layer and per-slice granularities (CorGrad, Sec. 3.4, Fig. 5).

    Args:
        grad_sets: one or more draws, each a list with one tensor of shape
            ``(D, *param_t.shape)`` per parameter (``PerDomainGradients.grads``), D >= 2.
        slices, min_slice: CorGrad's slicing (``"auto"`` or pieces per tensor; fewest
            elements a piece may hold), as :func:`~domaingrad.gradients.surgery.corgrad`.

    Returns:
        ``{"network" | "layer" | "slice": GranularityAngles}``.

    Raises:
        ValueError: no draw, fewer than two domains, or malformed gradients (from corgrad).
    """
    if not grad_sets:
        raise ValueError("grad_sets is empty: pass at least one list of per-domain gradients")
    options = {
        "network": {"layerwise": False, "slices": 1},
        "layer": {"layerwise": True, "slices": 1},
        "slice": {"layerwise": True, "slices": slices, "min_slice": min_slice},
    }
    angles: dict[str, list[Tensor]] = {g: [] for g in GRANULARITIES}
    dims: dict[str, list[Tensor]] = {g: [] for g in GRANULARITIES}
    counts = {g: [0.0, 0.0, 0.0] for g in GRANULARITIES}  # projections, their ratio sum, possible
    vectors = {}
    for grads in grad_sets:
        num_domains = int(grads[0].shape[0])
        if num_domains < 2:
            raise ValueError(f"angles need at least two domains' gradients, got D = {num_domains}")
        flats = [g.reshape(num_domains, -1) for g in grads]
        whole = torch.cat(flats, 1)
        units = {
            "network": [(whole, [whole.shape[1]])],
            "layer": [(f, [f.shape[1]]) for f in flats],
            "slice": [(f, slice_sizes(f.shape[1], slices, min_slice)) for f in flats],
        }
        for g, parts in units.items():
            for flat, sizes in parts:
                pair = _pair_angles(_piece_grams(flat, sizes))
                angles[g].append(pair.flatten())
                dims[g].append(torch.tensor(sizes, dtype=torch.float64).repeat_interleave(pair.shape[1]))
            vectors[g] = sum(len(sizes) for _, sizes in parts)
            st = corgrad(grads, order="index", smoothing=None, **options[g]).stats  # type: ignore[arg-type]
            counts[g][0] += st["conflict_pairs"]
            counts[g][1] += st["mod_ratio"] * st["conflict_pairs"]
            counts[g][2] += num_domains * (num_domains - 1) * st["pieces"]
    out = {}
    for g in GRANULARITIES:
        a = torch.cat(angles[g]).cpu().numpy()
        d = torch.cat(dims[g]).numpy()
        keep = ~np.isnan(a)
        projections, ratio_sum, possible = counts[g]
        out[g] = GranularityAngles(
            granularity=g,
            vectors=vectors[g],
            angles=a[keep],
            dims=d[keep],
            undefined=int((~keep).sum()),
            conflict_pairs=projections,
            mod_freq=projections / possible,
            mod_ratio=ratio_sum / projections if projections else 0.0,
            random_abs_cos=_mean_abs_cos(d[keep]),
        )
    return out


def _mean_abs_cos(dims: np.ndarray) -> float:
    """Mean of :func:`expected_abs_cos` over ``dims`` (1 for a 1-element vector)."""
    if not len(dims):
        return math.nan
    values, index = np.unique(dims.astype(np.int64), return_inverse=True)
    return float(np.mean(np.array([expected_abs_cos(int(n)) if n >= 2 else 1.0 for n in values])[index]))


def model_gradient_angles(
    run: Any, draws: int, seed: int, batch_size: int | None = None, slices: int | str = "auto", min_slice: int = 16
) -> dict[str, GranularityAngles]:
    """:func:`gradient_angles` of ``draws`` sets of per-domain gradients of
    ``run.algorithm.network`` (a :class:`~domaingrad.run.TrainingRun`), each from one
    batch of ``batch_size`` (default: the run's) per training domain, drawn from the in
    splits with a generator seeded by ``seed``; computed in training mode, as a step.

    Raises:
        DomainGradError: the algorithm has no ``network`` module (an ERM-style method).
    """
    network = getattr(run.algorithm, "network", None)
    if not isinstance(network, torch.nn.Module):
        raise DomainGradError(
            f"{type(run.algorithm).__name__} has no .network module; the angles need an ERM-style "
            "algorithm (ERM, the surgery methods, Fishr, ...)"
        )
    size = batch_size or run.hparams["batch_size"]
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in network.parameters() if p.requires_grad]
    was_training = network.training
    network.train()
    sets = []
    for _ in range(draws):
        batches = []
        for env in run.train_envs:
            drawn = _common.sample_batch(run.in_splits[env], size, generator)
            if drawn is None:
                raise DomainGradError(f"training environment {env} has no samples in its in split; nothing to measure")
            batches.append((drawn[0].to(run.device), drawn[1].to(run.device)))
        sets.append(per_domain_gradients(network, batches, params=params).grads)
    network.train(was_training)
    return gradient_angles(sets, slices, min_slice)


def _figure(law: list[LawCheck], grads: dict[str, GranularityAngles] | None, title: str):
    figure, axes = _common.new_figure(3 if grads else 2, width=4.6, height=3.6)
    theta = np.linspace(0, math.pi, 721)
    for k, check in enumerate(law):
        color = f"C{k}"
        axes[0].plot(theta, angle_density(theta, check.n), color=color, label=f"eq. (9), n={check.n}")
        axes[0].stairs(check.density, check.edges, color=color, linestyle=":", label=f"Monte Carlo, n={check.n}")
    axes[0].set(xlabel="angle theta (rad)", ylabel="density p_n(theta)", title="Fig. 3: angle of random vectors")
    ns = [c.n for c in law]
    axes[1].plot(ns, [c.var_eq10 for c in law], "o-", label="eq. (10), quadrature")
    axes[1].errorbar(
        ns, [c.var_mc for c in law], yerr=[2 * c.var_se for c in law], fmt="x", label="Monte Carlo (2 s.e.)"
    )
    axes[1].set(
        xscale="log", yscale="log", xlabel="dimension n", ylabel="Var(theta) (rad^2)", title="Eq. (10): variance"
    )
    if grads:
        top = 0.0
        for k, (name, g) in enumerate(grads.items()):
            if len(g.angles):
                n = int(np.median(g.dims))
                label = f"{name} (median n={n}): PCGrad ratio {g.mod_ratio:.3f}"
                h = axes[2].hist(
                    g.angles, 60, range=(0, math.pi), density=True, histtype="step", color=f"C{k}", label=label
                )
                axes[2].plot(theta, angle_density(theta, max(2, n)), "--", color=f"C{k}", lw=0.8)
                top = max(top, float(np.max(h[0])))
        axes[2].set_ylim(0, 1.15 * top or 1)
        axes[2].axvline(math.pi / 2, color="grey", lw=0.5)
        axes[2].set(
            xlabel="angle between domain gradients (rad)",
            ylabel="density",
            title="Fig. 5: real gradients (dashed: eq. 9)",
        )
    for ax in axes:
        ax.legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze angles``."""
    _common.add_output_arguments(parser)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3, 10, 100, 1000], help="dimensions n of part 1")
    parser.add_argument("--samples", type=int, default=20000, help="Monte Carlo pairs per n (default 20000)")
    parser.add_argument("--mc-seed", type=int, default=0, help="seed of the Monte Carlo draws (default 0)")
    parser.add_argument("--no-gradients", action="store_true", help="part 1 only")
    parser.add_argument("--run", default=None, help="a finished `domaingrad train` run directory or model_step{N}.pkl")
    _common.add_training_arguments(parser, dataset="RotatedMNIST", steps=200)  # --steps 0: the initial network
    parser.add_argument("--draws", type=int, default=8, help="batches per domain the angles pool (default 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per domain and draw (default: the run's)")
    parser.add_argument("--slices", default="auto", help="CorGrad's slices per tensor: auto (default) or a number")
    parser.add_argument("--min-slice", type=int, default=16, help="fewest elements a slice holds (default 16)")


def main(ns: argparse.Namespace) -> int:
    """Run ``domaingrad analyze angles``; returns the exit code."""
    slices: int | str = ns.slices if ns.slices == "auto" else int(ns.slices) if ns.slices.isdigit() else 0
    if slices == 0 or ns.draws < 1 or ns.min_slice < 1 or ns.samples < 2 or ns.steps < 0:
        raise DomainGradError(
            "--slices must be 'auto' or a positive integer; --draws, --min-slice >= 1; --samples >= 2; --steps >= 0"
        )
    if any(n < 2 for n in ns.dims):
        raise DomainGradError(f"--dims must all be >= 2 (the angle of 1-d vectors is 0 or pi), got {ns.dims}")
    outputs = _common.Outputs(ns.output_dir, "angles", ns.force)
    summary: dict[str, Any] = {"args": vars(ns)}
    rows: list[dict[str, Any]] = []
    grads, title = None, "CorGrad (Zhou et al., ECAI 2024), Figs. 3 and 5"
    if not ns.no_gradients:  # first, so that a bad run argument fails before the Monte Carlo
        if ns.run:
            loaded = _common.load_run(ns.run, ns.device)
            run, step, source = loaded.run, loaded.step, str(loaded.path)
            if step is None and loaded.records:  # model.pkl: the run's last step
                step = loaded.records[-1]["step"]
        else:  # --steps 0: the initial network
            run = _common.prepare_run(_common.training_args(ns, steps=max(ns.steps, 1)))
            for _ in range(ns.steps):
                run.train_step()
            step, source = ns.steps, f"fresh {run.args.algorithm} run on {run.args.dataset}"
        grads = model_gradient_angles(run, ns.draws, ns.seed, ns.batch_size, slices, ns.min_slice)
        summary["gradients"] = {"source": source, "step": step, **{g: a.summary() for g, a in grads.items()}}
        title += f"; gradients of {run.args.algorithm} on {run.args.dataset}, step {step}"
        for g, a in grads.items():
            rows.append({"part": "gradients", **{k: v for k, v in a.summary().items() if "histogram" not in k}})
            print(
                f"{g:>8}: {a.vectors} vectors/domain, PCGrad mod ratio {a.mod_ratio:.4f}, mod freq {a.mod_freq:.4f}, "
                f"random-vector ratio {a.random_abs_cos:.4f}"
            )
    law = check_angle_law(ns.dims, ns.samples, ns.mc_seed)
    summary["law"] = [asdict(c) for c in law]
    rows += [{"part": "law", **{k: v for k, v in asdict(c).items() if k not in ("edges", "density")}} for c in law]
    print(f"{'n':>6} {'KS D':>8} {'KS p':>8} {'mean':>9} {'eq.(10)':>10} {'MC var':>10}")
    for c in law:
        print(f"{c.n:>6} {c.ks_statistic:8.4f} {c.ks_pvalue:8.3f} {c.mean_mc:9.5f} {c.var_eq10:10.3e} {c.var_mc:10.3e}")
    for path in outputs.write(summary, rows, _figure(law, grads, title)):
        print(f"wrote {path}")
    return 0
