#!/usr/bin/env python3
"""Median step time of each algorithm divided by ERM's, in one process.

For each dataset, every listed algorithm is built on the dataset's network (MNIST_CNN
for the MNIST family) with default hyperparameters, and its ``update`` is timed on the
same minibatches (one per training domain, drawn from memory). The algorithms take
turns step by step (round robin, rotating who goes first) so that machine noise falls
on all of them alike. Prints a Markdown table of median ms per step, the ratio to ERM
and each algorithm's inherent cost (passes, networks, second-order terms), read from
the code.

With ``--domainbed PATH`` (a checkout of facebookresearch/DomainBed; Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021), DomainBed's own
implementation of each listed algorithm that it has is built from its
``hparams_registry.default_hparams`` and timed in the same round robin, on the same
minibatches, beside its own ERM; the table gains DomainBed's ms and ratio to its ERM.
On a machine without CUDA, ``.cuda()`` (which DomainBed's TRM and RDM call) is made a
no-op for the run, and a stub ``timm`` module stands in while DomainBed is imported if
timm is not installed (only its ResNet/ViT backbones use it).

``--clock thread`` times with ``time.thread_time`` (CPU time of the calling thread) and
sets torch to one intra-op thread, so that work other processes steal the core for is
not counted: the clock to use on a shared machine (also set ``OMP_NUM_THREADS=1``).

Usage:
    python benchmarks/bench_algorithms.py --datasets ColoredMNIST RotatedMNIST \
        --algorithms ERM AgrSum AgrRand PCGrad CorGrad ANDMask SANDMask --steps 30
    OMP_NUM_THREADS=1 python benchmarks/bench_algorithms.py --algorithms others \
        --clock thread --steps 8 --warmup 2 --domainbed /path/to/DomainBed
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _timing
import torch
from _timing import round_robin_medians

from domaingrad.algorithms import algorithm_class
from domaingrad.data import InfiniteMinibatches, get_dataset, split_environment
from domaingrad.registry import default_hparams

TEST_ENV = {"ColoredMNIST": 2, "RotatedMNIST": 0}

#: ``--late`` sets every step counter to this, past all anneal / burn-in / probing phases
LATE_STEP = 100_000

#: DomainBed's other algorithms and MixStyle (``--algorithms others``)
OTHERS = [
    "CDANN", "CausIRL_CORAL", "CausIRL_MMD", "IGA", "IB_ERM", "IB_IRM", "EQRM", "SelfReg", "CAD", "CondCAD",
    "RDM", "ADRMX", "URM", "ERMPlusPlus", "MTL", "SagNet", "ARM", "TRM", "Transfer", "MixStyle",
]  # fmt: skip

#: what each algorithm's step costs beyond ERM's one forward and backward pass over the
#: concatenated batch, from reading domaingrad's code (default hyperparameters, MNIST_CNN)
INHERENT_COST = {
    "ERM": "1 fwd + 1 bwd",
    "AgrSum": "per-domain fwd + bwd (D passes over each domain's batch); + the rule on the parameters",
    "AgrRand": "per-domain fwd + bwd; + the rule and its Gaussian noise on the parameters",
    "PCGrad": "per-domain fwd + bwd; + D x D float64 Gram and one weighted sum over the parameters",
    "CorGrad": "per-domain fwd + bwd; + per-slice Gram matrices, projections and smoothing",
    "ANDMask": "per-domain fwd + bwd; + the sign-agreement mask on the parameters",
    "SANDMask": "per-domain fwd + bwd; + tanh soft mask and variance on the parameters",
    "Fishr": "per-domain fwd; per-sample classifier grads in closed form (linear head); variance penalty",
    "IRM": "per-domain fwd; + the scale-gradient penalty (2nd order on a scalar)",
    "VREx": "per-domain fwd; + variance of the D risks (cheap)",
    "SD": "+ squared logits penalty (cheap)",
    "CORAL": "per-domain fwd; + feature mean/covariance distances between domain pairs",
    "MMD": "per-domain fwd; + Gaussian-kernel MMD between domain pairs",
    "DANN": "+ discriminator MLP on the features; steps alternate",
    "GroupDRO": "per-domain fwd; + exponentiated-gradient domain weights (cheap)",
    "Mixup": "per-domain-pair mixed batches: fwd + bwd over as many images as ERM",
    "MLDG": "per-domain inner step (copy of the network), meta-test fwd + bwd",
    "Fish": "per-domain inner steps on a copy of the network (as many images as ERM)",
    "CDANN": "+ discriminator MLP and its input-gradient penalty (2nd order, MLP only); steps alternate",
    "CausIRL_CORAL": "per-domain fwd; + CORAL between random halves of each domain (cheap)",
    "CausIRL_MMD": "per-domain fwd; + Gaussian MMD between random halves of each domain (cheap)",
    "IGA": "per-domain grads with create_graph, then bwd through them: 2nd order on the whole net",
    "IB_ERM": "per-domain fwd; + feature variance (cheap)",
    "IB_IRM": "per-domain fwd; + IRM scale-gradient (2nd order on a scalar) + feature variance",
    "EQRM": "per-domain fwd; after burn-in a KDE quantile of D risks (cheap)",
    "SelfReg": "+ projection MLP, same-class partners, output/feature mixing (cheap)",
    "CAD": "+ N x N contrastive matrix on the features (cheap here)",
    "CondCAD": "+ N x N contrastive matrix on the features (cheap here)",
    "RDM": "+ per-example risks: variances and a 1-D MMD of (B, DB) kernels (cheap)",
    "ADRMX": "2 featurizers (2x fwd); disc steps (2 of 3) run them without grad; gen step 2x fwd + bwd",
    "URM": "+ discriminator MLP on features, its own Adam step (cheap)",
    "ERMPlusPlus": "probing (first 501 steps): no featurizer bwd; then ERM + weight average copy",
    "MTL": "per-domain fwd; classifier on [features, EMA domain embedding] (2F inputs)",
    "SagNet": "3 fwd (content, style, adversarial) + 2 bwd through the featurizer (style step: no featurizer grad)",
    "ARM": "+ ContextNet fwd/bwd (5x5 convs, 64 ch at full resolution: about MNIST_CNN's size)",
    "TRM": "after iters (200): per-domain heads, 2nd-order grads and HVPs on the linear head only",
    "Transfer": "2 + d_steps_per_g (10) per-domain featurizer fwd/bwd: adversarial steps re-run it",
    "MixStyle": "+ feature-statistics mixing at the chosen stages (cheap)",
}


def skip_early_phases(algo: Any) -> None:
    """Set ``algo``'s step counters (``update_count``, ERM++'s ``global_iter``: tensors
    here and in DomainBed, except DomainBed's plain-int ``global_iter``) to
    :data:`LATE_STEP`, so that the timed steps are the ones after every penalty anneal,
    burn-in (EQRM), transfer start (TRM ``iters``) and linear probing (ERM++)."""
    for attr in ("update_count", "global_iter"):
        value = getattr(algo, attr, None)
        if isinstance(value, torch.Tensor):
            value.fill_(LATE_STEP)
        elif isinstance(value, int) and not isinstance(value, bool):
            setattr(algo, attr, LATE_STEP)


def _timm_stub() -> types.ModuleType:
    return types.ModuleType("timm")


def import_domainbed(path: str) -> tuple[Any, Any]:
    """DomainBed's ``algorithms`` and ``hparams_registry`` modules from the checkout at
    ``path`` (the directory holding ``domainbed/``).

    Raises:
        SystemExit: ``path`` holds no ``domainbed/algorithms.py``.
    """
    root = Path(path).expanduser().resolve()
    if not (root / "domainbed" / "algorithms.py").is_file():
        raise SystemExit(
            f"bench_algorithms: --domainbed {path}: no domainbed/algorithms.py there; "
            "give the root of a facebookresearch/DomainBed checkout"
        )
    sys.path.insert(0, str(root))
    stub = importlib.util.find_spec("timm") is None
    if stub:  # only its ResNet-50 / ViT backbones use timm; MNIST_CNN does not
        sys.modules["timm"] = _timm_stub()
    try:
        from domainbed import algorithms, hparams_registry
    finally:
        if stub:
            sys.modules.pop("timm", None)
    return algorithms, hparams_registry


@contextlib.contextmanager
def cuda_calls_are_noops() -> Iterator[None]:
    """Without CUDA, make ``Tensor.cuda()`` and ``Module.cuda()`` return their object
    unchanged (DomainBed's TRM and RDM call ``.cuda()`` unconditionally); with CUDA,
    change nothing."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def timing_clock(clock: str) -> Iterator[None]:
    """Make :func:`_timing.round_robin_medians` read ``time.perf_counter`` (``"wall"``)
    or ``time.thread_time`` (``"thread"``) while the block runs."""
    saved = _timing.time
    if clock == "thread":
        _timing.time = types.SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    try:
        yield
    finally:
        _timing.time = saved


def bench(
    dataset_name: str,
    algorithms: list[str],
    steps: int,
    warmup: int,
    domainbed: tuple[Any, Any] | None = None,
    clock: str = "wall",
    late: bool = False,
) -> dict[str, float]:
    """Median seconds per ``update`` of each algorithm on ``dataset_name``'s shapes,
    keyed by name; DomainBed's implementations (with ``domainbed``, from
    :func:`import_domainbed`) under ``"DomainBed:" + name`` for the names DomainBed has.
    With ``late``, the step counters are first moved past the early phases
    (:func:`skip_early_phases`)."""
    dataset = get_dataset(dataset_name)
    test_env = TEST_ENV.get(dataset_name, 0)
    splits = [split_environment(env, 0.2, 0, i)[1] for i, env in enumerate(dataset.environments) if i != test_env]
    built: dict[str, Any] = {}
    for name in algorithms:
        torch.manual_seed(0)
        hparams = default_hparams(name, dataset_name)
        algo = algorithm_class(name)(dataset.input_shape, dataset.num_classes, len(splits), hparams)
        algo.total_steps = steps + warmup + (LATE_STEP if late else 0)
        built[name] = algo
    if domainbed is not None:
        db_algorithms, db_hparams = domainbed
        for name in algorithms:
            if name not in db_algorithms.ALGORITHMS:
                continue
            torch.manual_seed(0)
            hparams = db_hparams.default_hparams(name, dataset_name)
            algo = db_algorithms.get_algorithm_class(name)(
                dataset.input_shape, dataset.num_classes, len(splits), hparams
            )
            built["DomainBed:" + name] = algo
    if late:
        for algo in built.values():
            skip_early_phases(algo)
    stream = InfiniteMinibatches(splits, default_hparams("ERM", dataset_name)["batch_size"], seed=0)
    with timing_clock(clock):
        return round_robin_medians(built, lambda step: next(stream), steps, warmup)


def table(results: dict[str, dict[str, float]], algorithms: list[str]) -> list[str]:
    """Markdown lines: per dataset ms and x ERM (and DomainBed's, when measured), and
    the inherent cost."""
    datasets = list(results)
    with_db = any(k.startswith("DomainBed:") for r in results.values() for k in r)
    cols = ["ms", "x ERM"] + (["DomainBed ms", "DomainBed x ERM"] if with_db else [])
    header = " | ".join(f"{d} {c}" if i == 0 else c for d in datasets for i, c in enumerate(cols))
    lines = [f"| algorithm | inherent cost | {header} |", "| --- | --- |" + " --- |" * (len(cols) * len(datasets))]
    for name in algorithms:
        cells = []
        for d in datasets:
            r = results[d]
            cells += [f"{r[name] * 1e3:.0f}", f"{r[name] / r['ERM']:.2f}"]
            if with_db:
                db = r.get("DomainBed:" + name)
                cells += ["-", "-"] if db is None else [f"{db * 1e3:.0f}", f"{db / r['DomainBed:ERM']:.2f}"]
        lines.append(f"| {name} | {INHERENT_COST.get(name, '')} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ColoredMNIST", "RotatedMNIST"])
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["ERM", "AgrSum", "AgrRand", "PCGrad", "CorGrad", "ANDMask", "SANDMask"],
        help="algorithm names; 'others' stands for DomainBed's other algorithms and MixStyle",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--domainbed", metavar="PATH", help="a DomainBed checkout: time its implementations too, in the same process"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: time.perf_counter; thread: time.thread_time with one torch thread (for a shared machine)",
    )
    parser.add_argument(
        "--late",
        action="store_true",
        help=f"time steps {LATE_STEP}+ (step counters moved past anneal, burn-in and probing phases)",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    algorithms = [a for name in args.algorithms for a in (OTHERS if name == "others" else [name])]
    if "ERM" not in algorithms:
        algorithms.insert(0, "ERM")
    if args.clock == "thread":
        torch.set_num_threads(1)
    domainbed = import_domainbed(args.domainbed) if args.domainbed else None
    with cuda_calls_are_noops():
        results = {
            d: bench(d, algorithms, args.steps, args.warmup, domainbed, args.clock, args.late) for d in args.datasets
        }
    clock = "time.thread_time" if args.clock == "thread" else "time.perf_counter"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}, "
        f"median of {args.steps} steps after {args.warmup} warm-up steps"
        + (f", from step {LATE_STEP} (--late)" if args.late else "")
        + "\n"
    )
    print("\n".join(table(results, algorithms)))


if __name__ == "__main__":
    main()
