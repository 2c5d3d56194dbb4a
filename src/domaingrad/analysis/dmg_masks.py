"""DMG's domain-specific masks: which domain each mask serves, how to ensemble them, and
how much they overlap over training.

Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity and Invariance for In and
Out of Domain Generalization", ECCV 2020: Table 4 (the accuracy of the network with each
source domain's mask on each source domain's held-out data and on the target domain,
and the "Combined" prediction), appendix Table 5 (Mask-Ens, one prediction with the
averaged soft masks, against Pred-Ens, the average of the per-mask predictions, in and
out of domain) and appendix Section 7.1 / Fig. 4 (the IoU of pairs of masks binarised
at 0.5), with the soft IoU of Eq. (1) that DMG penalises.

Source columns are the held-out (out) splits of the training environments; target
columns are the test environments' in splits (DomainBed's test accuracy). Each mask row
scales the masked layers by that domain's soft mask m^d (--hard: m^d > 0.5, DMG-KD's
hard variant). The matrix comes from a finished DMG run (--run DIR: its model.pkl, or
--step N: its model_step{N}.pkl) or from a run trained here; the overlaps over training
from the run's model_step{N}.pkl files (else its records' siou / mask_iou_<layer>), or,
for a run trained here, every --every steps.

Writes dmg-masks.json, dmg-masks.csv (long format, column `kind`) and dmg-masks.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..algorithms.dmg import DMG, pairwise_mask_iou, soft_iou
from ..data import Split
from ..errors import DomainGradError
from ..layout import model_step_file
from ..run import TrainingRun
from ._common import (
    Outputs,
    add_output_arguments,
    add_training_arguments,
    load_run,
    model_files,
    new_figure,
    prepare_run,
    run_records,
    training_args,
)

#: the ensemble rows after the per-domain masks (``DMG.PREDICT`` modes)
ENSEMBLES = {"Pred-Ens": "pred_ens", "Pred-Ens (logits)": "pred_ens_logits", "Mask-Ens": "mask_ens"}


@torch.no_grad()
def mask_accuracies(algorithm: DMG, splits: Sequence[Split], hard: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Accuracy of every mask and ensemble on every split (Table 4 with appendix Table 5's
    Mask-Ens row).

    Rows: the D training domains' masks (soft ``m^d`` by
    :meth:`~domaingrad.algorithms.dmg.DMG.predict_each_domain`, or ``m^d > 0.5`` by
    :meth:`~domaingrad.algorithms.dmg.DMG.predict_domain` with ``hard``), then the
    :data:`ENSEMBLES` (always with the soft masks). The algorithm is put in eval mode and
    restored.

    Args:
        algorithm: a DMG with D training domains.
        splits: S splits of the algorithm's dataset.

    Returns:
        (D + 3, S) float64 fractions correct; NaN for an empty split.

    Raises:
        DomainGradError: ``algorithm`` is not a DMG.
    """
    if not isinstance(algorithm, DMG):
        raise DomainGradError(f"the dmg-masks analysis needs a DMG run, got {type(algorithm).__name__}")
    device = next(algorithm.parameters()).device
    rows = algorithm.num_domains + len(ENSEMBLES)
    correct, total = torch.zeros(rows, len(splits), dtype=torch.float64), torch.zeros(len(splits))
    was_training = algorithm.training
    algorithm.eval()
    try:
        for j, split in enumerate(splits):
            for x, y in split.batches(batch_size):
                x, y = x.to(device), y.to(device)
                if hard:
                    each = torch.stack(
                        [algorithm.predict_domain(x, d, hard=True) for d in range(algorithm.num_domains)]
                    )
                else:
                    each = algorithm.predict_each_domain(x)
                soft = algorithm.predict_each_domain(x) if hard else each
                logits = [
                    *each,
                    *(algorithm.combine_domain_logits(soft, m) for m in ENSEMBLES.values() if m != "mask_ens"),
                ]
                logits.append(algorithm.predict_ensemble(x, "mask_ens"))
                correct[:, j] += torch.stack([(out.argmax(1) == y).sum() for out in logits]).double().cpu()
                total[j] += len(y)
    finally:
        algorithm.train(was_training)
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(correct, float("nan")))


def pair_mean(matrix: torch.Tensor) -> float:
    """Mean of a (D, D) pairwise matrix over the D(D-1)/2 pairs i < j; 1.0 for D = 1."""
    i, j = torch.triu_indices(len(matrix), len(matrix), offset=1)
    return float(matrix[i, j].mean()) if len(i) else 1.0


