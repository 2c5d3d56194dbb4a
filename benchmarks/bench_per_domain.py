"""Benchmark: per-domain gradients vs ERM's step, on DomainBed's MNIST_CNN + linear head.

Timed per step (all in one process, after warm-up; the methods are interleaved step by
step, in rotating order, so that load from other processes hits them alike):

(a) ERM: forward of the concatenated batch, mean cross-entropy, ``loss.backward()``;
(b) ``per_domain_gradients(..., method="sequential")``;
(c) ``per_domain_gradients(..., method="vmap")``;
(d) prototype, not in the API and specific to this network: one forward of the
    concatenated batch with detached weights, one backward for the activation gradients
    only (per-sample independence of GroupNorm nets makes them equal to the per-domain
    ones), then per-domain weight gradients from the captured activations, one
    weight-only convolution backward per domain and layer.

Shapes: ColoredMNIST 2x28x28, 2 classes, 64 per domain x 2 training domains;
RotatedMNIST 1x28x28, 10 classes, 64 per domain x 5 training domains.

Usage:
    .venv/bin/python benchmarks/bench_per_domain.py [--steps 30]

The machine may be shared: the load average is printed at start and end, and the min
over steps is given beside the median. With 2 threads on a loaded 2-core machine,
OpenMP barrier stalls penalise the sequential path (more, smaller kernels) more than
ERM; see per_domain.py for numbers measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domaingrad import models
from domaingrad.gradients.per_domain import per_domain_gradients

CONFIGS = {
    # name: (channels, classes, domains)
    "ColoredMNIST": (2, 2, 2),
    "RotatedMNIST": (1, 10, 5),
}


class MNIST_CNN(models.MNIST_CNN):
    """DomainBed's MNIST_CNN featurizer (domaingrad.models) with a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__((in_channels, 28, 28))
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(super().forward(x))


def fused_prototype(model: MNIST_CNN, xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """(d): per-domain grads, (D, *shape) each, in named_parameters order."""
    n_dom, b = len(xs), xs[0].shape[0]
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    gns = [model.bn0, model.bn1, model.bn2, model.bn3]
    saved: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, output)
    with torch.enable_grad():
        h = torch.cat(xs)
        for i, (conv, gn) in enumerate(zip(convs, gns)):
            w, bias = conv.weight.detach(), conv.bias.detach()
            c = F.conv2d(h, w, bias, conv.stride, conv.padding)
            if i == 0:
                c.requires_grad_()
            xhat = F.group_norm(F.relu(c), gn.num_groups, eps=gn.eps)
            g = xhat * gn.weight.detach()[:, None, None] + gn.bias.detach()[:, None, None]
            saved += [(conv, h, c), (gn, xhat, g)]
            h = g
        feat = h.mean((2, 3))
        lin = model.classifier
        logits = F.linear(feat, lin.weight.detach(), lin.bias.detach())
        saved.append((lin, feat, logits))
        losses = torch.stack([F.cross_entropy(lg, y) for lg, y in zip(logits.split(b), ys)])
        gouts = torch.autograd.grad(losses.sum(), [s[2] for s in saved])
    out: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    for (mod, inp, _), go in zip(saved, gouts):
        inp = inp.detach()
        if isinstance(mod, nn.Conv2d):
            gw = inp.new_empty((n_dom, *mod.weight.shape))
            gb = inp.new_empty((n_dom, *mod.bias.shape))
            for d in range(n_dom):
                s = slice(d * b, (d + 1) * b)
                _, gw[d], gb[d] = torch.ops.aten.convolution_backward(
                    go[s],
                    inp[s],
                    mod.weight.detach(),
                    [mod.out_channels],
                    mod.stride,
                    mod.padding,
                    mod.dilation,
                    False,
                    [0, 0],
                    1,
                    [False, True, True],
                )
        elif isinstance(mod, nn.GroupNorm):
            gw = (go * inp).unflatten(0, (n_dom, b)).sum((1, 3, 4))
            gb = go.unflatten(0, (n_dom, b)).sum((1, 3, 4))
        else:
            go3, in3 = go.unflatten(0, (n_dom, b)), inp.unflatten(0, (n_dom, b))
            gw = torch.einsum("dbo,dbi->doi", go3, in3)
            gb = go3.sum(1)
        out[mod] = (gw, gb)
    by_param = {}
    for mod, (gw, gb) in out.items():
        by_param[id(mod.weight)], by_param[id(mod.bias)] = gw, gb
    return [by_param[id(p)] for p in model.parameters()]


def bench_config(name: str, steps: int, warmup: int, batch: int, seed: int) -> list[tuple[str, float, float]]:
    channels, classes, n_dom = CONFIGS[name]
    torch.manual_seed(seed)
    model = MNIST_CNN(channels, classes)
    xs = [torch.rand(batch, channels, 28, 28) for _ in range(n_dom)]
    ys = [torch.randint(0, classes, (batch,)) for _ in range(n_dom)]
    minibatches = list(zip(xs, ys))
    x_all, y_all = torch.cat(xs), torch.cat(ys)

    def erm() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_all), y_all).backward()

    methods: dict[str, Callable[[], object]] = {
        "(a) ERM step (concat fwd+bwd)": erm,
        "(b) sequential": lambda: per_domain_gradients(model, minibatches, method="sequential"),
        "(c) vmap": lambda: per_domain_gradients(model, minibatches, method="vmap"),
        "(d) fused prototype": lambda: fused_prototype(model, xs, ys),
    }

    # consistency: the mean of the per-domain gradients is ERM's gradient; paths agree
    erm()
    erm_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seq = per_domain_gradients(model, minibatches, method="sequential").grads
    others = {
        "vmap": per_domain_gradients(model, minibatches, method="vmap").grads,
        "fused": fused_prototype(model, xs, ys),
    }
    rel = max(((g.mean(0) - e).norm() / e.norm()).item() for g, e in zip(seq, erm_grads))
    print(f"{name}: |mean_d g_d - g_ERM| / |g_ERM| <= {rel:.1e}")
    for k, gs in others.items():
        rel = max(((g - s).norm() / s.norm()).item() for g, s in zip(gs, seq))
        print(f"{name}: |{k} - sequential| / |sequential| <= {rel:.1e}")

    for f in methods.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for step in range(steps):
        rot = step % len(keys)
        for k in keys[rot:] + keys[:rot]:
            t0 = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - t0)
    return [(k, statistics.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    ap.add_argument("--batch", type=int, default=64, help="samples per domain")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for name in args.configs:
        rows.append((name, bench_config(name, args.steps, args.warmup, args.batch, args.seed)))
    print(f"load average at end {os.getloadavg()[0]:.2f}\n")
    print(f"steps {args.steps} (median and min over steps), warm-up {args.warmup}, batch {args.batch} per domain\n")
    print("| config | method | median ms | min ms | median / ERM | min / ERM |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, res in rows:
        erm_med, erm_min = res[0][1], res[0][2]
        for k, med, mn in res:
            print(f"| {name} | {k} | {med:.1f} | {mn:.1f} | {med / erm_med:.2f}x | {mn / erm_min:.2f}x |")


if __name__ == "__main__":
    main()
