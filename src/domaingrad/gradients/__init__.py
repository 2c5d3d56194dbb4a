"""Gradient tools: computing per-domain gradients (Jacobians over the domain axis) and
aggregating them (gradient surgery), kept apart in the spirit of TorchJD.

:func:`surgery_backward` combines per-domain losses or gradients inside your own
training loop (see :mod:`domaingrad.gradients.surgery` for the rules)::

    from domaingrad.gradients import surgery_backward
    from domaingrad.gradients.surgery import PCGrad
"""

from __future__ import annotations

from .surgery import stack_domain_gradients, surgery_backward

__all__ = ["surgery_backward", "stack_domain_gradients"]
