#!/usr/bin/env python3
"""Training-loop overhead of `domaingrad train` against a bare PyTorch loop.

For ColoredMNIST (64 x 2 domains) and RotatedMNIST (64 x 5 domains) with ERM on
MNIST_CNN, the script times, interleaved step by step in one process:

- domaingrad: ``TrainingRun.train_step`` - what the training loop runs per step (draw
  one minibatch per domain from memory, ``ERM.update``, bookkeeping);
- bare: a hand-written loop doing the same work - draw the same-sized batches with
  ``torch.randint`` indexing, concatenate, forward, cross-entropy, backward, Adam step.

It reports the median seconds per step of each, the overhead in percent, and the
evaluation throughput (images per second over every in and out split).

Usage: python benchmarks/bench_train_loop.py [--steps 40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from domaingrad.models import MNIST_CNN, classifier
from domaingrad.run import TrainArgs, TrainingRun


def bare_setup(run: TrainingRun):
    torch.manual_seed(0)
    net = torch.nn.Sequential(MNIST_CNN(run.dataset.input_shape), classifier(128, run.dataset.num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    envs = [(s.env.x[s.indices], s.env.y[s.indices]) for s in run.minibatches.splits]
    g = torch.Generator().manual_seed(0)
    batch = run.hparams["batch_size"]

    def step() -> float:
        xs, ys = [], []
        for x, y in envs:
            idx = torch.randint(len(y), (batch,), generator=g)
            xs.append(x[idx])
            ys.append(y[idx])
        loss = F.cross_entropy(net(torch.cat(xs)), torch.cat(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(dataset: str, test_env: int, steps: int, warmup: int) -> dict:
    run = TrainingRun.prepare(TrainArgs(dataset=dataset, test_envs=[test_env], output_dir="/nonexistent"))
    bare = bare_setup(run)
    for _ in range(warmup):
        run.train_step()
        bare()
    ours, base = [], []
    for i in range(steps):  # alternate the order so neither side always runs first
        if i % 2:
            ours.append(timed(run.train_step))
            base.append(timed(bare))
        else:
            base.append(timed(bare))
            ours.append(timed(run.train_step))
    n_images = sum(len(s) for s in run.in_splits + run.out_splits)
    eval_time = min(timed(run.evaluate) for _ in range(2))
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    return {
        "dataset": dataset,
        "domains": len(run.minibatches.splits),
        "batch": run.hparams["batch_size"],
        "ours": m_ours,
        "bare": m_base,
        "overhead": 100 * (m_ours / m_base - 1),
        "eval_ips": n_images / eval_time,
        "eval_images": n_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    rows = [bench("ColoredMNIST", 2, args.steps, args.warmup), bench("RotatedMNIST", 0, args.steps, args.warmup)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print("| dataset | batch | domaingrad s/step | bare loop s/step | overhead | eval images/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['batch']} x {r['domains']} | {r['ours']:.4f} | {r['bare']:.4f} | "
            f"{r['overhead']:+.1f}% | {r['eval_ips']:.0f} ({r['eval_images']} images) |"
        )


if __name__ == "__main__":
    main()
