"""The MMVAE+ model and its objectives."""

from epure.model.mmvae import MMVAEPlus, build_model
from epure.model.objectives import forward_objective

__all__ = ["MMVAEPlus", "build_model", "forward_objective"]
