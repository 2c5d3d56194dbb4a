"""GSNR of parameters, and the masked-feature loss difference over training.

Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain Generalization Guided by
Gradient Signal to Noise Ratio of Parameters", ICCV 2023 (and its supplementary material).

GSNR of parameter j: mean_i(g_ij)^2 / (var_i(g_ij) + eps) over per-sample gradients g_i
of the cross-entropy (unbiased variance, eps 1e-7 as in the supplement's Listing 2), on
the same --samples inputs of each training domain, at the checkpoints of finished runs
(--run DIR ...: their model_step{N}.pkl files of `domaingrad train
--save-model-every-checkpoint`, else model.pkl) or of a run trained here; network in eval
mode. Histograms per layer over log-spaced bins; the first bin also holds the values below
it (zeros included), so a layer's counts sum to its parameter count.

Loss difference Gamma(theta(t)) = |h(theta, z) - h(theta, z~)| between the mean loss on
the unmasked features z and on the masked features z~ of each step (supplement, Section 2,
Fig. 1, where h is the sum over the batch): RSC, GSNRDropBlock and MetaGSNR log it as
`loss_gap` (records: its mean since the previous checkpoint; a run trained here: per step).

Writes gsnr.json, gsnr.csv (long format, column `kind`) and gsnr.png.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DomainGradError
from ..gradients.gsnr import batch_gsnr
from ..gradients.per_sample import per_sample_gradients
from ..layout import MODEL
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
    sample_batch,
    training_args,
)

#: the record key of the loss difference (RSC, GSNRDropBlock, MetaGSNR)
LOSS_GAP = "loss_gap"
#: GSNR histograms span at most this many decades below their largest value
MAX_DECADES = 12

# -- the measurements ---------------------------------------------------------------------


def parameter_gsnr(
    model: nn.Module, x: Tensor, y: Tensor, eps: float = 1e-7, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """GSNR of every trainable parameter of ``model`` over the samples ``(x, y)``.

    ``r = mean_i(g_i)^2 / (var_i(g_i) + eps)``: :func:`~domaingrad.gradients.gsnr.batch_gsnr`
    (unbiased variance) of the per-sample gradients g_i of each sample's own
    cross-entropy (:func:`~domaingrad.gradients.per_sample.per_sample_gradients`, one
    ``vmap``, no loop over samples). They are held at once: N times the parameters' memory.

    Args:
        model: the network; its train/eval mode is used as is (BatchNorm must not be in
            training mode, see ``per_sample_gradients``).
        x: (N, *input_shape) inputs, N >= 2; y: (N,) int64 labels.
        eps: added to the variance (Listing 2's 1e-7). A parameter whose gradient is the
            same nonzero value for every sample gets ``mean^2 / eps``; one whose gradient
            is zero for every sample gets 0.
        chunk_size: ``per_sample_gradients``'s (vmap this many samples at a time).

    Returns:
        ``{parameter name: GSNR of the parameter's shape}``.

    Raises:
        DomainGradError: fewer than 2 samples.
    """
    if x.shape[0] < 2:
        raise DomainGradError(f"the GSNR needs at least 2 samples, got {x.shape[0]}; raise --samples")
    grads = per_sample_gradients(
        model, x, y, lambda out, target: F.cross_entropy(out, target), chunk_size=chunk_size, create_graph=False
    )
    return {name: batch_gsnr(g, eps) for name, g in grads.items()}


def by_layer(gsnr: dict[str, Tensor], weighted_only: bool = True) -> dict[str, Tensor]:
    """Flatten and concatenate the parameters' GSNR per layer, the module owning them
    (``featurizer.conv1.weight`` -> ``featurizer.conv1``), in parameter order.

    ``weighted_only``: keep the layers that own a parameter of 2 or more dimensions
    (convolutions, linear layers; their biases included), leaving out normalisation
    layers. Returns ``{layer: (n_params,) GSNR}`` on the CPU."""
    groups: dict[str, list[Tensor]] = {}
    weighted: set[str] = set()
    for name, value in gsnr.items():
        layer = name.rsplit(".", 1)[0]
        groups.setdefault(layer, []).append(value.detach().flatten().cpu())
        if value.ndim >= 2:
            weighted.add(layer)
    return {k: torch.cat(v) for k, v in groups.items() if not weighted_only or k in weighted}


def log_edges(values: Sequence[Tensor], bins: int) -> np.ndarray:
    """``bins + 1`` log-spaced edges shared by ``values``: from the decade below the
    smallest positive value (at most :data:`MAX_DECADES` below the top) to the decade above
    the largest. All values zero: edges over [1e-1, 1]."""
    positive = [v[v > 0] for v in values if (v > 0).any()]
    if not positive:
        return np.logspace(-1, 0, bins + 1)
    top = float(np.ceil(np.log10(max(float(v.max()) for v in positive))))
    bottom = float(np.floor(np.log10(min(float(v.min()) for v in positive))))
    bottom = min(max(bottom, top - MAX_DECADES), top - 1)
    return np.logspace(bottom, top, bins + 1)


def histogram(values: Tensor, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins of ``edges`` (log-spaced, increasing); values
    below the first edge (zeros included) count in the first bin and values above the
    last in the last, so the counts sum to ``values.numel()``."""
    logs = np.log10(np.clip(values.double().numpy(), edges[0], edges[-1]))
    counts, _ = np.histogram(logs, np.log10(edges))
    return counts


@dataclass
class LayerGSNR:
    """The GSNR of one layer at one checkpoint.

    Attributes:
        n_params: number of parameters; zeros: how many have GSNR exactly 0 (zero
            gradient for every sample); median, mean: of the GSNR (dimensionless);
        above_one: fraction with GSNR > 1 (signal above noise); edges: (bins + 1,)
            histogram edges; counts: (bins,) counts, summing to ``n_params``.
    """

    n_params: int
    zeros: int
    median: float
    mean: float
    above_one: float
    edges: list[float]
    counts: list[int]


def summarise(values: Tensor, edges: np.ndarray) -> LayerGSNR:
    """:class:`LayerGSNR` of a layer's flat GSNR ``values`` with histogram ``edges``."""
    v, counts = values.double(), histogram(values, edges)
    stats = (float(v.median()), float(v.mean()), float((v > 1).double().mean()))  # median: the lower one
    return LayerGSNR(v.numel(), int((v == 0).sum()), *stats, [float(e) for e in edges], [int(c) for c in counts])


def algorithm_gsnr(
    algorithm: nn.Module, x: Tensor, y: Tensor, eps: float = 1e-7, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """:func:`parameter_gsnr` of an algorithm's ``featurizer`` then ``classifier``
    (parameter names ``featurizer.*``, ``classifier.*``; DMG's masks are not applied),
    in eval mode (restored after), on the device of its parameters.

    Raises:
        DomainGradError: the algorithm has no ``featurizer`` and ``classifier`` (e.g.
            MultiHeaded).
    """
    featurizer, classifier = getattr(algorithm, "featurizer", None), getattr(algorithm, "classifier", None)
    if not isinstance(featurizer, nn.Module) or not isinstance(classifier, nn.Module):
        raise DomainGradError(
            f"{type(algorithm).__name__} has no featurizer and classifier; the GSNR analysis measures those"
        )
    network = nn.Sequential(OrderedDict(featurizer=featurizer, classifier=classifier))
    device = next(network.parameters()).device
    was_training = algorithm.training
    algorithm.eval()
    try:
        return parameter_gsnr(network, x.to(device), y.to(device), eps, chunk_size)
    finally:
        algorithm.train(was_training)


# -- runs ---------------------------------------------------------------------------------


@dataclass
class RunGSNR:
    """One run: its GSNR per checkpoint and layer, and its loss difference over steps.

    Attributes:
        label: the run's name in the figure; algorithm, dataset: from its arguments.
        gsnr: ``{step: {layer: flat GSNR}}`` (filled by the measurement; the summaries
            with histograms are in :class:`GSNRAnalysis`).
        loss_gap_steps, loss_gap: the loss difference per record (or per step for a run
            trained here); empty when the algorithm does not log ``loss_gap``.
    """

    label: str
    algorithm: str
    dataset: str
    gsnr: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    loss_gap_steps: list[int] = field(default_factory=list)
    loss_gap: list[float] = field(default_factory=list)


def measurement_batch(run: TrainingRun, samples: int, split: str, seed: int) -> tuple[Tensor, Tensor]:
    """``samples`` inputs of each training environment's ``split`` ("in" or "out"),
    pooled: ((N, *input_shape), (N,)), the same for a given seed."""
    splits = run.in_splits if split == "in" else run.out_splits
    generator = torch.Generator().manual_seed(seed)
    drawn = [sample_batch(splits[i], samples, generator) for i in run.train_envs]
    batches = [b for b in drawn if b is not None]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def pick_evenly(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted({round(j) for j in np.linspace(0, len(items) - 1, k)})]


def run_checkpoints(run_dir: Path) -> list[tuple[int | None, Path]]:
    """(step, file) of a run's model_step{N}.pkl files, else its model.pkl (step None).

    Raises:
        DomainGradError: neither exists.
    """
    files: list[tuple[int | None, Path]] = list(model_files(run_dir))
    if not files and (run_dir / MODEL).is_file():
        files = [(None, run_dir / MODEL)]
    if not files:
        raise DomainGradError(
            f"{run_dir}: no model_step{{N}}.pkl or {MODEL}; train with `domaingrad train "
            "--save-model-every-checkpoint` (and without --skip-model-save)"
        )
    return files


def loss_gap_series(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, values) of the records carrying ``loss_gap``, by step."""
    rows = sorted((r["step"], float(r[LOSS_GAP])) for r in records if r.get(LOSS_GAP) is not None)
    return [s for s, _ in rows], [v for _, v in rows]


@dataclass
class Settings:
    """How the GSNR is measured (the options of the same names; see the module docstring).

    Attributes:
        samples: inputs per training domain; split: "in" or "out"; seed: of their draw;
        eps, chunk_size: of :func:`parameter_gsnr`; gsnr: measure it (False: only the
        loss difference); weighted_only: of :func:`by_layer`; checkpoints: at most this
        many per finished run; device: where a finished run is rebuilt.
    """

    samples: int = 64
    split: str = "in"
    seed: int = 0
    eps: float = 1e-7
    chunk_size: int | None = None
    gsnr: bool = True
    weighted_only: bool = True
    checkpoints: int = 4
    device: str = "cpu"


def measure_finished_run(run_dir: str | os.PathLike, settings: Settings | None = None) -> RunGSNR:
    """The GSNR of a finished run at (at most ``settings.checkpoints``, evenly spaced)
    saved checkpoints, and its recorded loss difference.

    Raises:
        DomainGradError: not a run directory, or (measuring the GSNR) no model file.
    """
    s, run_dir = settings or Settings(), Path(run_dir)
    records = run_records(run_dir)
    args = records[-1]["args"] if records else {}
    result = RunGSNR(run_dir.name, str(args.get("algorithm", "?")), str(args.get("dataset", "?")))
    result.loss_gap_steps, result.loss_gap = loss_gap_series(records)
    if not s.gsnr:
        return result
    chosen = pick_evenly(run_checkpoints(run_dir), s.checkpoints)
    loaded = load_run(chosen[0][1], s.device)
    x, y = measurement_batch(loaded.run, s.samples, s.split, s.seed)
    for step, path in chosen:
        if path != loaded.path:
            state = torch.load(path, map_location=s.device, weights_only=False)["model_dict"]
            loaded.run.algorithm.load_state_dict(state)
        key = step if step is not None else int(records[-1]["step"])
        grads = algorithm_gsnr(loaded.run.algorithm, x, y, s.eps, s.chunk_size)
        result.gsnr[key] = by_layer(grads, s.weighted_only)
    return result


def measure_fresh_run(run: TrainingRun, every: int, settings: Settings | None = None) -> RunGSNR:
    """Train a prepared run to its end, measuring the GSNR after the update of every
    step ``s`` with ``s % every == 0`` and after the last, and collecting ``loss_gap`` of
    every step. The measurement draws nothing from the global generators, so the run
    trains exactly as it would unmeasured.

    Raises:
        DomainGradError: ``every < 1``.
    """
    s = settings or Settings()
    if every < 1:
        raise DomainGradError(f"--every must be >= 1, got {every}")
    result = RunGSNR("this run", run.args.algorithm, run.args.dataset)
    x, y = measurement_batch(run, s.samples, s.split, s.seed)
    for step in range(run.steps):
        values = run.train_step()
        if LOSS_GAP in values:
            result.loss_gap_steps.append(step)
            result.loss_gap.append(float(values[LOSS_GAP]))
        if s.gsnr and (step % every == 0 or step == run.steps - 1):
            grads = algorithm_gsnr(run.algorithm, x, y, s.eps, s.chunk_size)
            result.gsnr[step] = by_layer(grads, s.weighted_only)
    return result


@dataclass
class GSNRAnalysis:
    """Everything the analysis measured.

    Attributes:
        runs: the measured runs.
        layers: ``{run label: {step: {layer: LayerGSNR}}}``, histogram edges shared by a
            layer across runs and checkpoints.
        loss_gap: ``{run label: {"first": mean of the first tenth of the series, "last":
            mean of the last tenth, "points": length}}`` for the runs that log it.
    """

    runs: list[RunGSNR]
    layers: dict[str, dict[int, dict[str, LayerGSNR]]]
    loss_gap: dict[str, dict[str, float]]


def tenths(values: Sequence[float]) -> dict[str, float]:
    """Mean of the first and of the last tenth (at least one point each) of a series."""
    k = max(1, len(values) // 10)
    return {"first": float(np.mean(values[:k])), "last": float(np.mean(values[-k:])), "points": float(len(values))}


def analyse(runs: Sequence[RunGSNR], bins: int = 40) -> GSNRAnalysis:
    """Histograms (edges shared per layer: :func:`log_edges`) and summaries of measured
    runs, and the first/last tenth of each loss-difference series."""
    every_layer: dict[str, list[Tensor]] = {}
    for run in runs:
        for layers in run.gsnr.values():
            for name, values in layers.items():
                every_layer.setdefault(name, []).append(values)
    edges = {name: log_edges(values, bins) for name, values in every_layer.items()}
    summaries = {
        run.label: {
            step: {name: summarise(v, edges[name]) for name, v in layers.items()} for step, layers in run.gsnr.items()
        }
        for run in runs
    }
    gaps = {run.label: tenths(run.loss_gap) for run in runs if run.loss_gap}
    return GSNRAnalysis(list(runs), summaries, gaps)


# -- outputs ------------------------------------------------------------------------------


def figure(analysis: GSNRAnalysis):
    """One row of histogram panels per run (one panel per layer, one line per
    checkpoint) and a panel of the loss difference over steps."""
    rows = [r for r in analysis.runs if r.gsnr]
    names = list(dict.fromkeys(n for r in rows for layers in r.gsnr.values() for n in layers))
    gap_runs = [r for r in analysis.runs if r.loss_gap]
    columns = max(1, len(names))
    panels = len(rows) * len(names) + (1 if gap_runs else 0)
    fig, axes = new_figure(max(panels, 1), 3.6 if panels > 1 else 7.0, 2.9, columns=min(columns, max(panels, 1)))
    fig.set_dpi(80)  # PNGs small enough for the docs
    index = 0
    for run in rows:
        steps = sorted(run.gsnr)
        colours = [_colour(i, len(steps)) for i in range(len(steps))]
        for name in names:
            ax = axes[index]
            index += 1
            for step, colour in zip(steps, colours):
                if name not in analysis.layers[run.label][step]:
                    continue
                s = analysis.layers[run.label][step][name]
                ax.stairs(s.counts, s.edges, color=colour, label=f"step {step} (median {s.median:.2g})")
            ax.set_xscale("log")
            ax.set_xlabel("GSNR of parameter (log scale)")
            ax.set_ylabel("parameters")
            ax.set_title(f"{run.label} ({run.algorithm}): {name}", fontsize=9)
            ax.legend(fontsize=6)
    if gap_runs:
        ax = axes[index]
        for run in gap_runs:
            marker = "." if len(run.loss_gap) < 50 else None
            ax.plot(run.loss_gap_steps, run.loss_gap, marker=marker, label=f"{run.label} ({run.algorithm})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss difference |h(z) - h(z~)|")
        ax.set_title("Loss difference over training (suppl. Fig. 1)", fontsize=9)
        ax.legend(fontsize=7)
    names = ["GSNR of parameters per layer"] * bool(rows) + ["Masked-feature loss difference"] * bool(gap_runs)
    title = "; ".join(names) + " (Michalkiewicz et al., ICCV 2023)"
    fig.suptitle(title, fontsize=10)
    return fig


def _colour(i: int, n: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["viridis"](0.1 + 0.8 * (i / max(n - 1, 1)))


def summary_and_rows(analysis: GSNRAnalysis, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """gsnr.json's content and gsnr.csv's rows."""
    summary: dict[str, Any] = {"arguments": arguments, "runs": {}}
    rows: list[dict[str, Any]] = []
    for run in analysis.runs:
        layers = analysis.layers[run.label]
        summary["runs"][run.label] = {
            "algorithm": run.algorithm,
            "dataset": run.dataset,
            "gsnr": {str(step): {n: vars(st) for n, st in by.items()} for step, by in layers.items()},
            "loss_gap": {"steps": run.loss_gap_steps, "values": run.loss_gap, **analysis.loss_gap.get(run.label, {})},
        }
        for step, by in layers.items():
            for name, st in by.items():
                base = {"run": run.label, "algorithm": run.algorithm, "step": step, "layer": name}
                stats = {k: v for k, v in vars(st).items() if k not in ("edges", "counts")}
                rows.append({"kind": "gsnr_summary", **base, **stats})
                for lo, hi, count in zip(st.edges[:-1], st.edges[1:], st.counts):
                    rows.append({"kind": "gsnr_histogram", **base, "bin_low": lo, "bin_high": hi, "count": count})
        base = {"kind": "loss_gap", "run": run.label, "algorithm": run.algorithm}
        rows += [{**base, "step": step, LOSS_GAP: v} for step, v in zip(run.loss_gap_steps, run.loss_gap)]
    return summary, rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze gsnr``."""
    add = parser.add_argument
    add("--run", nargs="+", metavar="DIR", help="finished runs (default: train one with the options below)")
    add("--samples", type=int, default=64, help="samples per training domain (default 64)")
    add("--split", choices=("in", "out"), default="in", help="the split they come from (default in)")
    add("--checkpoints", type=int, default=4, help="at most this many checkpoints per run (default 4)")
    add("--every", type=int, help="a run trained here: GSNR every K steps (default steps/3)")
    add("--bins", type=int, default=40, help="histogram bins (default 40)")
    add("--eps", type=float, default=1e-7, help="added to the variance (default 1e-7, Listing 2)")
    add("--chunk-size", type=int, help="vmap the per-sample gradients this many samples at a time")
    add("--all-layers", action="store_true", help="also the normalisation layers (default: conv/linear)")
    parts = ["gsnr", "loss-gap"]
    add("--parts", nargs="+", choices=parts, default=parts, help="what to measure (default both)")
    add_training_arguments(parser, algorithm="GSNRDropBlock", dataset="ColoredMNIST", steps=300)
    add_output_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    """Run the analysis from parsed options; prints one line per run and the files."""
    for name in ("samples", "checkpoints", "bins"):
        if getattr(ns, name) < 1:
            raise DomainGradError(f"--{name} must be >= 1, got {getattr(ns, name)}")
    outputs = Outputs(ns.output_dir, "gsnr", ns.force)
    gsnr = "gsnr" in ns.parts
    settings = Settings(
        ns.samples, ns.split, ns.seed, ns.eps, ns.chunk_size, gsnr, not ns.all_layers, ns.checkpoints, ns.device
    )
    if ns.run:
        runs = [measure_finished_run(d, settings) for d in ns.run]
        for i, run in enumerate(runs):  # two directories of the same name
            if [r.label for r in runs].count(run.label) > 1:
                run.label = f"{run.label} [{i + 1}]"
    else:
        fresh = prepare_run(training_args(ns))
        runs = [measure_fresh_run(fresh, ns.every or max(1, fresh.steps // 3), settings)]
    if "loss-gap" in ns.parts and not gsnr and not any(r.loss_gap for r in runs):
        raise DomainGradError("no run logs loss_gap (RSC, GSNRDropBlock and MetaGSNR do); choose one of those")
    result = analyse(runs, ns.bins)
    summary, rows = summary_and_rows(result, {k: v for k, v in vars(ns).items() if k != "force"})
    for run in runs:
        line = f"{run.label} ({run.algorithm}, {run.dataset}):"
        for step in sorted(result.layers[run.label]):
            medians = ", ".join(f"{n} {s.median:.3g}" for n, s in result.layers[run.label][step].items())
            line += f"\n  step {step} median GSNR: {medians}"
        if run.label in result.loss_gap:
            gap = result.loss_gap[run.label]
            line += f"\n  loss_gap first tenth {gap['first']:.4g}, last tenth {gap['last']:.4g}"
        elif "loss-gap" in ns.parts:
            line += "\n  no loss_gap logged"
        print(line)
    for path in outputs.write(summary, rows, figure(result)):
        print(f"wrote {path}")
    return 0


__all__ = ["GSNRAnalysis", "LayerGSNR", "RunGSNR", "Settings", "algorithm_gsnr", "analyse", "by_layer", "histogram"]
__all__ += ["log_edges", "loss_gap_series", "measure_finished_run", "measure_fresh_run", "parameter_gsnr", "summarise"]
