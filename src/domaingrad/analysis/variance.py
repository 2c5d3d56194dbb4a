"""``domaingrad analyze gradient-variance``: the distance between per-domain gradient variances.

Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution
Generalization", ICML 2022: Fishr penalises the distance between the training domains'
variances of per-sample gradients. For domain d with per-sample gradients ``g_i`` (of each
sample's own cross-entropy, with respect to the classifier's weight and bias), the
variance is ``v_d = mean_i (g_i - mean_i g_i)^2`` (per coordinate, divided by n) and the
distance is ``(1/D) sum_d mean_k (v_d[k] - vbar[k])^2`` with ``vbar`` the mean of the
``v_d`` (DomainBed's normalisation, the Fishr algorithm's default ``fishr_penalty``
"domainbed", without its moving average), or with ``--normalization irm_setup`` the sum
over domains and coordinates (the Fishr repository's Colored MNIST script).

The command trains one run per ``--algorithms`` entry (same data, splits, seed and
initial weights) and measures, every ``--every`` steps (and at steps 0 and the last), the
distance on fresh batches of ``--batch-size`` samples per source domain, for ANY
algorithm whose model is a featurizer followed by a classifier, so that ERM and Fishr
can be compared. ``--hparams`` applies to every algorithm, ``--algorithm-hparams NAME
JSON`` to one (e.g. Fishr's ``penalty_anneal_iters``: by default 1500, so a shorter run of
Fishr never switches its penalty on). Writes gradient-variance.json, gradient-variance.csv
and gradient-variance.png (the distance and the mean variance over training, one curve
per algorithm).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DomainGradError
from ..gradients.per_sample import linear_cross_entropy_per_sample_gradients, per_sample_gradients
from ..hparams import parse_hparams_json
from ..rng import seed_hash
from ..run import TrainingRun
from ._common import (
    Outputs,
    add_output_arguments,
    add_training_arguments,
    new_figure,
    prepare_run,
    sample_batch,
    training_args,
)
from .similarity import measurement_steps

NAME = "gradient-variance"
NORMALIZATIONS = ("domainbed", "irm_setup")
Normalization = Literal["domainbed", "irm_setup"]
#: the figure's title prefix: the paper whose penalty is measured
FIGURE = "Rame et al. (ICML 2022), the Fishr penalty"


@dataclass
class VarianceDistance:
    """Result of :func:`variance_distance`.

    Attributes:
        variances: (D, K) per-domain centred variances ``v_d`` of the gradients, in the
            gradients' units squared.
        distance: the penalty value: ``(1/D) sum_d mean_k (v_d - vbar)^2`` ("domainbed") or
            ``sum_d sum_k (v_d - vbar)^2`` ("irm_setup"); units of ``v`` squared.
        per_domain: ``mean_k (v_d - vbar)^2`` of each domain d ("domainbed") or its sum
            over k ("irm_setup"); ``distance`` is their mean, resp. sum.
        mean_variance: ``mean_{d,k} v_d[k]``, the scale against which ``distance`` reads.
    """

    variances: Tensor
    distance: float
    per_domain: list[float]
    mean_variance: float


def gradient_variances(grads: Sequence[Tensor]) -> Tensor:
    """Per-domain centred variances of per-sample gradients: ``grads[d]`` of shape
    (n_d, K) -> (D, K), ``v_d = mean_i (g_i - mean_i g_i)^2`` (divided by n_d, as Fishr).

    Raises:
        ValueError: no domain, a tensor that is not (n, K) with n >= 1, or K differing.
    """
    grads = list(grads)
    if not grads:
        raise ValueError("give the per-sample gradients of at least one domain, as (n_d, K) tensors")
    shapes = [tuple(g.shape) for g in grads]
    if any(len(s) != 2 or s[0] < 1 for s in shapes) or len({s[1] for s in shapes}) != 1:
        raise ValueError(f"expected one (n_d, K) tensor per domain with n_d >= 1 and a common K, got shapes {shapes}")
    return torch.stack([(g - g.mean(dim=0, keepdim=True)).pow(2).mean(dim=0) for g in grads])


def variance_distance(grads: Sequence[Tensor], normalization: Normalization = "domainbed") -> VarianceDistance:
    """The distance between the domains' gradient variances that Fishr penalises (Rame,
    Dancette, Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution
    Generalization", ICML 2022: the squared distance of each domain's variance from the
    mean variance), without the moving average of DomainBed's implementation.

    Args:
        grads: per domain, the per-sample gradients, shape (n_d, K) (e.g. from
            :func:`classifier_gradients`).
        normalization: "domainbed" (default; DomainBed's Fishr and this library's
            ``Fishr`` with ``fishr_penalty`` "domainbed" and ``ema`` 0): ``(1/D) sum_d
            mean_k (v_d - vbar)^2``; "irm_setup" (the Fishr repository's Colored MNIST
            script, ``fishr_penalty`` "irm_setup"): ``sum_d sum_k (v_d - vbar)^2``, D*K times
            as large. The two differ by a constant factor, so curves compare alike.

    Returns:
        :class:`VarianceDistance`; 0 when all domains have the same variances.

    Raises:
        ValueError: as :func:`gradient_variances`, or an unknown ``normalization``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    variances = gradient_variances(grads)
    squared = (variances - variances.mean(dim=0, keepdim=True)).pow(2)
    if normalization == "domainbed":
        per_domain = squared.mean(dim=1)
        distance = per_domain.mean()
    else:
        per_domain = squared.sum(dim=1)
        distance = per_domain.sum()
    return VarianceDistance(variances.detach(), float(distance), per_domain.tolist(), float(variances.mean()))


