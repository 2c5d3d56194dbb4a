"""Reproduce the IRM-setup Colored MNIST table (Table 2) of Rame, Dancette, Cord, "Fishr:
Invariant Gradient Variances for Out-of-Distribution Generalization", ICML 2022.

The measured table beside the paper's is in docs/results.md (``domaingrad reproduce
fishr-colored-mnist --workers 2``, the 10,000 embedded digits, 10 restarts).

Label noise: with the paper's 25,000 digits per training environment the MLP cannot
memorise the 25% noisy labels in 501 full-batch steps; with 4,167 it does, and the
invariance penalties are then satisfied by memorising. So on fewer than 60,000 digits
the default (``label_noise="per-step"``, a documented deviation) draws the label noise
and the colours afresh at every step from a seeded generator, which keeps the population
the paper samples from while making memorisation impossible; ``label_noise="fixed"``
(``--label-noise fixed``) is the paper's protocol and the default on full MNIST.

Protocol: the Colored MNIST of Arjovsky, Bottou, Gulrajani, Lopez-Paz, "Invariant Risk
Minimization", arXiv:1907.02893, 2019 (Section 5.2), as run by the Fishr repository's
``coloredmnist`` script (github.com/alexrame/fishr, ``coloredmnist/train_coloredmnist.py``),
with the hyperparameters tuned there and used for ALL four methods (ERM, IRM, V-REx,
Fishr):

Data (per restart, seeded):
  * the MNIST training digits are divided 5/6 : 1/6 -- MNIST train[:50000] and
    train[50000:60000] as in the paper when the user has MNIST (``data_dir``); with the
    10,000 embedded digits (stored sorted by class) 8,333 : 1,667, the 1,667 test digits
    being evenly spaced through the stored order (see :func:`split_indices`);
  * the first part is shuffled; its even-indexed digits form training environment 0
    (colour-flip e = 0.2), its odd-indexed digits environment 1 (e = 0.1); the second part
    (unshuffled) is the test environment (e = 0.9);
  * images are 2x subsampled (``[:, ::2, ::2]``, 14x14) and scaled to [0, 1]; binary
    label = (digit < 5) flipped with probability 0.25; colour = label XOR Bernoulli(e);
    the image is put in both of 2 channels and channel ``1 - colour`` is zeroed;
  * gray test: the test digits built again by the same recipe but with the zeroing
    skipped, so both channels hold the digit (no colour information). As in the Fishr
    repository (to the best of our knowledge: it calls its environment builder a fourth
    time with ``grayscale=True``), the 25% label noise of the gray test is drawn afresh,
    independently of the coloured test environment's.

Model and training: MLP 392-390-390-1 with ReLU, Xavier-uniform weights and zero
biases; binary cross-entropy with logits; full batch every step; Adam (lr
0.0004898536566546834), 501 steps, no optimizer reset:

    loss = nll + 0.00110794568 * sum_p ||p||^2 + pw * penalty,
    pw = 1.0 before step 190, 91257.186 from step 190 on; loss /= pw if pw > 1.

``nll`` is the mean over the two training environments of each environment's mean BCE.
ERM is run as the IRM repository runs it, with penalty weight 0: no penalty and no
division of the loss after step 190. (With the shared schedule instead, the division by
91257 shrinks ERM's fresh gradients ~1e5-fold while Adam's momentum still moves the
weights for ~20 steps: on the embedded digits ERM's training accuracy then dropped from
~0.91 at step 189 to ~0.78 around step 230, unlike the paper's ERM.)

Cost: each step is about 13 GFLOP of dense matrix products (8,333 digits through the
392-390-390 MLP, forward and backward), so a 501-step run takes about 2 minutes on one
core; with ``workers=2`` (one per core, one thread each) the 40 runs of the default
(4 methods x 10 restarts) take about 40 minutes on 2 cores (from the measured run times
of the last restarts, 112-135 s each, two at a time), and about six times more on the
50,000 MNIST digits.

Penalties:
  * IRM: per environment, (d/ds mean BCE(s * logits, y) at s = 1)^2, averaged over the
    two training environments (the IRM paper's penalty). Computed with the exact closed
    form d/ds = mean((sigmoid(z) - y) * z).
  * VREx: the squared difference of the two training environments' mean losses,
    (L_0 - L_1)^2, as in the Fishr repository's script (``coloredmnist/
    train_coloredmnist.py`` line 246) whose tuned penalty weight is used here; this is 4x
    the population variance that the V-REx paper and DomainBed penalise (see
    :func:`vrex_penalty`).
  * Fishr: per environment, per-sample gradients of the per-sample BCE w.r.t. the final
    linear layer (weight and bias, 391 coordinates), exact closed form
    (sigmoid(z) - y) * [features, 1]; centred variance over the environment's samples
    v_e = mean_i (g_i - mean g)^2; penalty = sum_e sum_coordinates (v_e - mean_e v_e)^2;
    no exponential moving average. (Tests check the closed form against torch.func.)

Accuracies are those of the last step (its forward pass, before its update); train
accuracy is the mean over the two training environments; std over restarts is the
population std (ddof 0), as printed by the IRM/Fishr scripts. Restart r seeds every
random draw (shuffling, label noise, colours, initialisation) with ``seed + r``; all
methods of one restart share the same data and the same initial network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad.data.digits import load_mnist
from domaingrad.errors import DomainGradError
from domaingrad.rng import seed_hash

from .colored_mnist_penalties import (  # re-exported: part of this module's interface
    fishr_penalty as fishr_penalty,
)
from .colored_mnist_penalties import (
    gradient_variance as gradient_variance,
)
from .colored_mnist_penalties import (
    irm_penalty as irm_penalty,
)
from .colored_mnist_penalties import (
    mean_accuracy as mean_accuracy,
)
from .colored_mnist_penalties import (
    mean_nll as mean_nll,
)
from .colored_mnist_penalties import (
    per_sample_classifier_grads as per_sample_classifier_grads,
)
from .colored_mnist_penalties import (
    per_sample_classifier_grads_vmap as per_sample_classifier_grads_vmap,
)
from .colored_mnist_penalties import (
    vrex_penalty as vrex_penalty,
)

HPARAMS = {
    "hidden_dim": 390,
    "l2_regularizer_weight": 0.00110794568,
    "lr": 0.0004898536566546834,
    "penalty_anneal_iters": 190,
    "penalty_weight": 91257.18613115903,
    "steps": 501,
}

ENV_FLIPS = (0.2, 0.1)  # colour-flip probabilities of the two training environments
TEST_FLIP = 0.9
LABEL_NOISE = 0.25

#: Fishr paper (Rame, Dancette, Cord, ICML 2022) Table 2 (IRM setup), mean over 10 runs:
#: train / test / gray-test accuracy, %.
PAPER = {
    "ERM": (86.4, 14.0, 71.0),
    "IRM": (71.0, 65.6, 66.1),
    "VREx": (71.7, 67.2, 68.6),
    "Fishr": (71.0, 69.5, 70.2),
}

METHODS = ("ERM", "IRM", "VREx", "Fishr")
LABEL_NOISE_MODES = ("fixed", "per-step")
_ALIASES = {"erm": "ERM", "irm": "IRM", "vrex": "VREx", "v-rex": "VREx", "rex": "VREx", "fishr": "Fishr"}


@dataclass
class Environment:
    """One Colored MNIST environment: x float32 (n, 2, 14, 14), y float32 (n, 1) in {0, 1}."""

    x: torch.Tensor
    y: torch.Tensor
    colors: torch.Tensor  # float32 (n,) in {0, 1}: the channel that holds the digit
    flip: float


def canonical_method(name: str) -> str:
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise DomainGradError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def make_environment(
    images: torch.Tensor, digits: torch.Tensor, e: float, generator: torch.Generator, grayscale: bool = False
) -> Environment:
    """Colour ``images`` (uint8 (n, 28, 28)) the IRM way; see the module docstring."""
    n = len(images)
    x = images[:, ::2, ::2].float() / 255.0
    noise = (torch.rand(n, generator=generator) < LABEL_NOISE).float()
    y = ((digits < 5).float() - noise).abs()
    colors = (y - (torch.rand(n, generator=generator) < e).float()).abs()
    x = torch.stack([x, x], dim=1)
    if not grayscale:
        x[torch.arange(n), (1 - colors).long()] = 0.0
    return Environment(x.contiguous(), y[:, None], colors, e)


def split_indices(n_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """(training-pool indices, test-environment indices) into the loaded digits.

    * >= 60,000 digits (the user's MNIST, train first): the paper's split, MNIST
      train[:50000] for the two training environments and train[50000:60000] for the test
      environment.
    * fewer (the 10,000 embedded digits): the same 5/6 : 1/6 proportions, 8,333 : 1,667.
      The embedded digits are stored SORTED BY CLASS, so a contiguous cut would give a test
      environment of only 8s and 9s; the test environment is instead the n - n*5//6 evenly
      spaced digits floor((k + 1/2) * n / n_test), k = 0..n_test-1 (about 1/6 of every
      class), and the training pool is the other n*5//6 digits, in stored order.
    """
    if n_digits >= 60000:
        return np.arange(50000), np.arange(50000, 60000)
    n_test = n_digits - n_digits * 5 // 6
    test = ((np.arange(n_test) + 0.5) * n_digits / n_test).astype(np.int64)
    mask = np.ones(n_digits, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _training_pool(
    images: torch.Tensor, digits: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The shuffled training digits (images, digits) of restart ``seed`` and the generator
    that shuffled them, which :func:`build_environments` goes on drawing from."""
    train_idx, _ = split_indices(len(images))
    g = torch.Generator().manual_seed(seed)
    perm = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=g)]
    return images[perm], digits[perm], g


