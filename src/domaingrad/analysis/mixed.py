"""Gradient surgery on per-domain batches against randomly mixed batches.

The control experiment of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization
via Gradient Surgery", ICCV 2021, Sec. 4.3, Fig. 4: does surgery help through the
agreement of gradients between domains, or as a regulariser of any gradients? Every
--algorithms method is trained twice per --seeds seed from the same initialisation and
minibatch stream: with hyperparameter surgery_batches "domain" (one batch per training
domain, the method) and "mixed" (the step's batches pooled and dealt out at random in
the same sizes, so every gradient the rule combines mixes the domains). The paper's own
control draws all batches of a step from one randomly chosen domain; this variant keeps
the step's data and removes only the domain structure of the batches.

Compared: the accuracy on the held-out domains over training (the whole test
environment: its in and out splits together; only these are evaluated) and the modification statistics
of the gradients the rule saw (the rule's own, e.g. agree_frac or mod_freq, and the
element-wise and whole-network PCGrad frequencies fine_mod_freq, coarse_mod_freq), as
means over the steps between checkpoints.

Writes mixed.json, mixed.csv (one row per run and checkpoint) and mixed.png (held-out
accuracy over training, final accuracy per method and batches as Fig. 4, conflict
frequencies over training).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..algorithms import algorithm_class
from ..algorithms.surgery import GradientSurgery
from ..errors import DomainGradError
from ..run import TrainArgs
from ..run.evaluation import accuracy
from . import _common

BATCHES = ("domain", "mixed")
#: statistics kept from the records, when the rule returns them
STAT_KEYS = ("loss", "agree_frac", "mask_frac", "mod_freq", "mod_ratio", "coarse_mod_freq", "fine_mod_freq")


@dataclass
class BatchRun:
    """One training run of the comparison.

    Attributes:
        algorithm, batches, seed: what was trained (``batches``: ``surgery_batches``).
        steps: ``(C,)`` checkpoint steps; heldout_acc: ``(C,)`` accuracy on all samples of
            the held-out environments (their in and out splits).
        stats: per key of :data:`STAT_KEYS` the rule returns, ``(C,)`` means over the
            steps since the previous checkpoint (step 0 alone at the first).
    """

    algorithm: str
    batches: str
    seed: int
    steps: list[int]
    heldout_acc: list[float]
    stats: dict[str, list[float]]


def _check_comparable(algorithm: str, test_envs: Sequence[int]) -> None:
    if not issubclass(algorithm_class(algorithm), GradientSurgery):
        raise DomainGradError(
            f"{algorithm} is not a gradient-surgery algorithm (no surgery_batches hyperparameter); "
            "use AgrSum, AgrRand, PCGrad, CorGrad, ANDMask or SANDMask"
        )
    if not test_envs:
        raise DomainGradError("the comparison needs a held-out environment: give --test-envs")


def train_with_batches(args: TrainArgs, batches: str, checkpoint_freq: int) -> BatchRun:
    """Train ``args`` (a surgery algorithm) with ``surgery_batches`` set to ``batches``,
    evaluating at step 0, every ``checkpoint_freq`` steps and at the last step. Nothing
    is written to disk.

    Raises:
        DomainGradError: bad arguments, no test environment, or an algorithm without the
            ``surgery_batches`` hyperparameter (not a gradient-surgery method).
    """
    _check_comparable(args.algorithm, args.test_envs)
    hparams = {**(args.hparams if isinstance(args.hparams, dict) else {}), "surgery_batches": batches}
    run = _common.prepare_run(TrainArgs(**{**asdict(args), "hparams": hparams}))
    held_out = [split for t in args.test_envs for split in (run.in_splits[t], run.out_splits[t])]
    steps: list[int] = []
    heldout: list[float] = []
    stats: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
    since: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
    for step in range(run.steps):
        for key, value in run.train_step().items():
            if key in since:
                since[key].append(value)
        if step % checkpoint_freq == 0 or step == run.steps - 1:
            # only the held-out environments are evaluated (the whole environment: in + out)
            correct = sum(accuracy(run.algorithm, s, run.eval_batch_size, run.device) * len(s) for s in held_out)
            steps.append(step)
            heldout.append(correct / sum(len(s) for s in held_out))
            for key in STAT_KEYS:
                stats[key].append(float(np.mean(since[key])) if since[key] else math.nan)
                since[key] = []
    kept = {k: v for k, v in stats.items() if not all(math.isnan(x) for x in v)}
    return BatchRun(args.algorithm, batches, args.seed, steps, heldout, kept)


def compare_batches(
    base: TrainArgs, algorithms: Sequence[str], seeds: Sequence[int], checkpoint_freq: int
) -> list[BatchRun]:
    """Every algorithm x seed trained with "domain" and with "mixed" batches
    (:func:`train_with_batches`); ``base`` gives the dataset, test envs, steps and
    hyperparameter overrides."""
    for algorithm in algorithms:  # every name checked before anything trains
        _check_comparable(algorithm, base.test_envs)
    runs = []
    for algorithm in algorithms:
        for seed in seeds:
            args = TrainArgs(**{**asdict(base), "algorithm": algorithm, "seed": seed})
            runs += [train_with_batches(args, batches, checkpoint_freq) for batches in BATCHES]
    return runs


def _mean_over_seeds(runs: Sequence[BatchRun], values) -> tuple[list[int], np.ndarray, np.ndarray]:
    stack = np.array([values(r) for r in runs], dtype=np.float64)
    return runs[0].steps, stack.mean(0), stack.std(0)


def _figure(runs: Sequence[BatchRun], dataset: str, test_envs: list[int]):
    figure, axes = _common.new_figure(3, width=4.6, height=3.6)
    algorithms = list(dict.fromkeys(r.algorithm for r in runs))
    style = {"domain": "-", "mixed": "--"}
    for a, algorithm in enumerate(algorithms):
        for b, batches in enumerate(BATCHES):
            group = [r for r in runs if (r.algorithm, r.batches) == (algorithm, batches)]
            steps, mean, std = _mean_over_seeds(group, lambda r: r.heldout_acc)
            label = f"{algorithm}, {batches} batches"
            axes[0].plot(steps, mean, style[batches], color=f"C{a}", label=label)
            axes[1].bar(
                a + 0.4 * b - 0.2,
                mean[-1],
                0.38,
                yerr=std[-1],
                color=f"C{a}",
                alpha=1.0 - 0.5 * b,
                label=label,
                hatch="//" if batches == "mixed" else None,
            )
            if all("fine_mod_freq" in r.stats for r in group):
                _, m, _ = _mean_over_seeds(group, lambda r: r.stats["fine_mod_freq"])
                axes[2].plot(steps, m, style[batches], marker="o", ms=3, color=f"C{a}", label=label)
    envs = ",".join(map(str, test_envs))
    axes[0].set(xlabel="step", ylabel=f"held-out accuracy (env {envs})", title="held-out accuracy over training")
    axes[1].set(
        xticks=range(len(algorithms)),
        xticklabels=algorithms,
        ylabel="final held-out accuracy",
        title=f"Fig. 4 analogue ({len({r.seed for r in runs})} seed(s), std bars)",
    )
    axes[2].set(
        xlabel="step",
        ylabel="fine_mod_freq (element-wise conflicts)",
        title="sign conflicts of the gradients combined",
    )
    for ax in axes:
        ax.legend(fontsize=6)
    figure.suptitle(f"Mansilla et al., ICCV 2021, Fig. 4 control: domain vs mixed batches, {dataset}", fontsize=9)
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze mixed-batches``."""
    _common.add_output_arguments(parser)
    _common.add_training_arguments(parser, algorithm=None, dataset="RotatedMNIST", steps=300)
    parser.add_argument("--algorithms", nargs="+", default=["AgrSum"], help="surgery methods (default AgrSum)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: --seed)")
    parser.add_argument("--checkpoint-freq", type=int, default=50, help="steps between evaluations (default 50)")


