"""CPU floating-point mode for the process: denormal numbers flushed to zero.

As a model converges its decoders push many Bernoulli logits far from zero, and the backward pass then
carries values below float32's smallest normal number (1.2e-38), which CPUs can compute on far slower than
on normal numbers: on the 2026-12-03 machine an epoch of `epure train` grew from 48 s to 68 s as the run
converged, and flushing made a trained model's steps 1.15x faster (a one-off script); on 2026-12-04's
`benchmarks/denormals.py` measured no difference (docs/performance.md). Flushing changes only values below 1.2e-38,
which no loss, gradient or metric here resolves. A script that calls the library starts with:

    >>> from epure.numerics import flush_denormals_to_zero
    >>> flush_denormals_to_zero()
    True
"""

from __future__ import annotations

import numpy as np
import torch


def flush_denormals_to_zero() -> bool:
    """Turn flush-to-zero on for this thread and every CPU thread torch creates after it; True where supported.

    The setting is per thread and new threads inherit it, so it must run before torch's first parallel
    operation creates its worker threads: the CLI calls it first thing, and a script should too.
    """
    for dtype in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(dtype)  # computed (and cached) now: after the switch numpy would warn its subnormals are zero
    return torch.set_flush_denormal(True)
