"""Risk distribution matching: RDM (Nguyen, Do, Duong, Nguyen, "Domain Generalisation
via Risk Distribution Matching", WACV 2024, arXiv:2310.18598), as DomainBed implements it
(``domainbed/algorithms.py`` ``RDM``, ``domainbed/hparams_registry.py``; Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DomainGradError
from ..hparams import NON_NEGATIVE, POSITIVE, Bounds, HParam
from .alignment import gaussian_kernel
from .base import Minibatches
from .erm import ERM

#: RDM's Gaussian-mixture kernel bandwidths (DomainBed's ``RDM.gaussian_kernel``; one more,
#: 1e-4, than MMD's)
RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def rdm_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD**2 of samples x (n, F) and y (m, F) with the kernel
    ``sum_g exp(-g ||a - b||**2)`` over :data:`RDM_GAMMAS`:
    mean K(x, x) + mean K(y, y) - 2 mean K(x, y) (DomainBed ``RDM.mmd``). Returns ()."""
    return (
        gaussian_kernel(x, x, RDM_GAMMAS).mean()
        + gaussian_kernel(y, y, RDM_GAMMAS).mean()
        - 2 * gaussian_kernel(x, y, RDM_GAMMAS).mean()
    )


def rdm_penalties(risks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RDM's terms from per-example risks ``risks`` (D, n), row d the cross-entropies of
    domain d's n examples:

    * ``erm_loss`` = mean_d mean_i risks[d, i];
    * the worst domain w = argmax_d mean_i risks[d, i] (the first of equal maxima);
    * ``matching_penalty`` = :func:`rdm_mmd` (risks[w] as (n, 1), all risks flattened
      as (D n, 1)): the risk distribution of the worst domain against that of all
      domains together (the paper's approximation: "aligning just two distributions: that
      of the worst-case domain and the aggregated distribution from all domains");
    * ``variance_penalty`` = Var(all risks) + Var(risks[w]), unbiased variances (DomainBed's
      extra term, weight ``variance_weight``).

    Returns:
        (erm_loss, matching_penalty, variance_penalty), each ().
    """
    erm_loss = risks.mean(dim=1).mean()
    worst = risks[torch.argmax(risks.detach().mean(dim=1))]
    flat = risks.flatten()
    matching = rdm_mmd(worst.unsqueeze(1), flat.unsqueeze(1))
    variance = torch.var(flat) + torch.var(worst)
    return erm_loss, matching, variance


class RDM(ERM):
    """Risk Distribution Matching (Nguyen, Do, Duong, Nguyen, "Domain Generalisation
    via Risk Distribution Matching", WACV 2024), DomainBed's ``RDM``.

    Each step: logits of the concatenated batch; per-example cross-entropies (D, n)
    (:func:`rdm_penalties`); loss = erm_loss + w_m * matching_penalty + w_v *
    variance_penalty with w_m = ``rdm_lambda`` and w_v = ``variance_weight`` once
    ``update_count >= rdm_penalty_anneal_iters``, both 0 before; at update
    ``rdm_penalty_anneal_iters`` Adam is re-created with learning rate ``rdm_lr`` (and
    ``weight_decay``), as DomainBed does; one Adam step; ``update_count`` counts updates.

    Hyperparameters (DomainBed ``hparams_registry``), by dataset:

    ============================ ============================== ===========================
    name                         default, search                where
    ============================ ============================== ===========================
    ``rdm_lambda``               5.0, U(0.1, 10)                other datasets
                                 5.0, U(1, 10)                  PACS, TerraIncognita
                                 0.5, U(0.1, 1)                 DomainNet
    ``rdm_penalty_anneal_iters`` 1500, int(U(800, 2700))        other datasets
                                 2400, int(U(1500, 3000))       DomainNet
    ``variance_weight``          0.004, U(0.001, 0.007)         other datasets
                                 0.0, fixed                     TerraIncognita, OfficeHome,
                                                                DomainNet
    ``rdm_lr``                   1.5e-5, U(8e-6, 2e-5)          all
    ``batch_size``               88, int(U(70, 100))            large images except below
                                 40, int(U(30, 60))             DomainNet, TerraIncognita
    ============================ ============================== ===========================

    ``hparam_specs(small_images, dataset)`` gives the per-dataset values (the other
    datasets' without a dataset); RDM's ``batch_size`` is :meth:`common_overrides`.

    Deviations from DomainBed: the per-domain losses are built on the device of the
    inputs (DomainBed hard-codes ``.cuda()``); the domains' batches must have equal
    sizes (DomainBed stacks them and fails otherwise; here a clear error).
    ``update_count`` is a () buffer (DomainBed's has shape (1,)). Record keys are
    DomainBed's: ``update_count``, ``total_loss``, ``erm_loss``, ``matching_penalty``,
    ``variance_penalty``, ``rdm_lambda``. No randomness beyond the network's.
    """

    update_count: torch.Tensor  # () long buffer, registered in __init__

    @classmethod
    def hparam_specs(cls, small_images: bool, dataset: str | None = None) -> list[HParam]:
        if dataset == "DomainNet":
            lam = HParam(
                "rdm_lambda",
                0.5,
                lambda r: float(r.uniform(0.1, 1.0)),
                "weight of the risk-distribution MMD (DomainBed on DomainNet: 0.5, U(0.1,1))",
                bounds=NON_NEGATIVE,
            )
            anneal = HParam(
                "rdm_penalty_anneal_iters",
                2400,
                lambda r: int(r.uniform(1500, 3000)),
                "updates before the penalties start (DomainBed on DomainNet: 2400, int(U(1500,3000)))",
                bounds=Bounds(0),
            )
        else:
            low = 1.0 if dataset in ("PACS", "TerraIncognita") else 0.1
            lam = HParam(
                "rdm_lambda",
                5.0,
                lambda r: float(r.uniform(low, 10.0)),
                f"weight of the risk-distribution MMD (DomainBed: 5.0, U({low:g},10))",
                bounds=NON_NEGATIVE,
            )
            anneal = HParam(
                "rdm_penalty_anneal_iters",
                1500,
                lambda r: int(r.uniform(800, 2700)),
                "updates before the penalties start (DomainBed: 1500, int(U(800,2700)))",
                bounds=Bounds(0),
            )
        if dataset in ("TerraIncognita", "OfficeHome", "DomainNet"):
            var = HParam(
                "variance_weight",
                0.0,
                lambda r: 0.0,
                f"weight of the risk-variance penalty (DomainBed on {dataset}: 0, fixed)",
                bounds=NON_NEGATIVE,
            )
        else:
            var = HParam(
                "variance_weight",
                0.004,
                lambda r: float(r.uniform(0.001, 0.007)),
                "weight of the risk-variance penalty (DomainBed: 0.004, U(0.001,0.007))",
                bounds=NON_NEGATIVE,
            )
        rdm_lr = HParam(
            "rdm_lr",
            1.5e-5,
            lambda r: float(r.uniform(8e-6, 2e-5)),
            "Adam learning rate from the anneal step on (DomainBed: 1.5e-5, U(8e-6,2e-5))",
            bounds=POSITIVE,
        )
        return [lam, anneal, var, rdm_lr]

    @classmethod
    def common_overrides(cls, small_images: bool, dataset: str | None = None) -> list[HParam]:
        """DomainBed's RDM-specific values of common hyperparameters: ``batch_size`` 88,
        int(U(70, 100)) on large images (40, int(U(30, 60)) on DomainNet and
        TerraIncognita); none on small images."""
        if small_images:
            return []
        if dataset in ("DomainNet", "TerraIncognita"):
            return [
                HParam(
                    "batch_size",
                    40,
                    lambda r: int(r.uniform(30, 60)),
                    "examples per domain per step (DomainBed's RDM: 40, int(U(30,60)))",
                    bounds=Bounds(1),
                )
            ]
        return [
            HParam(
                "batch_size",
                88,
                lambda r: int(r.uniform(70, 100)),
                "examples per domain per step (DomainBed's RDM: 88, int(U(70,100)))",
                bounds=Bounds(1),
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        sizes = [len(x) for x, _ in minibatches]
        if len(set(sizes)) != 1:
            raise DomainGradError(
                f"RDM needs equal batch sizes in every training domain (it matches their risk "
                f"distributions), got {sizes}"
            )
        count = int(self.update_count)
        on = count >= self.hparams["rdm_penalty_anneal_iters"]
        w_match = self.hparams["rdm_lambda"] if on else 0.0
        w_var = self.hparams["variance_weight"] if on else 0.0
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        risks = F.cross_entropy(self.predict(all_x), all_y, reduction="none").view(len(minibatches), sizes[0])
        erm_loss, matching, variance = rdm_penalties(risks)
        total = erm_loss + w_match * matching + w_var * variance
        if count == self.hparams["rdm_penalty_anneal_iters"]:
            # DomainBed: "Reset Adam, because it doesn't like the sharp jump in gradient magnitudes"
            self.optimizer = torch.optim.Adam(
                self.network.parameters(), lr=self.hparams["rdm_lr"], weight_decay=self.hparams["weight_decay"]
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.update_count += 1
        return {
            "update_count": float(self.update_count),
            "total_loss": total.item(),
            "erm_loss": erm_loss.item(),
            "matching_penalty": matching.item(),
            "variance_penalty": variance.item(),
            "rdm_lambda": float(self.hparams["rdm_lambda"]),
        }
