"""Structured dropout guided by gradients: DropBlock (Ghiasi, Lin, Le, "DropBlock: A
regularization method for convolutional networks", NeurIPS 2018), GSNR-guided DropBlock
("DB+gsnr") and Meta-GSNR (Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain
Generalization Guided by Gradient Signal to Noise Ratio of Parameters", ICCV 2023, and its
supplementary material). RSC is in :mod:`domaingrad.algorithms.rsc`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd, nn
from torch.func import functional_call

from ..errors import DomainGradError
from ..gradients.gsnr import drop_block2d, drop_block2d_gsnr
from ..hparams import HParam
from ..models import Featurizer
from .base import Minibatches, concat_minibatches
from .erm import ERM


def resolve_dropout_stages(featurizer: Featurizer, spec: str) -> tuple[tuple[str, ...], bool]:
    """Parse ``dropblock_stages``: "auto" = every stage whose output is 4-D (checked at run
    time; flat stages such as AlexNet's pool5 are skipped), or comma-separated stage names
    (each must then be 4-D). Returns (names, explicit).

    Raises:
        DomainGradError: for an unknown stage name.
    """
    if spec == "auto":
        return tuple(featurizer.stage_names), False
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    bad = [n for n in names if n not in featurizer.stage_names]
    if bad or not names:
        raise DomainGradError(
            f"dropblock_stages {spec!r}: unknown stage(s) {bad}; expected 'auto' or a "
            f"comma-separated list of: {', '.join(featurizer.stage_names)}"
        )
    return names, True


def loss_gap(unmasked_loss: torch.Tensor, masked_loss: torch.Tensor) -> float:
    """The loss difference ``Gamma(theta(t)) = |h(theta, z) - h(theta, z~)|`` of one step
    (Michalkiewicz et al., ICCV 2023, supplementary material, Section 2 and Fig. 1), h
    the batch's *mean* cross-entropy (the supplement writes the sum, N times this):
    the unmasked loss of the GSNR pass (Listing 1, line 3) against the loss of the
    dropout pass (line 7), both on the same batch, so no extra forward pass.

    Args:
        unmasked_loss, masked_loss: () mean cross-entropies.

    Returns:
        ``|unmasked_loss - masked_loss|`` as a Python float (a record value).
    """
    return (unmasked_loss.detach() - masked_loss.detach()).abs().item()


class DropBlock(ERM):
    """ERM with DropBlock (Ghiasi, Lin, Le, NeurIPS 2018) on the outputs of chosen featurizer
    stages during training, torchvision's ``drop_block2d`` with a saved generator
    (:func:`domaingrad.gradients.gsnr.drop_block2d`; ``p`` = fraction of units dropped,
    ``block_size`` clamped to the map and kept odd). Prediction uses no dropout.

    Defaults are domaingrad's choice (Michalkiewicz et al., ICCV 2023, give none in their
    supplementary material): p 0.1 (DropBlock's keep_prob 0.9), block 3 (MNIST-sized) or
    5, every 4-D stage (ResNet layer1..layer4, as that supplement's Listing 1 drops after
    every ResNet block).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        sizes = [1, 3] if small_images else [1, 3, 5, 7]
        return [
            HParam(
                "dropblock_p",
                0.1,
                lambda r: float(r.uniform(0.05, 0.3)),
                "DropBlock drop probability p (domaingrad default 0.1, search U(0.05,0.3))",
            ),
            HParam(
                "dropblock_size",
                3 if small_images else 5,
                lambda r: int(r.choice(sizes)),
                f"DropBlock block size, odd (clamped to the map); search {sizes}",
            ),
            HParam(
                "dropblock_stages",
                "auto",
                lambda r: "auto",
                "stages whose outputs are dropped: 'auto' (all 4-D stages) or comma-separated names",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if not 0.0 <= self.hparams["dropblock_p"] <= 1.0:
            raise DomainGradError(f"hyperparameter 'dropblock_p' must be in [0, 1], got {self.hparams['dropblock_p']}")
        size = self.hparams["dropblock_size"]
        if size < 1 or size % 2 == 0:
            raise DomainGradError(f"hyperparameter 'dropblock_size' must be a positive odd integer, got {size}")
        self.stages, self.stages_explicit = resolve_dropout_stages(self.featurizer, self.hparams["dropblock_stages"])
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def stage_hook(
        self, fn: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """A ``stage_fn`` applying ``fn(name, out)`` to the chosen stages (4-D outputs)."""

        def stage_fn(name: str, out: torch.Tensor) -> torch.Tensor:
            if name not in self.stages:
                return out
            if out.ndim != 4:
                if self.stages_explicit:
                    raise DomainGradError(
                        f"stage {name!r} has output shape {tuple(out.shape)}; DropBlock needs "
                        f"(N, C, H, W) maps, choose other dropblock_stages"
                    )
                return out
            return fn(name, out)

        return stage_fn

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, drop: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Forward with ``drop`` applied to the chosen stages, CE, backward, Adam step."""
        loss = F.cross_entropy(self.classifier(self.featurizer(x, stage_fn=self.stage_hook(drop))), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        x, y = concat_minibatches(minibatches)
        p, b = self.hparams["dropblock_p"], self.hparams["dropblock_size"]
        loss = self.train_step(x, y, lambda name, out: drop_block2d(out, p, b, self.generator))
        return {"loss": loss.item()}


class GSNRDropBlock(DropBlock):
    """GSNR-guided DropBlock (Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain
    Generalization Guided by Gradient Signal to Noise Ratio of Parameters", ICCV 2023,
    supplementary material, Listings 1 and 2 and Table 4).

    Each step (Listing 1): (1) forward the concatenated batch, mean cross-entropy, and its
    gradients with respect to each chosen stage output (one backward, no parameter
    gradients); (2) forward again applying
    :func:`~domaingrad.gradients.gsnr.drop_block2d_gsnr` to each chosen stage output with
    its gradients: the units of highest batch-wise GSNR become block seeds (M1, their
    number set by ``dropblock_p``), grown to ``dropblock_size`` blocks, zeroed and the rest
    rescaled; backward, Adam step. ``update`` returns ``loss`` (of the dropout pass) and
    ``loss_gap`` (:func:`loss_gap`, the supplement's Gamma: |loss of pass (1) - loss of
    pass (2)|, no extra pass).

    The mask M2 on the seeds, hparam ``gsnr_p``:

    * ``gsnr_p = 1`` (default): M2 = 1, every top-GSNR seed is dropped and nothing is
      random. This is Table 4's "DB+gsnr" (the supplement: "by setting M2 to 1, our
      approach collapses to DB+gsnr, where the dropout ratios have to be tuned
      manually"), so the random search tunes ``dropblock_p`` only and keeps ``gsnr_p``
      at 1; no Bernoulli draw is made (the generator is not advanced).
    * ``gsnr_p < 1``: Listing 2 as printed, M2 ~ Bernoulli(gsnr_p), one draw per seed
      position shared by the batch, from ``self.generator`` (Listing 2 draws from the
      global generator; with the same state the masks are identical, tested).

    Table 4 (the ablation of Meta-GSNR's masks on PACS, ResNet-18: its last row is Table
    3's ResNet-18 result), row by row. Its text reads the 0/1 as masks of kept units:
    "M1 . M2 = 0" zeroes every block, "M1 = M2 = 1" leaves no regularisation. Listing 2,
    and ``use_m1``/``use_m2`` of :func:`~domaingrad.gradients.gsnr.gsnr_seed_mask`,
    multiply masks of dropped seeds instead, for which all-ones drops everything; rows 2
    and 3 mean the same under both readings.

    ========================== ===================================================================
    Table 4 row (PACS avg.)     algorithm and hyperparameters
    ========================== ===================================================================
    M1 . M2 = 0 (13.44)         ``GSNRDropBlock`` with ``dropblock_p=1.0`` (every unit is a
                                top-GSNR seed and, with M2 = 1, dropped: stage outputs zero);
                                also ``MetaGSNR`` with ``meta_gsnr_m1=False, meta_gsnr_m2=False``
    M1 = 1 (81.08)              ``MetaGSNR`` with ``meta_gsnr_m1=False``: seeds ~ Bernoulli of the
                                meta-learned ratio, no GSNR (add ``meta_gsnr_meta=False`` for the
                                fixed ratio ``gsnr_p``)
    M2 = 1 (84.55)              ``GSNRDropBlock`` with its defaults (DB+gsnr, ``gsnr_p=1.0``);
                                the same updates: ``MetaGSNR`` with ``meta_gsnr_m2=False``
    M1 = M2 = 1 (79.95)         ``ERM`` (no regularisation); ``GSNRDropBlock`` with
                                ``dropblock_p=0.0`` makes the same updates with an extra pass
    Meta-GSNR (85.84)           ``MetaGSNR`` with its defaults (domaingrad's reading, see there)
    ========================== ===================================================================

    Samples' activation gradients come from one backward of the mean loss. They are exact
    per-sample gradients for MNIST_CNN (GroupNorm) and for the ResNets with DomainBed's
    frozen BatchNorm (``freeze_bn``, the default); with BatchNorm in training mode they
    are coupled across the batch (see :mod:`domaingrad.gradients.gsnr`), and both forward
    passes, as in the listing, then update the running statistics (twice per step).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return super().hparam_specs(small_images) + [
            HParam(
                "gsnr_p",
                1.0,
                lambda r: 1.0,
                "probability that a top-GSNR seed is dropped (Bernoulli mask M2); 1 = M2 = 1, Table 4's "
                "DB+gsnr (default, not searched); < 1 = Listing 2's Bernoulli mask",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if not 0.0 <= self.hparams["gsnr_p"] <= 1.0:
            raise DomainGradError(f"hyperparameter 'gsnr_p' must be in [0, 1], got {self.hparams['gsnr_p']}")

    def stage_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Listing 1, lines 2-4: gradients of the mean CE with respect to each chosen 4-D
        stage output, stage -> (N, C, H, W)."""
        return self.stage_gradients_and_loss(x, y)[1]

    def stage_gradients_and_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the () mean CE of the unmasked pass, detached; :meth:`stage_gradients`)."""
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str, out: torch.Tensor) -> torch.Tensor:
            outputs[name] = out
            return out

        loss = F.cross_entropy(self.classifier(self.featurizer(x, stage_fn=self.stage_hook(keep))), y)
        grads = autograd.grad(loss, list(outputs.values()))
        return loss.detach(), dict(zip(outputs, grads))

    def gsnr_drop(
        self,
        grads: dict[str, torch.Tensor],
        p_gsnr: dict[str, Any] | None = None,
        use_m1: bool = True,
        use_m2: bool = True,
    ) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """The second pass's ``drop(name, out)``: GSNR-guided DropBlock with ``grads[name]``
        and M2 ~ Bernoulli(``p_gsnr[name]``, default ``gsnr_p``); a plain probability of
        1 sets M2 = 1 without a draw."""
        p, b = self.hparams["dropblock_p"], self.hparams["dropblock_size"]

        def drop(name: str, out: torch.Tensor) -> torch.Tensor:
            q = self.hparams["gsnr_p"] if p_gsnr is None else p_gsnr[name]
            m2 = use_m2 and (isinstance(q, torch.Tensor) or q != 1.0)
            return drop_block2d_gsnr(out, grads[name], p, q, b, self.generator, use_m1=use_m1, use_m2=m2)

        return drop

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        x, y = concat_minibatches(minibatches)
        unmasked, grads = self.stage_gradients_and_loss(x, y)
        loss = self.train_step(x, y, self.gsnr_drop(grads))
        return {"loss": loss.item(), "loss_gap": loss_gap(unmasked, loss)}


class MetaGSNR(GSNRDropBlock):
    """Meta-GSNR: GSNR-guided DropBlock whose drop ratio is meta-learned. domaingrad's
    reading, NOT the authors' rule: the main paper of Michalkiewicz et al. (ICCV 2023) is
    not available here; its supplementary material only says that Meta-GSNR combines a
    top-GSNR mask M1 and a mask M2, that M2 = 1 "collapses to DB+gsnr, where the dropout
    ratios have to be tuned manually", and that M1 = 1 leaves Bernoulli dropout (Table
    4); the abstract says the ratio is meta-learned.

    Reading: M2 ~ Bernoulli(r_s) carries the learned ratio, one scalar per chosen stage,
    ``r_s = sigmoid(rho_s)`` with ``rho_s`` initialised to ``logit(gsnr_p)``. Here
    ``gsnr_p`` is that initial ratio, default 0.5 (domaingrad's choice, search
    U(0.1, 0.9)), not :class:`GSNRDropBlock`'s default 1: Meta-GSNR keeps a random M2
    (Table 4 lists M2 = 1 as an ablation of it), and a ratio started at 1 would sit
    where the sigmoid has no gradient. Each step, one training domain, drawn from
    ``self.generator``, is meta-test, the others meta-train (MLDG-style; with a single
    training domain both are the same batch):

    1. GSNR-guided DropBlock on the meta-train batch (GSNR pass, then the dropout pass
       with M2 through the straight-through estimator): ``L_tr(theta, rho)`` and
       ``g = d L_tr / d theta`` (kept differentiable in rho);
    2. a virtual SGD step ``theta' = theta - meta_gsnr_inner_lr * g``; meta-test loss
       ``L_te(theta')`` without dropout;
    3. ``rho`` takes an Adam step (``meta_gsnr_lr``) on ``d L_te / d rho`` (through ``g``:
       the ratio that makes the meta-train step generalise best to the held-out domain);
       the network takes its Adam step on ``g + meta_gsnr_beta * d L_te / d theta'``
       (first-order MLDG).

    Switches (Table 4; the row-by-row mapping is in :class:`GSNRDropBlock`'s docstring):
    ``meta_gsnr_m1`` False -> M1 = 1 (Bernoulli block dropout of rate r_s, no GSNR);
    ``meta_gsnr_m2`` False -> M2 = 1 (DB+gsnr dropping every top-GSNR seed; the ratio is
    then fixed by ``dropblock_p`` and nothing is meta-learned: the updates are
    :class:`GSNRDropBlock`'s defaults); ``meta_gsnr_meta`` False -> r_s stays at
    ``gsnr_p`` and the update is exactly :class:`GSNRDropBlock`'s with that ``gsnr_p``
    (Listing 2 at 0.5 by default). ``update`` returns ``loss``, ``loss_gap`` (as
    :class:`GSNRDropBlock`'s, on the meta-train batch), ``gsnr_ratio_<stage>`` and, when
    meta-learning, ``meta_test_loss``.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        inherited = [s for s in super().hparam_specs(small_images) if s.name != "gsnr_p"]
        return inherited + [
            HParam(
                "gsnr_p",
                0.5,
                lambda r: float(r.uniform(0.1, 0.9)),
                "initial M2 ratio r_s = P(a top-GSNR seed is dropped), then meta-learned (domaingrad "
                "default 0.5, search U(0.1,0.9))",
            ),
            HParam("meta_gsnr_m1", True, lambda r: True, "use the top-GSNR mask M1 (False: M1 = 1)"),
            HParam("meta_gsnr_m2", True, lambda r: True, "use the Bernoulli mask M2 (False: M2 = 1)"),
            HParam("meta_gsnr_meta", True, lambda r: True, "meta-learn the M2 ratio (False: fixed gsnr_p)"),
            HParam(
                "meta_gsnr_lr",
                1e-2,
                lambda r: float(10 ** r.uniform(-3, -1)),
                "Adam learning rate of the ratio logits (domaingrad default 1e-2, search 10**U(-3,-1))",
            ),
            HParam(
                "meta_gsnr_inner_lr",
                1e-2,
                lambda r: float(10 ** r.uniform(-3, -1)),
                "step size of the virtual meta-train step (domaingrad default 1e-2, search 10**U(-3,-1))",
            ),
            HParam(
                "meta_gsnr_beta",
                1.0,
                lambda r: float(10 ** r.uniform(-1, 1)),
                "weight of the meta-test gradient in the network update (MLDG's beta; search 10**U(-1,1))",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        q = min(max(self.hparams["gsnr_p"], 1e-4), 1 - 1e-4)
        self.ratio_logits = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(math.log(q / (1 - q)))) for name in self.stages}
        )
        self.ratio_optimizer = torch.optim.Adam(self.ratio_logits.parameters(), lr=self.hparams["meta_gsnr_lr"])

    def ratios(self) -> dict[str, torch.Tensor]:
        """Stage -> scalar drop ratio ``sigmoid(rho_s)`` (the M2 probability)."""
        return {name: torch.sigmoid(rho) for name, rho in self.ratio_logits.items()}

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        m1, m2 = self.hparams["meta_gsnr_m1"], self.hparams["meta_gsnr_m2"]
        if not (self.hparams["meta_gsnr_meta"] and m2):
            x, y = concat_minibatches(minibatches)  # fixed ratio gsnr_p: exactly GSNRDropBlock's update
            unmasked, stage_grads = self.stage_gradients_and_loss(x, y)
            loss = self.train_step(x, y, self.gsnr_drop(stage_grads, None, m1, m2))
            return {
                "loss": loss.item(),
                "loss_gap": loss_gap(unmasked, loss),
                **{f"gsnr_ratio_{n}": r.item() for n, r in self.ratios().items()},
            }
        loss_tr, loss_te, inner, grads, unmasked = self.meta_losses(minibatches, m1, m2)
        rhos = list(self.ratio_logits.values())
        meta = autograd.grad(loss_te, rhos + list(inner.values()), allow_unused=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.ratio_optimizer.zero_grad(set_to_none=True)
        beta = self.hparams["meta_gsnr_beta"]
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        for p, g, g_te in zip(trainable, grads, meta[len(rhos) :]):
            p.grad = g.detach() + (0 if g_te is None else beta * g_te)
        for rho, g in zip(rhos, meta[: len(rhos)]):
            rho.grad = torch.zeros_like(rho) if g is None else g
        self.optimizer.step()
        self.ratio_optimizer.step()
        values = {"loss": loss_tr.item(), "loss_gap": loss_gap(unmasked, loss_tr), "meta_test_loss": loss_te.item()}
        values.update({f"gsnr_ratio_{n}": r.item() for n, r in self.ratios().items()})
        return values

    def meta_losses(
        self, minibatches: Minibatches, use_m1: bool, use_m2: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]:
        """Steps 1-2 of the class docstring: (L_tr, L_te, theta' by parameter name,
        g = dL_tr/dtheta differentiable in rho, the detached meta-train loss of the
        unmasked GSNR pass), theta' ordered as the trainable parameters of ``network``."""
        test = int(torch.randint(len(minibatches), (1,), generator=self.generator))
        train = [mb for d, mb in enumerate(minibatches) if d != test] or list(minibatches)
        x_tr, y_tr = concat_minibatches(train)
        unmasked, stage_grads = self.stage_gradients_and_loss(x_tr, y_tr)
        drop = self.gsnr_drop(stage_grads, self.ratios(), use_m1, use_m2)
        loss_tr = F.cross_entropy(self.classifier(self.featurizer(x_tr, stage_fn=self.stage_hook(drop))), y_tr)
        named = {n: p for n, p in self.network.named_parameters() if p.requires_grad}
        grads = autograd.grad(loss_tr, list(named.values()), create_graph=True)
        inner = {n: p - self.hparams["meta_gsnr_inner_lr"] * g for (n, p), g in zip(named.items(), grads)}
        loss_te = F.cross_entropy(functional_call(self.network, inner, (minibatches[test][0],)), minibatches[test][1])
        return loss_tr, loss_te, inner, grads, unmasked
