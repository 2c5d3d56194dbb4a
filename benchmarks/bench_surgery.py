"""Benchmark the gradient-surgery rules on a ResNet-50-sized gradient set.

For each number of domains D, times the floor -- a plain sum over the domain axis of the
same tensors, ``[g.sum(0) for g in grads]`` -- and every rule of
:mod:`domaingrad.gradients.surgery`, round-robin (one warm-up round, then ``--repeats``
rounds), and prints a Markdown table with the median milliseconds and the median ratio
to the floor of the same round.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_surgery.py --params 25_000_000 --domains 3 5 8 --threads 1 2

``--threads 1 2`` gives one table per thread count (0: torch's default). Options for a
shared or noisy machine: ``--clock cpu`` (process CPU time; with one thread, the time
the rule needs whatever the load), ``--clock thread`` (CPU time of the calling thread
only, with idle threads put to sleep by ``OMP_WAIT_POLICY=PASSIVE``: with several
threads, a proxy of the wall time on an idle machine when the work is shared evenly,
since the calling thread takes part in every parallel step and does every serial one),
``--rules`` (a subset of the rules), ``--baseline DIR`` (the rules of another copy of the
surgery package, timed in the same rounds: a before/after comparison under the same
load) and ``--keep-heap`` (glibc keeps freed memory, so
that no rule, the floor included, pays page faults for fresh output buffers; without it
the numbers depend on the allocator's history).

The parameter shapes are those of ``torchvision.models.resnet50(weights=None)`` (about
25.6 M parameters in 161 tensors) when torchvision imports and ``--params`` is within
10 % of its size; otherwise a synthetic ResNet-50-like list of shapes is scaled to
``--params``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from domaingrad.gradients import surgery


def _synthetic_shapes(target: int) -> list[tuple[int, ...]]:
    """ResNet-50-like shapes (conv + BN pairs per bottleneck, then fc), scaled by width."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    total = sum(torch.Size(s).numel() for s in shapes)
    factor = target / total
    if abs(factor - 1.0) < 1e-3:
        return shapes
    # scale the largest dimension of every tensor with >= 2 dims
    scaled = []
    for s in shapes:
        if len(s) >= 2:
            s = (max(1, round(s[0] * factor)),) + tuple(s[1:])
        scaled.append(s)
    return scaled


def resnet50_shapes(target: int) -> tuple[list[tuple[int, ...]], str]:
    try:
        import torchvision  # type: ignore[import-untyped]

        model = torchvision.models.resnet50(weights=None)
        shapes = [tuple(p.shape) for p in model.parameters()]
        total = sum(p.numel() for p in model.parameters())
        if abs(total - target) <= 0.1 * target:
            return shapes, "torchvision resnet50"
    except Exception:  # pragma: no cover - torchvision missing or broken
        pass
    return _synthetic_shapes(target), "synthetic ResNet-50-like"


