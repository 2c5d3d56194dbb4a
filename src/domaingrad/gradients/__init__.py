"""Gradient tools: computing per-domain gradients (Jacobians over the domain axis) and
aggregating them (gradient surgery), kept apart in the spirit of TorchJD."""
