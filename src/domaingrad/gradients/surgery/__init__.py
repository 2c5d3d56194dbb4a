"""Gradient surgery: combine per-domain gradients into one update.

Representation
--------------
Every function takes ``grads``, a sequence with one tensor per model parameter.
Tensor ``t`` has shape ``(D, *param_t.shape)``: the domain axis comes first and
``grads[t][d]`` is the gradient of domain ``d``'s mean loss with respect to parameter
``t``. ``D >= 1`` must be the same for every tensor, all tensors must be floating point
and live on one device. Every rule returns a :class:`SurgeryResult` whose ``grads`` has
one tensor of shape ``param_t.shape`` per parameter, in the input's dtype and device,
ready to be written into ``param.grad``; ``stats`` holds plain Python floats.

Rules (source in brackets)
--------------------------
* :func:`agreement_mask`, :func:`agr_sum`, :func:`agr_rand` -- sign agreement,
  Mansilla et al., "Domain Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(4).
* :func:`pcgrad` -- Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS
  2020, Alg. 1, in the domain version of Mansilla et al. (sec. 4, eq. (5)).
* :func:`corgrad` -- Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
  Perspective of Gradient Granularity", ECAI 2024 (CorGrad): layering + slicing (sec.
  3.4), conflict elimination (sec. 3.6, eqs. (12)-(13)), smoothing of dominant gradients
  (sec. 3.5, eq. (11)), Algorithm 1; statistics of eq. (3) and secs. 4.2-4.3.
* :func:`and_mask` -- Parascandolo et al., "Learning explanations that are hard to vary",
  ICLR 2021, as implemented in DomainBed (``ANDMask``).
* :func:`sand_mask` -- Shahtalebi et al., "SAND-mask", 2021, as implemented in DomainBed
  (``SANDMask``).

Paper rule (default) versus official-code behaviour (option)
------------------------------------------------------------
* Agreement (:func:`agreement_mask`, Agr-Sum, Agr-Rand): ``rule="paper"`` (default):
  all D signs equal, so a component that is zero in every domain agrees;
  ``rule="official"``: ``|sum_d sign(g_d)| == D`` (Mansilla et al.'s code), an exact zero
  disagrees.
* Agr-Rand: the official code's sigma is 0/0 = NaN when nothing agrees; domaingrad
  guards it (zero update, never NaN).
* PCGrad: ``reference="original"`` (default, paper: project on unprojected gradients);
  ``reference="projected"``: implementations whose buffers alias see already projected
  references. ``eps=1e-12`` is added to ``||g_j||^2``; ``eps=0`` is the official code.
* CorGrad: every default is the paper's rule; :data:`OFFICIAL_CORGRAD_OPTIONS` gives the
  authors' code. Slicing: ``slicing="flat"`` (paper: n equal pieces of the flattened
  layer, n from the layer's size, ``slices="auto"``) or ``"dim0"`` (official
  ``torch.chunk(param, 10, dim=0)``); no piece below ``min_slice`` elements (16;
  official: 1). Projection: sequential PCGrad per piece against the ORIGINAL gradients,
  the other domains in a random order per domain (paper, sec. 3.7 and Algorithm 1);
  ``order="index", reference="projected"`` reproduces the official code's index order
  and aliasing; ``projection="simultaneous"`` is a labelled non-default option that is
  not a projection. Smoothing: ``"dominant"`` (paper: norm > mean + std, mixed with the
  mean of all D) or ``"two_sided"`` (official: |norm - mean| > std, mixed with the mean
  of the non-outliers); alpha ``"decay"`` (paper: from alpha to 0 over the run) or
  ``"constant"`` (official).
* Ties (PCGrad, CorGrad): a dot product within ``1e-10`` of the scales of its two
  vectors is no conflict (the official codes test ``dot < 0`` and count rounding
  ties); Gram matrices are float64 whatever the input dtype, so no conflict decision
  depends on summation order, tensor sizes or the torch version.
* ANDMask / SANDMask: DomainBed's definitions (SANDMask with DomainBed's default
  ``tau = 1`` is a zero update; see :func:`sand_mask`).

Reduction: the papers SUM the domain gradients (Mansilla et al. eq. (3), CorGrad
Algorithm 1 line 12, PCGrad). ``reduction="mean"`` is domaingrad's option: the combined
gradient is divided by ``D`` (the scale of ERM on the average loss). ANDMask/SANDMask
follow DomainBed, which averages, and have no such option.

Implementation notes
--------------------
* PCGrad and CorGrad never materialise projected copies: every projected gradient is a
  linear combination of the original ones, so the rules run on small ``D x D`` Gram and
  coefficient matrices (float64 products and sums, blocked, for every input dtype and
  for packed and unpacked tensors alike) and the output comes from one weighted
  combination pass in the input dtype (float32 for half types).
* The elementwise rules run in blocks of ``_CHUNK`` elements with reused temporaries,
  and tensors smaller than ``_SMALL`` elements are concatenated and processed together.
  Consequently the output tensors of small parameters are non-overlapping views of one
  shared buffer (each is contiguous and has the parameter's shape).
* On CPU float32/float64 tensors the sign-agreement pass of Agr-Sum and Agr-Rand (with
  Agr-Rand's noise) and the Gram matrices of PCGrad and CorGrad (pieces of at least
  4,096 elements, at most 32 domains) run on native kernels, compiled on first use from
  ``_native.c`` with the system C compiler and cached; ranges of a fixed size run on
  ``torch.get_num_threads()`` threads and their partial results are summed in range
  order, so results do not depend on the thread count or the machine's vector width.
  Without a compiler (or with ``DOMAINGRAD_NATIVE=0``), and on other devices and dtypes,
  torch operations compute the same rules: Agr-Sum's output bit for bit, Agr-Rand's
  noise values (see :func:`agr_rand`), float64 Gram matrices equal to float64 rounding.
* Python loops run over parameter tensors, blocks, ranges and domain pairs only, never
  over elements or slices.
* NaN in the input propagates to the output of the summing rules (a NaN component
  never counts as agreeing, but ``NaN * 0`` is NaN).

Configured objects (TorchJD-style)
----------------------------------
:class:`AgrSum`, :class:`AgrRand`, :class:`PCGrad`, :class:`CorGrad`, :class:`ANDMask`
and :class:`SANDMask` hold a rule's options (the same defaults as the functions) and
are called on ``grads``: ``PCGrad(generator=g)(grads)`` is ``pcgrad(grads,
generator=g)``. :class:`CorGrad` also counts its calls (``step``, ``reset()``), so that
its alpha decay follows a training loop. :func:`surgery_backward` takes a rule name, a
function or one of these objects, and writes the combined gradient into ``.grad``.

Layout: one private module per concern (``_plumbing``: validation, packing, scratch
buffers; ``_agreement``, ``_agr_rand``; ``_gram``: the float64 Gram engine; ``_pcgrad``; ``_slicing``,
``_smoothing`` and ``_corgrad``; ``_masks``; ``_backward``); every public name is
re-exported here.
"""

from __future__ import annotations

from ._agr_rand import AgrRand, agr_rand
from ._agreement import AgrSum, agr_sum, agreement_mask
from ._backward import RULES, stack_domain_gradients, surgery_backward
from ._corgrad import OFFICIAL_CORGRAD_OPTIONS, CorGrad, corgrad
from ._masks import ANDMask, SANDMask, and_mask, sand_mask
from ._pcgrad import PCGrad, pcgrad
from ._plumbing import SurgeryResult
from ._slicing import auto_slices

__all__ = [
    "SurgeryResult",
    "agreement_mask",
    "agr_sum",
    "agr_rand",
    "pcgrad",
    "corgrad",
    "OFFICIAL_CORGRAD_OPTIONS",
    "and_mask",
    "sand_mask",
    "auto_slices",
    "AgrSum",
    "AgrRand",
    "PCGrad",
    "CorGrad",
    "ANDMask",
    "SANDMask",
    "surgery_backward",
    "stack_domain_gradients",
    "RULES",
]