def time_rules(
    rules: Sequence[tuple[str, Callable[[], object]]], repeats: int, clock: Callable[[], float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per rule and median per-round ratio to the first rule (the floor).

    Rules run round-robin (one warm-up round first), so a change of machine load hits
    the floor and the rules of a round alike.
    """
    for _, fn in rules:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in rules}
    for _ in range(repeats):
        for name, fn in rules:
            gc.collect()
            start = clock()
            fn()
            times[name].append(1e3 * (clock() - start))
    floor = times[rules[0][0]]
    ms = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(t, floor)) for name, t in times.items()}
    return ms, ratio


def _bind(fn: Callable[[list[torch.Tensor]], object], grads: list[torch.Tensor]) -> Callable[[], object]:
    return lambda: fn(grads)


def load_baseline(path: str) -> ModuleType:
    """Import a copy of the ``domaingrad.gradients.surgery`` package directory (e.g. from
    ``git archive`` of an earlier commit) as the module ``baseline_surgery``; the package
    imports nothing outside itself."""
    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("baseline_surgery", init, submodule_search_locations=[path])
    if spec is None or spec.loader is None or not os.path.isfile(init):
        raise SystemExit(f"--baseline {path}: not a package directory (no __init__.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_surgery"] = module
    spec.loader.exec_module(module)
    return module


def _rules(
    surgery: ModuleType = surgery, suffix: str = "", floor: bool = True
) -> list[tuple[str, Callable[[list[torch.Tensor]], object]]]:
    """The floor first, then every rule of ``surgery`` (Agr-Rand's other noise streams,
    ``agr_rand (parallel)`` and ``agr_rand (sequential)``, where they exist), their names
    followed by ``suffix``."""
    rules: list[tuple[str, Callable[[list[torch.Tensor]], object]]] = [
        ("floor: sum over domains", lambda g: [t.sum(0) for t in g]),
        ("agr_sum", lambda g: surgery.agr_sum(g)),
        ("agr_rand", lambda g: surgery.agr_rand(g, generator=torch.Generator().manual_seed(0))),
    ]
    if "noise" in inspect.signature(surgery.agr_rand).parameters:
        default = inspect.signature(surgery.agr_rand).parameters["noise"].default
        streams = getattr(sys.modules[surgery.agr_rand.__module__], "_NOISE_STREAMS", ("sequential",))
        for stream in ("parallel", "sequential"):
            if stream in streams and stream != default:
                rules.append(
                    (
                        f"agr_rand ({stream})",
                        lambda g, s=stream: surgery.agr_rand(g, generator=torch.Generator().manual_seed(0), noise=s),
                    )
                )
    rules += [
        ("and_mask", lambda g: surgery.and_mask(g)),
        ("sand_mask", lambda g: surgery.sand_mask(g)),
        ("pcgrad", lambda g: surgery.pcgrad(g, generator=torch.Generator().manual_seed(0))),
        ("corgrad (defaults)", lambda g: surgery.corgrad(g, generator=torch.Generator().manual_seed(0))),
        ("corgrad (slices=1, smoothing off)", lambda g: surgery.corgrad(g, slices=1, smoothing=None)),
        ("corgrad (official options)", lambda g: surgery.corgrad(g, **surgery.OFFICIAL_CORGRAD_OPTIONS)),
    ]
    return [(name + suffix, fn) for name, fn in rules[0 if floor else 1 :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=25_000_000)
    parser.add_argument("--domains", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0], help="torch thread counts, one table each (0: torch default)"
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rules", nargs="+", default=None, help="rules to time (names as in the table; the floor is always timed)"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="a copy of the src/domaingrad/gradients/surgery directory (e.g. of an earlier commit, "
        "from git archive): its rules are timed in the same rounds, named with ' [baseline]'",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu", "thread"],
        default="wall",
        help="wall: time.perf_counter; cpu: process CPU time (steadier on a shared machine); "
        "thread: CPU time of the calling thread (set OMP_WAIT_POLICY=PASSIVE; see above)",
    )
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="re-run under glibc settings that keep freed memory in the heap "
        "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), so that every rule, the floor "
        "included, reuses warm pages instead of page-faulting fresh ones",
    )
    args = parser.parse_args()
    if args.keep_heap and os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 32), MALLOC_TRIM_THRESHOLD_=str(1 << 36))
        os.execvpe(sys.executable, [sys.executable, *sys.argv], env)
    clock = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}[args.clock]

    dtype = getattr(torch, args.dtype)
    shapes, origin = resnet50_shapes(args.params)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    rules = _rules()
    if args.rules is not None:
        unknown = sorted(set(args.rules) - {name for name, _ in rules})
        if unknown:
            parser.error(f"unknown rules {unknown}; choose among {[name for name, _ in rules[1:]]}")
    baseline = [] if args.baseline is None else _rules(load_baseline(args.baseline), " [baseline]", floor=False)
    if args.rules is not None:
        chosen = set(args.rules) | {f"{name} [baseline]" for name in args.rules}
        rules = [rules[0]] + [(name, fn) for name, fn in rules[1:] if name in chosen]
        baseline = [(name, fn) for name, fn in baseline if name in chosen]
    rules += baseline
    for threads in args.threads:
        if threads > 0:
            torch.set_num_threads(threads)
        wait = os.environ.get("OMP_WAIT_POLICY", "default")
        print(
            f"# {origin}: {n_params:,} parameters in {len(shapes)} tensors, {args.dtype}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock"
            f"{f' (OMP_WAIT_POLICY={wait})' if args.clock == 'thread' else ''}, median of {args.repeats} "
            f"round-robin rounds after a warm-up{', heap kept (glibc env)' if args.keep_heap else ''}\n"
        )
        results: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
        for num_domains in args.domains:
            gen = torch.Generator().manual_seed(args.seed)
            grads = [torch.randn((num_domains, *s), generator=gen, dtype=dtype) for s in shapes]
            bound = [(name, _bind(fn, grads)) for name, fn in rules]
            results[num_domains] = time_rules(bound, args.repeats, clock)
            del grads, bound
            gc.collect()

        header = "| rule | " + " | ".join(f"D={d} ms | D={d} x floor" for d in args.domains) + " |"
        print(header)
        print("|" + "---|" * (1 + 2 * len(args.domains)))
        for name, _ in rules:
            cells = []
            for d in args.domains:
                ms, ratio = results[d]
                cells += [f"{ms[name]:.1f}", f"{ratio[name]:.2f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("\nratio = median over rounds of (rule time / floor time in the same round)\n", flush=True)


if __name__ == "__main__":
    main()