def main(ns: argparse.Namespace) -> int:
    """Run ``domaingrad analyze mixed-batches``; returns the exit code."""
    if ns.checkpoint_freq < 1 or ns.steps < 1:
        raise DomainGradError(f"--steps and --checkpoint-freq must be >= 1, got {ns.steps} and {ns.checkpoint_freq}")
    outputs = _common.Outputs(ns.output_dir, "mixed", ns.force)
    base = _common.training_args(ns, algorithm=ns.algorithms[0])
    runs = compare_batches(base, ns.algorithms, ns.seeds or [ns.seed], ns.checkpoint_freq)
    rows: list[dict[str, Any]] = []
    for r in runs:
        for c, step in enumerate(r.steps):
            stats = {k: v[c] for k, v in r.stats.items()}
            rows.append(
                {
                    "algorithm": r.algorithm,
                    "batches": r.batches,
                    "seed": r.seed,
                    "step": step,
                    "heldout_acc": r.heldout_acc[c],
                    **stats,
                }
            )
        means = ", ".join(f"{k} {np.nanmean(v[1:] or v):.4f}" for k, v in r.stats.items() if k != "loss")
        print(
            f"{r.algorithm:>10} {r.batches:>6} seed {r.seed}: held-out accuracy {r.heldout_acc[-1]:.4f}; mean {means}"
        )
    summary = {"args": vars(ns), "runs": [asdict(r) for r in runs]}
    for path in outputs.write(summary, rows, _figure(runs, ns.dataset, list(ns.test_envs))):
        print(f"wrote {path}")
    return 0
