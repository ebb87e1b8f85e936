"""Flush-to-zero reaches the threads torch computes on, and it is on in every `epure` command."""

import os
import subprocess
import sys

# A denormal input through a parallel elementwise op: each of torch's threads flushes it or keeps it.
COUNT_DENORMAL_RESULTS = """
import torch
x = torch.full((1 << 22,), 1 << 20, dtype=torch.int32).view(torch.float32)  # 1.5e-39: denormal, made without arithmetic
print(int((x * 1.0 != 0).sum()))
"""


def denormal_results(prelude: str) -> int:
    """How many elements of a parallel multiply kept their denormal value, in a fresh 2-thread process."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-W", "error", "-c", prelude + COUNT_DENORMAL_RESULTS], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


def test_without_the_switch_denormals_survive():
    assert denormal_results("") == 1 << 22  # the check below could fail: this CPU keeps denormals by default


def test_the_cli_entry_flushes_denormals_on_every_thread_without_numpy_warnings():
    # `-W error` turns numpy's "smallest subnormal is zero" warning into a failure
    prelude = "from epure.cli import _setup\n_setup(verbose=False)\nimport numpy as np\nnp.finfo(np.float32)\n"
    assert denormal_results(prelude) == 0


def test_switching_after_the_threads_exist_misses_them():
    # why the CLI switches first thing: torch's worker threads keep the mode they were created with
    prelude = "import torch\n(torch.ones(1 << 22) * 1.0).sum()\ntorch.set_flush_denormal(True)\n"
    assert 0 < denormal_results(prelude) < 1 << 22
