"""``domaingrad analyze similarity``: within- vs between-domain gradient similarity.

Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery",
ICCV 2021, Sec. 4.3 and Fig. 2: during standard (ERM) training, at every k-th step, one
minibatch is drawn from each source domain, all of ONE class (the class changes from one
measurement to the next, so that the domain is the only source of difference); the
gradient of every sample's own loss is computed, and the mean cosine similarity of the
pairs of gradients from the same domain (intra-domain) is compared with that of the pairs
from different domains (inter-domain). The paper finds intra above inter in all its cases
(PACS, VLCS and Office-Home, AlexNet).

The command trains the run itself (``--steps``, ``--dataset``, ``--algorithm``, default
ERM, ``--hparams``) on one source-domain combination (``--test-envs``) or, with
``--all-combinations``, on every leave-one-domain-out combination (one panel each, as in
Fig. 2). Every ``--every`` steps (and at steps 0 and the last) it draws ``--batch-size``
samples per source domain from the training (in) splits, with a generator of its own, and
measures in eval mode: the training run is the one ``domaingrad train`` would do.
``--per-layer`` also records the cosines of every layer's gradients on their own
(JSON/CSV; the figure shows the whole network). Writes similarity.json, similarity.csv
and similarity.png (intra in red, inter in blue).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DomainGradError
from ..gradients.per_sample import per_sample_gradients
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

NAME = "similarity"
#: the figure's title prefix: the figure of the paper it reproduces
FIGURE = "Mansilla et al. (ICCV 2021), Fig. 2"


@dataclass
class PairCosines:
    """Mean cosine similarity of gradient pairs within and between domains.

    Attributes:
        intra: mean cosine over the unordered pairs (i, j), i != j, of samples of the same
            domain (all domains pooled: every pair counts once); NaN when there is none.
        inter: mean cosine over the pairs of samples of different domains; NaN when none.
        intra_pairs, inter_pairs: the numbers of pairs averaged. A pair with a gradient
            that is exactly zero (its cosine is undefined) is left out of both.
    """

    intra: float
    inter: float
    intra_pairs: int
    inter_pairs: int

    @property
    def gap(self) -> float:
        """``intra - inter`` (positive where the paper's claim holds)."""
        return self.intra - self.inter


@dataclass
class GradientSimilarity:
    """Result of :func:`gradient_similarity`.

    Attributes:
        network: the cosines of the gradients of all the parameters measured, as one vector.
        layers: group name -> the cosines of that group's gradients alone (empty when no
            ``groups`` were given), in the order of ``groups``.
    """

    network: PairCosines
    layers: dict[str, PairCosines] = field(default_factory=dict)


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)


def layer_groups(model: nn.Module, naming: nn.Module | None = None) -> dict[str, list[str]]:
    """The trainable parameters of ``model`` grouped by the module that owns them
    (``"conv1.weight"`` -> group ``"conv1"``; the root's own parameters -> ``"(root)"``),
    in ``named_parameters()`` order: group name -> parameter names of ``model``.

    ``naming``: a module containing ``model``'s modules (e.g. the algorithm holding the
    ``network``) whose names for them are used instead, so ``network.0.conv1`` reads
    ``featurizer.conv1``."""
    known = {n for n, p in model.named_parameters() if p.requires_grad}
    names_of = {id(m): n for n, m in naming.named_modules()} if naming is not None else {}
    groups: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)]
        own = [n for n in own if n in known]
        if own:
            groups.setdefault(names_of.get(id(module), module_name) or "(root)", []).extend(own)
    return groups


