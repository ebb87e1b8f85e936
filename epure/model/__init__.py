"""The MMVAE+ model, its objectives and generation on tensors (see each module's docstring).

    python benchmarks/throughput.py --configs toy --batch-size 32 --steps 1
"""

from epure.model.mmvae import MMVAEPlus
from epure.model.objectives import forward_objective

__all__ = ["MMVAEPlus", "forward_objective"]