def build_environments(
    images: torch.Tensor, digits: torch.Tensor, seed: int
) -> tuple[list[Environment], Environment, Environment]:
    """(training environments [e=0.2, e=0.1], test environment e=0.9, gray test)."""
    tr_images, tr_digits, g = _training_pool(images, digits, seed)
    te = torch.as_tensor(split_indices(len(images))[1])
    te_images, te_digits = images[te], digits[te]
    train = [
        make_environment(tr_images[0::2], tr_digits[0::2], ENV_FLIPS[0], g),
        make_environment(tr_images[1::2], tr_digits[1::2], ENV_FLIPS[1], g),
    ]
    test = make_environment(te_images, te_digits, TEST_FLIP, g)
    gray = make_environment(te_images, te_digits, TEST_FLIP, g, grayscale=True)
    return train, test, gray


class MLP(nn.Module):
    """392-hidden-hidden-1 ReLU MLP; ``features`` is the input of the final linear layer."""

    def __init__(self, hidden_dim: int = 390, generator: torch.Generator | None = None):
        super().__init__()
        self.lin1 = nn.Linear(2 * 14 * 14, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, 1)
        for lin in (self.lin1, self.lin2, self.classifier):
            nn.init.xavier_uniform_(lin.weight, generator=generator)
            nn.init.zeros_(lin.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        return F.relu(self.lin2(F.relu(self.lin1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_one(
    method: str,
    envs: list[Environment],
    test: Environment,
    gray: Environment,
    seed: int,
    steps: int = 501,
    penalty_anneal_iters: int = 190,
    hparams: dict | None = None,
    redraw: Callable[[], list[Environment]] | None = None,
) -> dict[str, float]:
    """Train one network with ``method``; accuracies of the last step.

    ``redraw``, when given, is called before every step and returns that step's training
    environments (label noise and colours drawn afresh, see :func:`environment_redrawer`);
    ``envs`` is then only used for the sizes.
    """
    hp = dict(HPARAMS, **(hparams or {}))
    model = MLP(hp["hidden_dim"], torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    out: dict[str, float] = {}
    for step in range(steps):
        if redraw is not None:
            envs = redraw()
        x = torch.cat([e.x for e in envs])
        sizes = [len(e.x) for e in envs]
        ys = [e.y for e in envs]
        feats = model.features(x)
        logits = model.classifier(feats)
        env_logits = logits.split(sizes)
        nlls = [mean_nll(z, y) for z, y in zip(env_logits, ys)]
        nll = torch.stack(nlls).mean()
        if method == "ERM":
            penalty = torch.zeros(())
        elif method == "IRM":
            penalty = torch.stack([irm_penalty(z, y) for z, y in zip(env_logits, ys)]).mean()
        elif method == "VREx":
            penalty = vrex_penalty(nlls)
        elif method == "Fishr":
            grads = per_sample_classifier_grads(feats, logits, torch.cat(ys))
            penalty = fishr_penalty([gradient_variance(g) for g in grads.split(sizes)])
        else:
            raise DomainGradError(f"unknown method {method!r}")
        weight_norm = sum(p.pow(2).sum() for p in model.parameters())
        # ERM as the IRM repository runs it (--penalty_weight 0): no penalty and so no
        # division of the loss by the penalty weight after the anneal step
        after = 0.0 if method == "ERM" else hp["penalty_weight"]
        pw = after if step >= penalty_anneal_iters else 1.0
        loss = nll + hp["l2_regularizer_weight"] * weight_norm + pw * penalty
        if pw > 1.0:
            loss = loss / pw
        if not torch.isfinite(loss):
            raise DomainGradError(f"{method}: non-finite loss at step {step}")
        if step == steps - 1:
            with torch.no_grad():
                out = {
                    "train": float(np.mean([mean_accuracy(z, y) for z, y in zip(env_logits, ys)])),
                    "test": mean_accuracy(model(test.x), test.y),
                    "gray_test": mean_accuracy(model(gray.x), gray.y),
                }
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return out


def environment_redrawer(images: torch.Tensor, digits: torch.Tensor, seed: int) -> Callable[[], list[Environment]]:
    """A function returning the two training environments with label noise and colours
    drawn afresh at each call (``label_noise="per-step"``), from a generator seeded with
    ``seed``. The digits of each environment are the same as in
    :func:`build_environments` for that seed; only the Bernoulli draws change."""
    tr_images, tr_digits, _ = _training_pool(images, digits, seed)
    noise = torch.Generator().manual_seed(seed_hash(seed, "label-noise"))

    def redraw() -> list[Environment]:
        return [
            make_environment(tr_images[0::2], tr_digits[0::2], ENV_FLIPS[0], noise),
            make_environment(tr_images[1::2], tr_digits[1::2], ENV_FLIPS[1], noise),
        ]

    return redraw


def _job(
    images: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    restart_seed: int,
    steps: int,
    anneal: int,
    label_noise: str,
) -> tuple[dict[str, float], float]:
    """One (method, restart) run, in whichever process: (accuracies, seconds)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    envs, test, gray = build_environments(images, labels, restart_seed)
    redraw = environment_redrawer(images, labels, restart_seed) if label_noise == "per-step" else None
    acc = train_one(method, envs, test, gray, restart_seed, steps=steps, penalty_anneal_iters=anneal, redraw=redraw)
    return acc, time.perf_counter() - t0


def default_label_noise(n_digits: int) -> str:
    """``fixed`` (the paper's) with full MNIST, ``per-step`` with fewer digits (the embedded
    10,000), where fixed noise is memorised; see the module docstring."""
    return "fixed" if n_digits >= 60000 else "per-step"


def run(
    data_dir: str | None = None,
    restarts: int = 10,
    steps: int = 501,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    log: Callable[[str], object] = print,
    *,
    n_digits: int | None = None,
    label_noise: str | None = None,
    workers: int = 1,
) -> dict:
    """Run the reproduction; returns {method: {"train": [...], "test": [...],
    "gray_test": [...], "train_mean", "train_std", "test_mean", ...}} (accuracies in [0, 1]).

    ``steps`` other than 501 scales the penalty-anneal step proportionally
    (round(190 * steps / 501)). ``n_digits`` (keyword only, for tests and quick looks)
    uses only ``n_digits`` evenly spaced digits of the (first 60,000) loaded digits, divided
    5/6 : 1/6 like the full set. ``label_noise`` is ``fixed`` (the paper's: drawn once per
    restart) or ``per-step`` (drawn afresh at every step); None picks
    :func:`default_label_noise`. ``workers`` processes run the (method, restart) jobs,
    one thread each; the results do not depend on ``workers``.

    Raises:
        DomainGradError: bad counts, an unknown method or label-noise mode, or no data.
    """
    if restarts < 1 or steps < 1 or workers < 1:
        raise DomainGradError("restarts, steps and workers must be >= 1")
    names = [canonical_method(m) for m in methods]
    anneal = (
        int(HPARAMS["penalty_anneal_iters"])
        if steps == HPARAMS["steps"]
        else round(HPARAMS["penalty_anneal_iters"] * steps / HPARAMS["steps"])
    )
    digits = load_mnist(data_dir)
    images, labels = digits.images, digits.labels
    if n_digits is not None and n_digits < len(images):
        available = min(len(images), 60000)
        idx = torch.as_tensor((np.arange(n_digits) * available) // n_digits)
        images, labels = images[idx], labels[idx]
    label_noise = label_noise or default_label_noise(len(images))
    if label_noise not in LABEL_NOISE_MODES:
        raise DomainGradError(f"unknown label noise mode {label_noise!r}; choose from {', '.join(LABEL_NOISE_MODES)}")
    train_idx, test_idx = split_indices(len(images))
    n_env = len(train_idx)
    how = (
        "MNIST train[:50000] / train[50000:60000]"
        if len(images) >= 60000
        else f"{len(test_idx)} evenly spaced digits for test, the other {n_env} for training"
    )
    log(f"{digits.source}")
    log(
        f"Colored MNIST (IRM setup): {how}; training pool shuffled -> train envs "
        f"{n_env - n_env // 2} (e=0.2) + {n_env // 2} (e=0.1); test env {len(test_idx)} (e=0.9) "
        f"and gray test; label noise and colours "
        f"{'drawn afresh every step' if label_noise == 'per-step' else 'drawn once per restart'}; "
        f"{steps} steps, penalty from step {anneal}, {restarts} restarts, seeds {seed}..{seed + restarts - 1}, "
        f"{workers} worker(s)"
    )
    jobs = [(m, r) for r in range(restarts) for m in names]
    accuracies: dict[str, dict[str, list[float]]] = {m: {"train": [], "test": [], "gray_test": []} for m in names}
    done: dict[tuple[str, int], dict[str, float]] = {}

    def record(job: tuple[str, int], acc: dict[str, float], seconds: float) -> None:
        done[job] = acc
        m, r = job
        log(
            f"restart {r + 1}/{restarts} {m:5s} train {acc['train']:.3f} test {acc['test']:.3f} "
            f"gray {acc['gray_test']:.3f} ({seconds:.1f} s)"
        )

    if workers == 1:
        n_threads = torch.get_num_threads()
        try:
            for m, r in jobs:
                record((m, r), *_job(images, labels, m, seed + r, steps, anneal, label_noise))
        finally:
            torch.set_num_threads(n_threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as executor:
            futures = {
                executor.submit(_job, images, labels, m, seed + r, steps, anneal, label_noise): (m, r) for m, r in jobs
            }
            for future in as_completed(futures):
                record(futures[future], *future.result())
    for m, r in jobs:
        for k, v in done[(m, r)].items():
            accuracies[m][k].append(v)
    results: dict[str, dict[str, Any]] = {m: dict(accuracies[m]) for m in names}
    for m in names:
        for k in ("train", "test", "gray_test"):
            results[m][f"{k}_mean"] = float(np.mean(accuracies[m][k]))
            results[m][f"{k}_std"] = float(np.std(accuracies[m][k]))
    results_meta = {"label_noise": label_noise, "n_digits": len(images), "steps": steps, "restarts": restarts}
    return {"methods": results, "meta": results_meta}


def format_table(results: dict) -> str:
    """Markdown table of :func:`run`'s output: accuracies in % as mean +- std over
    restarts, beside the paper's, and a line saying how they were obtained."""
    methods, meta = results["methods"], results.get("meta", {})
    lines = ["| method | train | test | gray test | paper train / test / gray test |", "|---|---|---|---|---|"]
    for m, res in methods.items():
        cells = []
        for k in ("train", "test", "gray_test"):
            cells.append(f"{100 * res[f'{k}_mean']:.1f} +- {100 * res[f'{k}_std']:.1f}")
        paper = PAPER.get(m)
        paper_cell = " / ".join(f"{v:.1f}" for v in paper) if paper else "-"
        label = "V-REx" if m == "VREx" else m
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper_cell} |")
    n = max((len(r["test"]) for r in methods.values()), default=0)
    how = ""
    if meta:
        noise = "drawn afresh every step" if meta["label_noise"] == "per-step" else "drawn once per restart"
        how = f" {meta['n_digits']} digits, {meta['steps']} steps, label noise and colours {noise}."
    lines.append("")
    lines.append(
        f"Ours: mean +- std (population) over {n} restart(s), last step.{how} Paper: mean over "
        "10 runs (Fishr paper, IRM-setup Colored MNIST, its repository's coloredmnist "
        "script, 50,000 training digits, noise drawn once); same tuned hyperparameters for "
        "all four methods."
    )
    return "\n".join(lines)