def classifier_gradients(classifier: nn.Module, features: Tensor, targets: Tensor) -> Tensor:
    """Per-sample gradients of each sample's cross-entropy (not divided by the batch size)
    with respect to the classifier's trainable parameters, flattened and concatenated in
    ``named_parameters()`` order: (N, F) features and (N,) targets -> (N, K), detached.

    The gradients Fishr's variances are taken of: for an ``nn.Linear`` the exact closed
    form ``(softmax - onehot) outer features`` (and ``softmax - onehot`` for the bias),
    otherwise :func:`~domaingrad.gradients.per_sample.per_sample_gradients` (``torch.func``).

    Raises:
        ValueError: a classifier without trainable parameters, or bad shapes (see the
            per-sample functions).
    """
    names = [n for n, p in classifier.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the classifier has no trainable parameter: there is no gradient to measure")
    with torch.no_grad():
        if isinstance(classifier, nn.Linear) and len(names) == len(list(classifier.parameters())):
            logits = classifier(features)
            grad_weight, grad_bias = linear_cross_entropy_per_sample_gradients(
                features, logits, targets, has_bias=classifier.bias is not None
            )
            return torch.cat([grad_weight.flatten(1)] + ([grad_bias] if grad_bias is not None else []), dim=1)
    grads = per_sample_gradients(
        classifier, features, targets, lambda out, y: F.cross_entropy(out, y), params=names, create_graph=False
    )
    return torch.cat([grads[n].flatten(1) for n in names], dim=1)


def algorithm_variance_distance(
    algorithm: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], normalization: Normalization = "domainbed"
) -> VarianceDistance:
    """:func:`variance_distance` of an algorithm's classifier gradients on one (x, y) batch
    per domain (x (n_d, *input_shape), y (n_d,)), features from ``algorithm.featurizer``.
    The algorithm is used in its current mode (call ``eval()`` for no side effects).

    Raises:
        DomainGradError: the algorithm has no ``featurizer`` and ``classifier`` modules.
    """
    featurizer, classifier = getattr(algorithm, "featurizer", None), getattr(algorithm, "classifier", None)
    if not isinstance(featurizer, nn.Module) or not isinstance(classifier, nn.Module):
        raise DomainGradError(
            f"{type(algorithm).__name__} has no `featurizer` and `classifier` modules, so its classifier "
            "gradients (what Fishr penalises) are not defined; use an algorithm with one classifier, such as "
            "ERM, Fishr, IRM, VREx or the surgery methods"
        )
    with torch.no_grad():
        features = [featurizer(x) for x, _ in batches]
    return variance_distance(
        [classifier_gradients(classifier, f, y) for f, (_, y) in zip(features, batches)], normalization
    )