def _pair_cosines(gram: Tensor, domains: Tensor) -> PairCosines:
    """Intra/inter means of the cosines of a Gram matrix (N, N) of N gradients whose
    domains are ``domains`` (N,)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = norms > 0
    cosine = (gram / (norms[:, None] * norms[None, :]).clamp(min=torch.finfo(gram.dtype).tiny)).clamp(-1.0, 1.0)
    n = gram.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=gram.device).triu(diagonal=1)
    usable = upper & valid[:, None] & valid[None, :]
    same = domains[:, None] == domains[None, :]
    intra_mask, inter_mask = usable & same, usable & ~same
    intra_pairs, inter_pairs = int(intra_mask.sum()), int(inter_mask.sum())
    intra = float(cosine[intra_mask].mean()) if intra_pairs else float("nan")
    inter = float(cosine[inter_mask].mean()) if inter_pairs else float("nan")
    return PairCosines(intra, inter, intra_pairs, inter_pairs)


def gradient_similarity(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    groups: Mapping[str, Sequence[str]] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> GradientSimilarity:
    """Mean cosine similarity of per-sample gradients within and between domains
    (Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery",
    ICCV 2021, Sec. 4.3, the quantity of Fig. 2).

    Every sample's gradient ``g_i`` (of its own loss, with respect to ``params``) comes
    from :func:`~domaingrad.gradients.per_sample.per_sample_gradients` (``torch.func``, no
    loop over samples); the model is used in its current train/eval mode. With
    ``cos(i, j) = <g_i, g_j> / (|g_i| |g_j|)``: ``intra`` is the mean over the pairs of
    distinct samples of the same domain, ``inter`` over the pairs of samples of different
    domains (each unordered pair once). The cosines come from Gram matrices accumulated
    per parameter tensor in float64, so a group's cosine needs no extra pass and the
    gradients are never concatenated. The paper restricts all batches to one class; that
    is the caller's choice (:func:`similarity_over_training` does it).

    Args:
        model: maps a batch (B, *sample_shape) to outputs (B, ...); no BatchNorm in
            training mode (per-sample gradients are undefined there: use ``model.eval()``).
        batches: one ``(x, y)`` per domain, x of shape (n_d, *sample_shape), y of shape
            (n_d, *target_shape); at least two domains, each non-empty, on the model's device.
        groups: optional group name -> parameter names (a partition or any subsets of
            ``params``), e.g. :func:`layer_groups`; each group's cosines are also reported.
        loss_fn: ``(output of one sample, its target) -> scalar``; default cross-entropy.
        params: the parameters differentiated (default: every trainable one).
        chunk_size: samples per vmap chunk (bounds memory; the result is the same).

    Returns:
        :class:`GradientSimilarity`; cosines are unitless, in [-1, 1].

    Raises:
        ValueError: fewer than two domains, an empty batch, no pair of samples of the same
            domain (every batch of one sample), or an unknown parameter name in ``groups``;
            and whatever :func:`~domaingrad.gradients.per_sample.per_sample_gradients`
            raises (mismatched shapes, BatchNorm in training mode, ...).
    """
    batches = list(batches)
    if len(batches) < 2:
        raise ValueError(
            f"gradient similarity compares domains: give one (x, y) batch per domain, at least 2, got {len(batches)}"
        )
    sizes = [int(x.shape[0]) if x.dim() > 0 else 0 for x, _ in batches]
    if min(sizes) == 0:
        raise ValueError(f"every domain's batch needs at least one sample, got sizes {sizes}")
    if max(sizes) < 2:
        raise ValueError("no intra-domain pair: at least one domain's batch needs two samples or more")
    names = list(params) if params is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    groups = {str(g): list(members) for g, members in (groups or {}).items()}
    for group, members in groups.items():
        unknown = [m for m in members if m not in names]
        if unknown or not members:
            raise ValueError(
                f"group {group!r} names {unknown or 'no parameter'}; a group lists some of the parameters "
                f"measured: {', '.join(names)}"
            )
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    domains = torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(sizes)]).to(x.device)
    grads = per_sample_gradients(
        model, x, y, loss_fn or _cross_entropy, params=names, chunk_size=chunk_size, create_graph=False
    )
    grams: dict[str, Tensor] = {}
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1).to(torch.float64)
        grams[name] = flat @ flat.T
    total = torch.stack(list(grams.values())).sum(dim=0)
    layers = {
        group: _pair_cosines(torch.stack([grams[m] for m in members]).sum(dim=0), domains)
        for group, members in groups.items()
    }
    return GradientSimilarity(_pair_cosines(total, domains), layers)


@dataclass
class SimilarityCurve:
    """Result of :func:`similarity_over_training`: one training run's measurements.

    Attributes:
        test_envs: the held-out environments; train_envs: the source domains (indices).
        environment_names: names of all the dataset's environments.
        steps: the number of updates done before each measurement.
        labels: the class the batches of each measurement were restricted to.
        network: the whole network's cosines at each measurement.
        layers: group -> its cosines at each measurement (empty without ``per_layer``).
    """

    test_envs: list[int]
    train_envs: list[int]
    environment_names: list[str]
    steps: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    network: list[PairCosines] = field(default_factory=list)
    layers: dict[str, list[PairCosines]] = field(default_factory=dict)

    def mean_gap(self) -> float:
        """Mean of ``intra - inter`` over the measurements (NaN measurements skipped)."""
        gaps = [c.gap for c in self.network if c.gap == c.gap]
        return sum(gaps) / len(gaps) if gaps else float("nan")


def measurement_steps(steps: int, every: int) -> list[int]:
    """0, every, 2*every, ... and ``steps`` (the last), without duplicates."""
    return sorted(set(range(0, steps + 1, every)) | {steps})


def similarity_over_training(
    run: TrainingRun,
    every: int,
    batch_size: int,
    per_layer: bool = False,
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> SimilarityCurve:
    """Train ``run`` (``run.steps`` updates of its algorithm) and measure
    :func:`gradient_similarity` of ``run.algorithm.network`` every ``every`` steps (at
    step 0 before any update, then after every ``every`` updates, and after the last).

    Measurement m restricts every source domain's batch to one class: the classes that
    every source domain's training split has, in order, cycled (measurement m takes the
    ``m mod n``-th of those n classes); ``batch_size`` samples per domain are drawn without replacement from those
    splits by a generator of its own (seeded by ``seed``, default the run's seed), so the
    training run itself is unchanged. The algorithm is measured in eval mode (no
    BatchNorm statistics or dropout draws are consumed) and put back in its mode.

    Raises:
        DomainGradError: ``every`` < 1, ``batch_size`` < 2, an algorithm without a
            ``network`` module (ERM and its subclasses have one), or no class present in
            every source domain.
    """
    if every < 1:
        raise DomainGradError(f"--every must be >= 1 (measure every k-th step), got {every}")
    if batch_size < 2:
        raise DomainGradError(f"--batch-size must be >= 2 (intra-domain pairs need two samples), got {batch_size}")
    algorithm = run.algorithm
    network = getattr(algorithm, "network", None)
    if not isinstance(network, nn.Module):
        raise DomainGradError(
            f"{type(algorithm).__name__} has no `network` module whose per-sample gradients could be measured; "
            "use ERM (the paper's standard training) or an algorithm derived from it"
        )
    splits = [run.in_splits[i] for i in run.train_envs]
    num_classes = run.dataset.num_classes
    present = [c for c in range(num_classes) if all(bool((s.y == c).any()) for s in splits)]
    if not present:
        raise DomainGradError("no class has samples in every source domain's training split; nothing to compare")
    generator = torch.Generator().manual_seed(seed_hash(run.args.seed if seed is None else seed, NAME))
    groups = layer_groups(network, naming=algorithm) if per_layer else {}
    curve = SimilarityCurve(list(run.args.test_envs), list(run.train_envs), list(run.dataset.environment_names))
    done = 0
    for m, step in enumerate(measurement_steps(run.steps, every)):
        while done < step:
            run.train_step()
            done += 1
        label = present[m % len(present)]
        batches = []
        for split in splits:
            drawn = sample_batch(split, batch_size, generator, label=label)
            assert drawn is not None  # every class in `present` is in every split
            batches.append((drawn[0].to(run.device), drawn[1].to(run.device)))
        was_training = algorithm.training
        algorithm.eval()
        try:
            result = gradient_similarity(network, batches, groups=groups)
        finally:
            algorithm.train(was_training)
        curve.steps.append(step)
        curve.labels.append(label)
        curve.network.append(result.network)
        for group, cos in result.layers.items():
            curve.layers.setdefault(group, []).append(cos)
        if log is not None:
            c = result.network
            log(f"  step {step:>5}  class {label}  intra {c.intra:+.4f}  inter {c.inter:+.4f}  gap {c.gap:+.4f}")
    return curve


# -- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze similarity``."""
    add_training_arguments(parser, algorithm="ERM", dataset="ColoredMNIST", steps=300)
    parser.set_defaults(test_envs=None)
    parser.add_argument(
        "--all-combinations",
        action="store_true",
        help="one run per leave-one-domain-out combination (each environment held out in turn), "
        "one panel each, instead of the single --test-envs combination",
    )
    parser.add_argument("--every", type=int, default=10, help="measure every k-th step (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="samples per source domain in each measurement (default 32)"
    )
    parser.add_argument("--per-layer", action="store_true", help="also record every layer's cosines (JSON and CSV)")
    add_output_arguments(parser)


def _sources(curve: SimilarityCurve) -> str:
    return ", ".join(curve.environment_names[i] for i in curve.train_envs)


def _row(curve: SimilarityCurve, i: int, layer: str, cos: PairCosines) -> dict[str, Any]:
    return {
        "test_envs": " ".join(map(str, curve.test_envs)),
        "sources": _sources(curve),
        "step": curve.steps[i],
        "class": curve.labels[i],
        "layer": layer,
        "intra": cos.intra,
        "inter": cos.inter,
        "gap": cos.gap,
        "intra_pairs": cos.intra_pairs,
        "inter_pairs": cos.inter_pairs,
    }


def _summary(curve: SimilarityCurve) -> dict[str, Any]:
    valid = [c for c in curve.network if c.gap == c.gap]
    return {
        "test_envs": curve.test_envs,
        "train_envs": curve.train_envs,
        "sources": [curve.environment_names[i] for i in curve.train_envs],
        "steps": curve.steps,
        "classes": curve.labels,
        "intra": [c.intra for c in curve.network],
        "inter": [c.inter for c in curve.network],
        "mean_intra": sum(c.intra for c in valid) / len(valid) if valid else float("nan"),
        "mean_inter": sum(c.inter for c in valid) / len(valid) if valid else float("nan"),
        "mean_gap": curve.mean_gap(),
        "intra_above_inter": sum(c.gap > 0 for c in valid),
        "measurements": len(curve.network),
        "layers": {
            g: {"intra": [c.intra for c in cs], "inter": [c.inter for c in cs], "mean_gap": _mean_gap(cs)}
            for g, cs in curve.layers.items()
        },
    }


def _mean_gap(cosines: Sequence[PairCosines]) -> float:
    gaps = [c.gap for c in cosines if c.gap == c.gap]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def plot_curves(curves: Sequence[SimilarityCurve], dataset: str, algorithm: str):
    """Fig. 2's layout: one panel per source-domain combination, the mean intra-domain
    cosine in red and the inter-domain one in blue against the training step."""
    n = len(curves)
    width, height = (5.0, 3.2) if n == 1 else (4.2, 3.2) if n <= 3 else (3.8, 2.9)
    figure, axes = new_figure(n, width=width, height=height, columns=min(3, n))
    for ax, curve in zip(axes, curves):
        ax.plot(curve.steps, [c.intra for c in curve.network], color="tab:red", marker=".", label="intra-domain")
        ax.plot(curve.steps, [c.inter for c in curve.network], color="tab:blue", marker=".", label="inter-domain")
        ax.set_title(f"sources: {_sources(curve)}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean gradient cosine similarity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(
        f"{FIGURE}: per-sample gradient cosine similarity\nwithin / between source domains, {dataset}, {algorithm}",
        fontsize=10,
    )
    return figure


def _train_args(ns: argparse.Namespace, test_envs: list[int]):
    return training_args(argparse.Namespace(**{**vars(ns), "test_envs": test_envs}))


def main(ns: argparse.Namespace) -> int:
    """Run ``domaingrad analyze similarity``; prints one line per measurement and a summary."""
    if ns.all_combinations and ns.test_envs is not None:
        raise DomainGradError("give either --test-envs (one combination) or --all-combinations, not both")
    outputs = Outputs(ns.output_dir, NAME, ns.force)
    first = prepare_run(_train_args(ns, list(ns.test_envs or [0])))
    combinations = [[e] for e in range(len(first.dataset))] if ns.all_combinations else [list(first.args.test_envs)]
    curves = []
    for test_envs in combinations:
        run = first if test_envs == list(first.args.test_envs) else prepare_run(_train_args(ns, test_envs))
        names = run.dataset.environment_names
        print(f"{ns.dataset}, {ns.algorithm}, test env(s) {test_envs}, sources {[names[i] for i in run.train_envs]}:")
        curve = similarity_over_training(run, ns.every, ns.batch_size, ns.per_layer, log=print)
        c = _summary(curve)
        print(
            f"  mean intra {c['mean_intra']:+.4f}  mean inter {c['mean_inter']:+.4f}  mean gap {c['mean_gap']:+.4f}  "
            f"(intra > inter at {c['intra_above_inter']}/{c['measurements']} measurements)"
        )
        curves.append(curve)
    rows = [_row(cv, i, "network", cos) for cv in curves for i, cos in enumerate(cv.network)]
    rows += [_row(cv, i, g, cos) for cv in curves for g, cs in cv.layers.items() for i, cos in enumerate(cs)]
    summary = {
        "analysis": NAME,
        "figure": FIGURE,
        "arguments": {k: v for k, v in vars(ns).items() if k != "force"},
        "combinations": [_summary(cv) for cv in curves],
    }
    for path in outputs.write(summary, rows, plot_curves(curves, ns.dataset, ns.algorithm)):
        print(f"wrote {path}")
    return 0


__all__ = [
    "GradientSimilarity",
    "PairCosines",
    "SimilarityCurve",
    "add_arguments",
    "gradient_similarity",
    "layer_groups",
    "main",
    "measurement_steps",
    "plot_curves",
    "similarity_over_training",
]
