"""The MMVAE+ model, its objectives and generation on tensors (see each module's docstring)."""

from epure.model.mmvae import MMVAEPlus
from epure.model.objectives import forward_objective

__all__ = ["MMVAEPlus", "forward_objective"]