@dataclass
class VarianceCurve:
    """Result of :func:`variance_over_training` for one algorithm.

    Attributes:
        algorithm: its name; steps: updates done before each measurement.
        distance, per_domain, mean_variance: the :class:`VarianceDistance` fields at each
            measurement; loss: the ``loss`` the update just before logged (NaN at step 0;
            for penalty methods such as Fishr it includes the weighted penalty).
        penalty_from: the update from which the algorithm's penalty weight is on (its
            ``penalty_anneal_iters``), None for algorithms without one.
    """

    algorithm: str
    penalty_from: int | None = None
    steps: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    per_domain: list[list[float]] = field(default_factory=list)
    mean_variance: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


def variance_over_training(
    run: TrainingRun,
    every: int,
    batch_size: int | None = None,
    normalization: Normalization = "domainbed",
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> VarianceCurve:
    """Train ``run`` and measure :func:`algorithm_variance_distance` every ``every``
    steps (step 0, then after every ``every`` updates, and after the last), on batches of
    ``batch_size`` (default the run's ``batch_size``) samples per source domain, drawn
    without replacement from the training (in) splits by a generator of its own (seeded
    from ``seed``, default the run's), in eval mode: the training itself is unchanged.

    Raises:
        DomainGradError: ``every`` < 1, ``batch_size`` < 2 (a variance needs two samples),
            or an algorithm without featurizer and classifier.
    """
    if every < 1:
        raise DomainGradError(f"--every must be >= 1 (measure every k-th step), got {every}")
    size = run.hparams["batch_size"] if batch_size is None else batch_size
    if size < 2:
        raise DomainGradError(f"--batch-size must be >= 2 (a variance over samples needs two), got {size}")
    generator = torch.Generator().manual_seed(seed_hash(run.args.seed if seed is None else seed, NAME))
    splits = [run.in_splits[i] for i in run.train_envs]
    anneal = run.hparams.get("penalty_anneal_iters")
    curve = VarianceCurve(run.args.algorithm, anneal if isinstance(anneal, int) else None)
    done, loss = 0, float("nan")
    for step in measurement_steps(run.steps, every):
        while done < step:
            loss = float(run.train_step().get("loss", float("nan")))
            done += 1
        batches = []
        for split in splits:
            drawn = sample_batch(split, size, generator)
            assert drawn is not None  # training splits are never empty
            batches.append((drawn[0].to(run.device), drawn[1].to(run.device)))
        was_training = run.algorithm.training
        run.algorithm.eval()
        try:
            result = algorithm_variance_distance(run.algorithm, batches, normalization)
        finally:
            run.algorithm.train(was_training)
        curve.steps.append(step)
        curve.distance.append(result.distance)
        curve.per_domain.append(result.per_domain)
        curve.mean_variance.append(result.mean_variance)
        curve.loss.append(loss)
        if log is not None:
            log(f"  step {step:>5}  distance {result.distance:.4e}  mean variance {result.mean_variance:.4e}")
    return curve


# -- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze gradient-variance``."""
    add_training_arguments(parser, algorithm=None, dataset="ColoredMNIST", steps=300)
    parser.add_argument(
        "--algorithms", nargs="+", default=["ERM", "Fishr"], help="one run and curve per algorithm (default ERM Fishr)"
    )
    parser.add_argument(
        "--algorithm-hparams",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "JSON"),
        help="hyperparameter overrides for one algorithm of --algorithms, on top of --hparams (repeatable), "
        "e.g. Fishr '{\"penalty_anneal_iters\": 0}'",
    )
    parser.add_argument("--every", type=int, default=10, help="measure every k-th step (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples per source domain per measurement (default: batch_size)"
    )
    parser.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default="domainbed",
        help="domainbed: mean over domains and coordinates (Fishr's default penalty); irm_setup: their sum",
    )
    add_output_arguments(parser)