def mask_overlaps(probs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per masked layer: the (D, D) soft IoU of Eq. (1) (:func:`~domaingrad.algorithms.dmg.soft_iou`,
    on the soft masks), the (D, D) IoU of the masks binarised at 0.5
    (:func:`~domaingrad.algorithms.dmg.pairwise_mask_iou`), their means over the
    D(D-1)/2 pairs (1.0 with one domain) and each domain's fraction of active units.

    Args:
        probs: layer -> (D, k) soft masks (``DMG.soft_masks()``).

    Returns:
        layer -> {"siou": (D, D), "iou": (D, D), "mean_siou", "mean_iou", "active": (D,)}.
    """
    out = {}
    for layer, p in probs.items():
        p = p.detach().double().cpu()
        siou, iou = soft_iou(p[:, None], p[None]), pairwise_mask_iou(p).double()
        out[layer] = {
            "siou": siou,
            "iou": iou,
            "mean_siou": pair_mean(siou),
            "mean_iou": pair_mean(iou),
            "active": (p > 0.5).double().mean(1),
        }
    return out


def probs_of_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The soft masks ``sigmoid(mask_logits)`` of a DMG's saved ``model_dict``.

    Raises:
        DomainGradError: the state has no mask logits (not a DMG).
    """
    prefix = "mask_logits."
    probs = {k[len(prefix) :]: torch.sigmoid(v.float()) for k, v in state.items() if k.startswith(prefix)}
    if not probs:
        raise DomainGradError("the saved model has no mask_logits: the dmg-masks analysis needs a DMG run")
    return probs


@dataclass
class DMGMasks:
    """What the analysis measured.

    Attributes:
        rows: row labels (``m^<env>`` per training domain, then :data:`ENSEMBLES`);
        columns: environment names; source: per column, whether it is a training domain;
        accuracy: (rows, columns) fractions correct; step: the checkpoint measured (None:
        model.pkl); hard: the masks binarised at 0.5.
        overlap_steps: checkpoint steps of ``overlaps``; overlaps: per step, layer ->
        ``{"mean_siou", "mean_iou"}`` (from :func:`mask_overlaps`, or from the records:
        ``siou``, the penalty as DMG reduces it, and ``mask_iou_<layer>``);
        overlap_source: "checkpoints", "records" or "this run"; final_overlaps: :func:`mask_overlaps`
        of the measured checkpoint.
    """

    rows: list[str]
    columns: list[str]
    source: list[bool]
    accuracy: torch.Tensor
    step: int | None
    hard: bool
    overlap_steps: list[int] = field(default_factory=list)
    overlaps: list[dict[str, dict[str, float]]] = field(default_factory=list)
    overlap_source: str = "checkpoints"
    final_overlaps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def diagonal(self) -> dict[str, float]:
        """Table 4's claim in numbers: the mean accuracy of each source domain with its own
        mask (DMG-KD) and with the other masks, and per source column own minus the best
        other mask, averaged (positive: the masks are domain-specialised)."""
        d = sum(self.source)
        acc = self.accuracy[:d, [j for j, s in enumerate(self.source) if s]]
        if d < 2:
            own = float(acc.diagonal().mean()) if d else float("nan")
            return {"own": own, "other": float("nan"), "own_minus_best_other": float("nan")}
        mask = ~torch.eye(d, dtype=torch.bool)
        best_other = torch.stack([acc[:, j][mask[:, j]].max() for j in range(d)])
        return {
            "own": float(acc.diagonal().mean()),
            "other": float(acc[mask].mean()),
            "own_minus_best_other": float((acc.diagonal() - best_other).mean()),
        }

    def ensembles(self) -> dict[str, dict[str, float]]:
        """Appendix Table 5: each ensemble's mean accuracy over the source columns
        ("in_domain") and over the target columns ("out_of_domain")."""
        d = self.accuracy.shape[0] - len(ENSEMBLES)
        src = [j for j, s in enumerate(self.source) if s]
        tgt = [j for j, s in enumerate(self.source) if not s]
        mean = lambda row, cols: float(self.accuracy[row, cols].mean()) if cols else float("nan")  # noqa: E731
        return {
            name: {"in_domain": mean(d + i, src), "out_of_domain": mean(d + i, tgt)} for i, name in enumerate(ENSEMBLES)
        }


def evaluation_splits(run: TrainingRun) -> tuple[list[Split], list[str], list[bool]]:
    """The columns: the training environments' out splits, then the test environments'
    in splits; their environment names; whether each is a source domain."""
    names = run.dataset.environment_names
    test = [i for i in range(len(names)) if i not in run.train_envs]
    splits = [run.out_splits[i] for i in run.train_envs] + [run.in_splits[i] for i in test]
    return splits, [names[i] for i in run.train_envs + test], [True] * len(run.train_envs) + [False] * len(test)


def measure(run: TrainingRun, step: int | None, hard: bool = False) -> DMGMasks:
    """The matrix and the final overlaps of a run's DMG at its current weights."""
    splits, columns, source = evaluation_splits(run)
    algorithm = run.algorithm
    if not isinstance(algorithm, DMG):
        raise DomainGradError(f"the dmg-masks analysis needs a DMG run, got {type(algorithm).__name__}")
    accuracy = mask_accuracies(algorithm, splits, hard, run.eval_batch_size)
    rows = [f"m^{columns[d]}" for d in range(algorithm.num_domains)] + list(ENSEMBLES)
    result = DMGMasks(rows, columns, source, accuracy, step, hard)
    result.final_overlaps = mask_overlaps(algorithm.soft_masks())
    return result


def means(overlaps: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """layer -> {"mean_siou", "mean_iou"} of :func:`mask_overlaps`' result."""
    return {layer: {k: o[k] for k in ("mean_siou", "mean_iou")} for layer, o in overlaps.items()}


def overlaps_from_run(run_dir: Path, records: Sequence[dict[str, Any]]) -> tuple[list[int], list[dict], str]:
    """The overlaps over training of a finished run: from its model_step{N}.pkl files
    (exact, every pair) when it has them, else from its records' ``siou`` and
    ``mask_iou_<layer>`` (means since the previous checkpoint)."""
    files = model_files(run_dir)
    if files:
        found = []
        for _, path in files:
            state = torch.load(path, map_location="cpu", weights_only=False)["model_dict"]
            found.append(means(mask_overlaps(probs_of_state(state))))
        return [s for s, _ in files], found, "checkpoints"
    steps, found = [], []
    for r in records:
        layers = {k[len("mask_iou_") :]: {"mean_iou": float(v)} for k, v in r.items() if k.startswith("mask_iou_")}
        if "siou" in r:
            layers["penalty (siou record)"] = {"mean_siou": float(r["siou"])}
        if layers:
            steps.append(int(r["step"]))
            found.append(layers)
    return steps, found, "records"


def analyse_finished_run(
    run_dir: str | Path, step: int | None = None, hard: bool = False, device: str = "cpu"
) -> DMGMasks:
    """:class:`DMGMasks` of a finished DMG run: the matrix of its model.pkl (or of
    model_step{step}.pkl), the overlaps of every checkpoint (:func:`overlaps_from_run`).

    Raises:
        DomainGradError: not a run directory, no such model file, or not a DMG run.
    """
    run_dir = Path(run_dir)
    records = run_records(run_dir)
    loaded = load_run(run_dir if step is None else run_dir / model_step_file(step), device)
    result = measure(loaded.run, step, hard)
    result.overlap_steps, result.overlaps, result.overlap_source = overlaps_from_run(run_dir, records)
    return result


def analyse_fresh_run(run: TrainingRun, every: int, hard: bool = False) -> DMGMasks:
    """Train a prepared DMG run to its end, the overlaps after the update of every step
    ``s`` with ``s % every == 0`` and after the last, then the matrix.

    Raises:
        DomainGradError: not DMG, or ``every < 1``.
    """
    if not isinstance(run.algorithm, DMG):
        raise DomainGradError(f"the dmg-masks analysis needs --algorithm DMG, got {run.args.algorithm}")
    if every < 1:
        raise DomainGradError(f"--every must be >= 1, got {every}")
    steps, found = [], []
    for step in range(run.steps):
        run.train_step()
        if step % every == 0 or step == run.steps - 1:
            steps.append(step)
            found.append(means(mask_overlaps(run.algorithm.soft_masks())))
    result = measure(run, run.steps - 1, hard)
    result.overlap_steps, result.overlaps, result.overlap_source = steps, found, "this run"
    return result


# -- outputs ------------------------------------------------------------------------------


def figure(result: DMGMasks):
    """Three panels: the mask x domain accuracy matrix (Table 4), Pred-Ens against
    Mask-Ens in and out of domain with DMG-KD (appendix Table 5), the overlaps over
    training (appendix Fig. 4-5)."""
    fig, (matrix, bars, curves) = new_figure(3, width=4.6, height=3.8)
    fig.set_dpi(80)  # PNGs small enough for the docs
    acc = result.accuracy.numpy() * 100
    image = matrix.imshow(acc, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(acc):
        matrix.text(
            j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < acc.mean() else "black"
        )
    matrix.set_xticks(
        range(len(result.columns)),
        [c + ("" if s else "\n(target)") for c, s in zip(result.columns, result.source)],
        fontsize=7,
    )
    matrix.set_yticks(range(len(result.rows)), result.rows, fontsize=7)
    matrix.set_xlabel("evaluated on (source: out split; target: in split)")
    matrix.set_ylabel("mask" + (" (m > 0.5)" if result.hard else " (soft)"))
    matrix.set_title("Mask x domain accuracy, % (Table 4)", fontsize=9)
    fig.colorbar(image, ax=matrix, label="accuracy (%)")
    ens, diag = result.ensembles(), result.diagonal()
    names = list(ens)
    width = 0.38
    for k, (part, label) in enumerate(
        (("in_domain", "in-domain (sources)"), ("out_of_domain", "out-of-domain (target)"))
    ):
        bars.bar(np.arange(len(names)) + (k - 0.5) * width, [ens[n][part] * 100 for n in names], width, label=label)
    bars.axhline(diag["own"] * 100, color="k", linestyle="--", label="own mask (DMG-KD), in-domain")
    bars.set_xticks(range(len(names)), names, fontsize=8)
    bars.set_ylabel("accuracy (%)")
    bars.set_title("Pred-Ens vs Mask-Ens (appendix Table 5)", fontsize=9)
    bars.legend(fontsize=7, loc="lower center")
    layers = list(dict.fromkeys(layer for o in result.overlaps for layer in o))
    for index, layer in enumerate(layers):
        for key, style, label in (("mean_siou", "-", "soft IoU"), ("mean_iou", "--", "IoU of m > 0.5")):
            points = [
                (s, o[layer][key]) for s, o in zip(result.overlap_steps, result.overlaps) if key in o.get(layer, {})
            ]
            if points:
                curves.plot(*zip(*points), style, color=f"C{index}", marker=".", label=f"{layer}: {label}")
    curves.set_xlabel(f"step (from {result.overlap_source})")
    curves.set_ylabel("mean over domain pairs")
    curves.set_title("Mask overlap over training (appendix Fig. 4)", fontsize=9)
    curves.legend(fontsize=6)
    fig.suptitle("DMG's domain-specific masks (Chattopadhyay et al., ECCV 2020)", fontsize=10)
    return fig


def summary_and_rows(result: DMGMasks, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """dmg-masks.json's content and dmg-masks.csv's rows."""
    summary = {
        "arguments": arguments,
        "step": result.step,
        "hard_masks": result.hard,
        "rows": result.rows,
        "columns": result.columns,
        "source": result.source,
        "accuracy": result.accuracy,
        "diagonal": result.diagonal(),
        "ensembles": result.ensembles(),
        "final_overlaps": result.final_overlaps,
        "overlaps": {"source": result.overlap_source, "steps": result.overlap_steps, "values": result.overlaps},
    }
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(result.rows):
        for j, column in enumerate(result.columns):
            rows.append(
                {
                    "kind": "accuracy",
                    "mask": row,
                    "domain": column,
                    "source": result.source[j],
                    "accuracy": float(result.accuracy[i, j]),
                }
            )
    for step, layers in zip(result.overlap_steps, result.overlaps):
        for layer, values in layers.items():
            rows.append({"kind": "overlap", "step": step, "layer": layer, **values})
    return summary, rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze dmg-masks``."""
    add = parser.add_argument
    add("--run", metavar="DIR", help="a finished DMG run (default: train one with the options below)")
    add("--step", type=int, help="with --run: the matrix of model_step{N}.pkl (default model.pkl)")
    add("--hard", action="store_true", help="the mask rows use m^d > 0.5 (default: the soft masks m^d)")
    add("--every", type=int, help="a run trained here: overlaps every K steps (default steps/10)")
    add_training_arguments(parser, algorithm=None, dataset="RotatedMNIST", steps=300)
    add_output_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    """Run the analysis from parsed options; prints the matrix summary and the files."""
    outputs = Outputs(ns.output_dir, "dmg-masks", ns.force)
    if ns.run:
        result = analyse_finished_run(ns.run, ns.step, ns.hard, ns.device)
    else:
        run = prepare_run(training_args(ns, algorithm="DMG"))
        result = analyse_fresh_run(run, ns.every or max(1, run.steps // 10), ns.hard)
    summary, rows = summary_and_rows(result, {k: v for k, v in vars(ns).items() if k != "force"})
    diag = result.diagonal()
    print(
        f"own mask on its domain {diag['own']:.4f}, other masks {diag['other']:.4f}, "
        f"own minus best other {diag['own_minus_best_other']:+.4f}"
    )
    for name, values in result.ensembles().items():
        print(f"{name}: in-domain {values['in_domain']:.4f}, out-of-domain {values['out_of_domain']:.4f}")
    for path in outputs.write(summary, rows, figure(result)):
        print(f"wrote {path}")
    return 0


__all__ = ["DMGMasks", "ENSEMBLES", "analyse_finished_run", "analyse_fresh_run", "mask_accuracies", "mask_overlaps"]
