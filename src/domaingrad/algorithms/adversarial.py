"""Adversarially trained feature distributions: URM (Krishnamachari et al., "Uniformly
Distributed Feature Representations for Fair and Robust Learning", TMLR 2024) and ADRMX
(Demirel, Aptoula, Ozkan, "ADRMX: Additive Disentanglement of Domain Features with Remix
Loss", arXiv:2308.06624, 2023), as DomainBed implements them (``domainbed/algorithms.py``
``URM`` and ``ADRMX``, ``domainbed/lib/misc.py`` ``SupConLossLambda``,
``domainbed/hparams_registry.py``; Gulrajani and Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..errors import DomainGradError
from ..hparams import NON_NEGATIVE, POSITIVE, Bounds, HParam
from .alignment import MLP
from .base import Algorithm, Minibatches
from .erm import ERM

#: ``urm_generator_output`` values and the interval [a, b) of the uniform target noise
URM_OUTPUTS = {"tanh": (-1.0, 1.0), "relu": (0.0, 1.0), "sigmoid": (0.0, 1.0)}
_URM_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def urm_discriminator(n_inputs: int, hidden_layers: int) -> nn.Sequential:
    """DomainBed's URM discriminator, with its module names: ``dense1`` Linear(n_inputs,
    100), ``act1`` LeakyReLU, then per hidden layer k = 2, 3, ...: ``dense{k}``
    Linear(100, 100) and ``act2{k}`` LeakyReLU, then ``output`` Linear(100, 1).
    Input (B, n_inputs); output (B, 1) logits ("is uniform noise")."""
    model = nn.Sequential()
    model.add_module("dense1", nn.Linear(n_inputs, 100))
    model.add_module("act1", nn.LeakyReLU())
    for k in range(2, 2 + hidden_layers):
        model.add_module(f"dense{k}", nn.Linear(100, 100))
        model.add_module(f"act2{k}", nn.LeakyReLU())
    model.add_module("output", nn.Linear(100, 1))
    return model


class URM(ERM):
    """Uniform Risk Minimization (Krishnamachari et al., "Uniformly Distributed Feature
    Representations for Fair and Robust Learning", TMLR 2024), DomainBed's ``URM``.

    The featurizer's output passes through a bounded activation (``urm_generator_output``:
    tanh, or relu / sigmoid) and a discriminator (:func:`urm_discriminator`) learns to
    tell those features from uniform noise on [a, b) (tanh: [-1, 1), relu and sigmoid:
    [0, 1)); the featurizer is trained to make its features look uniform. Each step, on
    the concatenated batch with features z = act(featurizer(x)):

    1. featurizer and classifier: one Adam step (``lr``, ``weight_decay``) on
       CE(classifier(z), y) + ``urm_adv_lambda`` * BCE(D(z), 1);
    2. discriminator: noise u ~ U[a, b) of z's shape; one step of its optimizer
       (``urm_discriminator_optimizer``: Adam, or SGD with momentum 0.9; learning rate
       ``urm_discriminator_lr``, ``weight_decay``) on BCE(D(u), t_true) +
       ``urm_adv_lambda`` * BCE(D(z.detach()), t_fake), where t_true = 1 and t_fake = 0,
       or with label smoothing s > 0 t_true ~ U[1 - s, 1] and t_fake ~ U[0, s] per
       example.

    ``predict`` is classifier(act(featurizer(x))).

    Parameter mapping to DomainBed: ``featurizer``, ``classifier``, ``discriminator``
    (same module names inside) are DomainBed's; DomainBed sets the activation on its
    featurizer (``featurizer.activation``, no parameters), here it is ``generator_output``
    and ``network`` is ``Sequential(featurizer, generator_output, classifier)`` (so
    ``network.2`` is DomainBed's ``network.1``). Optimizers: ``optimizer`` and
    ``discriminator_opt``, DomainBed's names.

    Randomness: the noise and the soft labels are drawn from ``self.generator`` (a CPU
    ``torch.Generator`` seeded from the global RNG at construction, saved by
    ``training_state``) instead of the global generator, in DomainBed's order (noise,
    then t_true, then t_fake); a parity check seeds ``algorithm.generator`` and the
    global RNG of DomainBed's side with the same value (same values on the CPU).

    Hyperparameters (DomainBed ``hparams_registry``): ``urm`` 'adversarial' (the only
    variant), ``urm_adv_lambda`` 0.1, U(0, 0.2); ``urm_discriminator_label_smoothing``
    0 (fixed); ``urm_discriminator_optimizer`` adam (fixed); ``urm_discriminator_hidden_layers``
    1, choice [1, 2, 3]; ``urm_generator_output`` tanh, choice [tanh, relu];
    ``urm_discriminator_lr`` 1e-3, 10**U(-5.5, -3.5) (small images) or 5e-5,
    10**U(-6, -4.5). DomainBed's smoothing default is the integer 0; here it is the float
    0.0 (same value).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        lr = (
            HParam(
                "urm_discriminator_lr",
                1e-3,
                lambda r: float(10 ** r.uniform(-5.5, -3.5)),
                "discriminator learning rate (DomainBed: 1e-3, 10**U(-5.5,-3.5))",
                bounds=POSITIVE,
            )
            if small_images
            else HParam(
                "urm_discriminator_lr",
                5e-5,
                lambda r: float(10 ** r.uniform(-6, -4.5)),
                "discriminator learning rate (DomainBed: 5e-5, 10**U(-6,-4.5))",
                bounds=POSITIVE,
            )
        )
        return [
            HParam(
                "urm",
                "adversarial",
                lambda r: "adversarial",
                "URM variant (DomainBed: adversarial only)",
                choices=("adversarial",),
            ),
            HParam(
                "urm_adv_lambda",
                0.1,
                lambda r: float(r.uniform(0, 0.2)),
                "weight of the adversarial terms (DomainBed: 0.1, U(0,0.2))",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "urm_discriminator_label_smoothing",
                0.0,
                lambda r: 0.0,
                "discriminator label smoothing s: targets U[1-s,1] and U[0,s] (DomainBed: 0, fixed)",
                bounds=Bounds(0.0, 1.0),
            ),
            HParam(
                "urm_discriminator_optimizer",
                "adam",
                lambda r: "adam",
                "discriminator optimizer: adam, or sgd with momentum 0.9 (DomainBed: adam, fixed)",
                choices=("adam", "sgd"),
            ),
            HParam(
                "urm_discriminator_hidden_layers",
                1,
                lambda r: int(r.choice([1, 2, 3])),
                "hidden 100-unit layers of the discriminator (DomainBed: 1, choice [1,2,3])",
                bounds=Bounds(0),
            ),
            HParam(
                "urm_generator_output",
                "tanh",
                lambda r: str(r.choice(["tanh", "relu"])),
                "activation on the features, sets the noise interval (DomainBed: tanh, choice [tanh, relu])",
                choices=tuple(URM_OUTPUTS),
            ),
            lr,
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        output = self.hparams["urm_generator_output"]
        if output not in URM_OUTPUTS:
            raise DomainGradError(
                f"hyperparameter 'urm_generator_output' must be one of {list(URM_OUTPUTS)}, got {output!r}"
            )
        self.discriminator = urm_discriminator(
            self.featurizer.n_outputs, self.hparams["urm_discriminator_hidden_layers"]
        )
        kind, lr, wd = (
            self.hparams["urm_discriminator_optimizer"],
            self.hparams["urm_discriminator_lr"],
            self.hparams["weight_decay"],
        )
        self.discriminator_opt: torch.optim.Optimizer
        if kind == "sgd":
            self.discriminator_opt = torch.optim.SGD(
                self.discriminator.parameters(), lr=lr, weight_decay=wd, momentum=0.9
            )
        elif kind == "adam":
            self.discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), lr=lr, weight_decay=wd)
        else:
            raise DomainGradError(f"hyperparameter 'urm_discriminator_optimizer' must be 'adam' or 'sgd', got {kind!r}")
        self.generator_output = _URM_ACTIVATIONS[output]()
        self.network = nn.Sequential(self.featurizer, self.generator_output, self.classifier)
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> (B, F) bounded features act(featurizer(x))."""
        return self.generator_output(self.featurizer(x))

    def _uniform(self, shape: tuple[int, ...], low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(shape, dtype=like.dtype, generator=self.generator).to(like.device)
        return (high - low) * u + low

    def discriminator_loss(self, feats: torch.Tensor) -> torch.Tensor:
        """Step 2's loss on detached features (B, F): BCE(D(u), t_true) + urm_adv_lambda *
        BCE(D(z), t_fake), drawing u (and soft targets) from ``self.generator``."""
        feats = feats.detach()
        a, b = URM_OUTPUTS[self.hparams["urm_generator_output"]]
        noise = self._uniform(tuple(feats.shape), a, b, feats)
        s = self.hparams["urm_discriminator_label_smoothing"]
        n = feats.shape[0]
        if s:
            true_y = self._uniform((n,), 1 - s, 1.0, feats)
            fake_y = self._uniform((n,), 0.0, s, feats)
        else:
            true_y, fake_y = feats.new_ones(n), feats.new_zeros(n)
        noise_loss = F.binary_cross_entropy_with_logits(self.discriminator(noise).squeeze(1), true_y)
        feats_loss = F.binary_cross_entropy_with_logits(self.discriminator(feats).squeeze(1), fake_y)
        return noise_loss + self.hparams["urm_adv_lambda"] * feats_loss

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        feats = self.features(all_x)
        ce = F.cross_entropy(self.classifier(feats), all_y)
        g_logits = self.discriminator(feats).squeeze(1)
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        loss = ce + self.hparams["urm_adv_lambda"] * g_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        d_loss = self.discriminator_loss(feats)
        self.discriminator_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.discriminator_opt.step()
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def supcon_lambda_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    lamda: float = 0.5,
    temperature: float = 0.07,
) -> torch.Tensor:
    """ADRMX's supervised contrastive loss with in/out-domain weights (DomainBed
    ``SupConLossLambda``), vectorised.

    With z_i = features_i / ||features_i|| and s_ji = z_j . z_i / temperature, for each
    anchor i and j != i the weight w_ji = ``lamda`` if domains_j == domains_i else
    1 - ``lamda``, e_ji = w_ji exp(s_ji) and D_i = sum_{j != i} e_ji + 1e-5; over the
    positives P_i = {j != i : labels_j == labels_i}:

        l_i = (1 / |P_i|) sum_{j in P_i} log(e_ji / D_i + 1e-5)

    Anchors without positives (DomainBed's NaN case) are skipped; with m of them the
    loss is -sum_i l_i / (B - m + 1) (DomainBed's "+ 1").

    Args:
        features: (B, F); labels, domains: (B,) int64.

    Returns:
        () loss.
    """
    b = features.shape[0]
    z = F.normalize(features, p=2, dim=1)
    sim = z @ z.T / temperature  # sim[j, i] = s_ji (symmetric)
    same_domain = domains[:, None] == domains[None, :]
    not_self = ~torch.eye(b, dtype=torch.bool, device=features.device)
    weights = torch.where(same_domain, torch.full_like(sim, lamda), torch.full_like(sim, 1 - lamda))
    e = weights * torch.exp(sim) * not_self
    denom = e.sum(dim=0) + 1e-5  # (B,) over j for each anchor i
    positives = (labels[:, None] == labels[None, :]) & not_self
    n_pos = positives.sum(dim=0)
    log_fraction = torch.log(e / denom[None, :] + 1e-5)
    per_anchor = (log_fraction * positives).sum(dim=0) / n_pos.clamp(min=1)
    valid = n_pos > 0
    skipped = int((~valid).sum())
    return -(per_anchor * valid).sum() / (b - skipped + 1)


#: ``adrmx_remix_pairs`` values
ADRMX_REMIX = ("class", "domainbed")


class ADRMX(Algorithm):
    """ADRMX (Demirel, Aptoula, Ozkan, "ADRMX: Additive Disentanglement of Domain Features
    with Remix Loss", arXiv:2308.06624, 2023), DomainBed's ``ADRMX``.

    Two featurizers: ``featurizer_label`` (f_l) and ``featurizer_domain`` (f_d); the
    domain-invariant features are f_inv = f_l - f_d. ``update_count`` is incremented
    first; if ``update_count % (1 + d_steps_per_g_step) < d_steps_per_g_step`` the
    ``discriminator`` (an :class:`~domaingrad.algorithms.alignment.MLP` from f_inv to the
    domain) takes an Adam step on disc_loss = CE(discriminator(f_inv), domain); otherwise
    featurizers and the three classifiers take one on

        CE(c_1(f_l), y) + CE(c_2(f_inv), y) + dclf_lambda CE(c_dom(f_d), domain)
        + rmxd_lambda L_remix + cnt_lambda (SupCon(f_l) + SupCon(f_inv))
        - disc_lambda disc_loss

    with :func:`supcon_lambda_loss` (lambda 0.5, temperature 0.07) and the remix loss:
    for each class k (one mix, DomainBed's ``mix_num = 1``) a random permutation of the
    n_k examples of class k; if n_k >= 2 its first two entries name a pair (i1, i2) and
    the loss adds CE(c_1(f_inv[i1] + f_d[i2]), y[i1]); the sum is divided by the number
    of classes. ``adrmx_remix_pairs``:

    * ``class`` (default; the rule DomainBed's comment states, "two instances from same
      class"): i1, i2 are the two examples of class k the permutation names;
    * ``domainbed``: DomainBed's code as written, which indexes the *batch* with the
      permutation's entries (positions 0..n_k-1 of the concatenated batch, of any class,
      the label that of i1): parity with DomainBed.

    Neither checks that the pair comes from different domains (nor does DomainBed).
    Both optimizers are Adam(lr, betas (``beta1``, 0.9)) without weight decay:
    ``disc_opt`` on the discriminator, ``opt`` on both featurizers and the three
    classifiers (all MLPs in -> in/2 -> in/4 -> out, DomainBed's nonlinear
    ``Classifier``). ``predict`` is c_1(f_l(x)) (``network``).

    Parameter names are DomainBed's (``featurizer_label``, ``featurizer_domain``,
    ``discriminator``, ``classifier_label_1``, ``classifier_label_2``,
    ``classifier_domain``, ``network``, ``opt``, ``disc_opt``); ``update_count`` is a ()
    buffer (DomainBed's has shape (1,)). Randomness: the per-class permutations come from
    ``self.generator`` (seeded from the global RNG at construction, saved by
    ``training_state``) in DomainBed's order (classes 0..C-1, one ``randperm(n_k)``
    each, also for n_k < 2), instead of the global generator; a parity check seeds
    both with the same value. On discriminator steps the featurizers run without a
    graph (DomainBed builds one and discards its gradients: the same parameters).
    Record keys are DomainBed's (``loss_disc`` on discriminator steps; ``loss_total``,
    ``loss_cnt_int``, ``loss_cnt_final``, ``loss_clf_int``, ``loss_clf_fin``,
    ``loss_dmn``, ``loss_disc``, ``loss_remixed`` otherwise).

    Hyperparameters (DomainBed ``hparams_registry``, all fixed but one): ``cnt_lambda``
    1.0, ``dclf_lambda`` 1.0, ``disc_lambda`` 0.75, ``rmxd_lambda`` 1.0,
    ``d_steps_per_g_step`` 2, ``beta1`` 0.5, ``mlp_width`` 256, ``mlp_depth`` 9 (choice
    [8, 9, 10]), ``mlp_dropout`` 0. DomainBed also gives ADRMX its own ``lr``: 3e-3,
    choice [5e-4, 1e-3, 2e-3, 3e-3] (small images) or 3e-5, choice [2e-5, 3e-5, 4e-5,
    5e-5]: :meth:`common_overrides`.
    """

    update_count: torch.Tensor  # () long buffer, registered in __init__
    #: DomainBed's ``mix_num``: remixed pairs per class and step
    mix_num = 1

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        def fixed(name: str, value: Any, text: str, **kw: Any) -> HParam:
            return HParam(name, value, lambda r: value, f"{text} (DomainBed: {value}, fixed)", **kw)

        return [
            fixed("cnt_lambda", 1.0, "weight of the two contrastive losses", bounds=NON_NEGATIVE),
            fixed("dclf_lambda", 1.0, "weight of the domain classifier's loss", bounds=NON_NEGATIVE),
            fixed("disc_lambda", 0.75, "weight of the negated discriminator loss", bounds=NON_NEGATIVE),
            fixed("rmxd_lambda", 1.0, "weight of the remix loss", bounds=NON_NEGATIVE),
            fixed("d_steps_per_g_step", 2, "discriminator steps per generator step", bounds=Bounds(1)),
            fixed("beta1", 0.5, "Adam beta1 of both optimizers", bounds=Bounds(0.0, 1.0, high_open=True)),
            fixed("mlp_width", 256, "discriminator width", bounds=Bounds(1)),
            HParam(
                "mlp_depth",
                9,
                lambda r: int(r.choice([8, 9, 10])),
                "discriminator depth in Linear layers (DomainBed: 9, choice [8,9,10])",
                bounds=Bounds(2),
            ),
            fixed("mlp_dropout", 0.0, "discriminator dropout", bounds=Bounds(0.0, 1.0, high_open=True)),
            HParam(
                "adrmx_remix_pairs",
                "class",
                lambda r: "class",
                "remix pairs: class = two examples of the class (DomainBed's stated rule), domainbed = "
                "DomainBed's code as written (batch positions)",
                choices=ADRMX_REMIX,
            ),
        ]

    @classmethod
    def common_overrides(cls, small_images: bool, dataset: str | None = None) -> list[HParam]:
        """DomainBed's ADRMX-specific ``lr``: 3e-3, choice [5e-4, 1e-3, 2e-3, 3e-3] on small
        images, else 3e-5, choice [2e-5, 3e-5, 4e-5, 5e-5]."""
        values = [5e-4, 1e-3, 2e-3, 3e-3] if small_images else [2e-5, 3e-5, 4e-5, 5e-5]
        default = 3e-3 if small_images else 3e-5
        return [
            HParam(
                "lr",
                default,
                lambda r: float(r.choice(values)),
                f"Adam learning rate (DomainBed's ADRMX: {default:g}, choice {values})",
                bounds=POSITIVE,
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["adrmx_remix_pairs"] not in ADRMX_REMIX:
            raise DomainGradError(
                f"hyperparameter 'adrmx_remix_pairs' must be one of {list(ADRMX_REMIX)}, "
                f"got {self.hparams['adrmx_remix_pairs']!r}"
            )
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.featurizer_label = models.featurizer_for(input_shape, self.hparams)
        self.featurizer_domain = models.featurizer_for(input_shape, self.hparams)
        n = self.featurizer_label.n_outputs
        self.discriminator = MLP(self.featurizer_domain.n_outputs, num_domains, self.hparams)
        self.classifier_label_1 = models.classifier(n, num_classes, True)
        self.classifier_label_2 = models.classifier(n, num_classes, True)
        self.classifier_domain = models.classifier(self.featurizer_domain.n_outputs, num_domains, True)
        self.network = nn.Sequential(self.featurizer_label, self.classifier_label_1)
        betas = (self.hparams["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams["lr"], betas=betas)
        self.opt = torch.optim.Adam(
            list(self.featurizer_label.parameters())
            + list(self.featurizer_domain.parameters())
            + list(self.classifier_label_1.parameters())
            + list(self.classifier_label_2.parameters())
            + list(self.classifier_domain.parameters()),
            lr=self.hparams["lr"],
            betas=betas,
        )
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def remix_pairs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The remix pairs of one step: (i1, i2), each (k,) int64 indices into the batch,
        one pair per class with at least two examples (see ``adrmx_remix_pairs``)."""
        first, second = [], []
        for k in range(self.num_classes):
            indices = torch.where(y == k)[0]
            for _ in range(self.mix_num):
                perm = torch.randperm(indices.numel(), generator=self.generator).to(y.device)
                if perm.numel() < 2:
                    continue
                if self.hparams["adrmx_remix_pairs"] == "class":
                    first.append(indices[perm[0]])
                    second.append(indices[perm[1]])
                else:
                    first.append(perm[0])
                    second.append(perm[1])
        if not first:
            empty = torch.zeros(0, dtype=torch.long, device=y.device)
            return empty, empty
        return torch.stack(first), torch.stack(second)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        self.update_count += 1
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        domains = torch.cat(
            [
                torch.full((x.shape[0],), d, dtype=torch.int64, device=all_x.device)
                for d, (x, _) in enumerate(minibatches)
            ]
        )
        d_steps = self.hparams["d_steps_per_g_step"]
        if int(self.update_count) % (1 + d_steps) < d_steps:
            with torch.no_grad():
                combined = self.featurizer_label(all_x) - self.featurizer_domain(all_x)
            disc_loss = F.cross_entropy(self.discriminator(combined), domains)
            self.disc_opt.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_opt.step()
            return {"loss_disc": disc_loss.item()}

        feat_label = self.featurizer_label(all_x)
        feat_domain = self.featurizer_domain(all_x)
        combined = feat_label - feat_domain
        disc_loss = F.cross_entropy(self.discriminator(combined), domains)
        loss_domain = F.cross_entropy(self.classifier_domain(feat_domain), domains)
        loss_int = F.cross_entropy(self.classifier_label_1(feat_label), all_y)
        cnt_int = supcon_lambda_loss(feat_label, all_y, domains)
        loss_final = F.cross_entropy(self.classifier_label_2(combined), all_y)
        cnt_final = supcon_lambda_loss(combined, all_y, domains)
        i1, i2 = self.remix_pairs(all_y)
        if i1.numel():
            remixed = self.classifier_label_1(combined[i1] + feat_domain[i2])
            loss_remix = F.cross_entropy(remixed, all_y[i1], reduction="sum") / (self.num_classes * self.mix_num)
        else:
            loss_remix = combined.new_zeros(())
        gen_loss = (
            loss_int
            + loss_final
            + self.hparams["dclf_lambda"] * loss_domain
            + self.hparams["rmxd_lambda"] * loss_remix
            + self.hparams["cnt_lambda"] * (cnt_int + cnt_final)
            - self.hparams["disc_lambda"] * disc_loss
        )
        self.disc_opt.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        gen_loss.backward()
        self.opt.step()
        return {
            "loss_total": gen_loss.item(),
            "loss_cnt_int": cnt_int.item(),
            "loss_cnt_final": cnt_final.item(),
            "loss_clf_int": loss_int.item(),
            "loss_clf_fin": loss_final.item(),
            "loss_dmn": loss_domain.item(),
            "loss_disc": disc_loss.item(),
            "loss_remixed": loss_remix.item(),
        }

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)