def algorithm_overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The hyperparameter overrides of each algorithm: ``--hparams`` updated with its
    ``--algorithm-hparams``.

    Raises:
        DomainGradError: a duplicated algorithm, or ``--algorithm-hparams`` for an
            algorithm not in ``--algorithms``, or bad JSON.
    """
    algorithms = list(ns.algorithms)
    if len(set(algorithms)) != len(algorithms):
        raise DomainGradError(f"--algorithms lists an algorithm twice: {algorithms}")
    common = parse_hparams_json(ns.hparams) if ns.hparams else {}
    overrides = {a: dict(common) for a in algorithms}
    for name, text in ns.algorithm_hparams:
        if name not in overrides:
            raise DomainGradError(
                f"--algorithm-hparams names {name!r}, which is not in --algorithms ({', '.join(algorithms)})"
            )
        overrides[name].update(parse_hparams_json(text))
    return overrides


def plot_curves(curves: Sequence[VarianceCurve], dataset: str, normalization: str):
    """Two panels: the variance distance and the mean variance against the training step,
    one curve per algorithm (log scale where every value is positive); a dotted line where
    an algorithm's penalty weight switches on."""
    figure, (left, right) = new_figure(2, width=4.8, height=3.4)
    for curve in curves:
        (line,) = left.plot(curve.steps, curve.distance, marker=".", label=curve.algorithm)
        right.plot(curve.steps, curve.mean_variance, marker=".", label=curve.algorithm, color=line.get_color())
        if curve.penalty_from is not None and 0 < curve.penalty_from < curve.steps[-1]:
            for ax in (left, right):
                ax.axvline(curve.penalty_from, color=line.get_color(), linestyle=":", linewidth=1)
            left.plot([], [], color=line.get_color(), linestyle=":", label=f"{curve.algorithm}: penalty on")
    for ax, values, title, label in (
        (
            left,
            [v for c in curves for v in c.distance],
            "distance between the domains' variances",
            f"variance distance ({normalization})",
        ),
        (right, [v for c in curves for v in c.mean_variance], "scale: mean variance", "mean gradient variance"),
    ):
        if values and all(v > 0 and math.isfinite(v) for v in values):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{FIGURE}: per-domain classifier-gradient variances over training ({dataset})", fontsize=10)
    return figure


def main(ns: argparse.Namespace) -> int:
    """Run ``domaingrad analyze gradient-variance``; prints the measurements and a summary."""
    overrides = algorithm_overrides(ns)
    outputs = Outputs(ns.output_dir, NAME, ns.force)
    curves = []
    for algorithm, hparams in overrides.items():
        args = training_args(ns, algorithm=algorithm, hparams=hparams or None)
        run = prepare_run(args)
        anneal = run.hparams.get("penalty_anneal_iters")
        if isinstance(anneal, int) and anneal >= run.steps:
            print(
                f"note: {algorithm}'s penalty_anneal_iters is {anneal} >= {run.steps} steps, so its penalty "
                f"weight is 0 for the whole run; lower it with "
                f"--algorithm-hparams {algorithm} '{{\"penalty_anneal_iters\": N}}'",
                file=sys.stderr,
            )
        print(f"{algorithm} on {ns.dataset}, test env(s) {list(run.args.test_envs)}:")
        curves.append(variance_over_training(run, ns.every, ns.batch_size, ns.normalization, log=print))
    rows = [
        {"algorithm": c.algorithm, "step": s, "distance": d, "mean_variance": mv, "loss": lo}
        | {f"domain{k}_distance": v for k, v in enumerate(pd)}
        for c in curves
        for s, d, pd, mv, lo in zip(c.steps, c.distance, c.per_domain, c.mean_variance, c.loss)
    ]
    summary: dict[str, Any] = {
        "analysis": NAME,
        "figure": FIGURE,
        "arguments": {k: v for k, v in vars(ns).items() if k != "force"},
        "hparams_overrides": overrides,
        "algorithms": {},
    }
    for c in curves:
        summary["algorithms"][c.algorithm] = {
            "steps": c.steps,
            "distance": c.distance,
            "per_domain": c.per_domain,
            "mean_variance": c.mean_variance,
            "loss": c.loss,
            "penalty_from": c.penalty_from,
            "mean_distance": sum(c.distance) / len(c.distance),
            "final_distance": c.distance[-1],
        }
        print(
            f"{c.algorithm}: distance at step 0 {c.distance[0]:.4e}, at step {c.steps[-1]} {c.distance[-1]:.4e}, "
            f"mean {summary['algorithms'][c.algorithm]['mean_distance']:.4e}"
        )
    for path in outputs.write(summary, rows, plot_curves(curves, ns.dataset, ns.normalization)):
        print(f"wrote {path}")
    return 0


__all__ = [
    "NORMALIZATIONS",
    "VarianceCurve",
    "VarianceDistance",
    "add_arguments",
    "algorithm_overrides",
    "algorithm_variance_distance",
    "classifier_gradients",
    "gradient_variances",
    "main",
    "plot_curves",
    "variance_over_training",
]
