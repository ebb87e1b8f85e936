"""Freed memory is kept for the next tensors (epure/allocator.py) in every `epure` command: a decoder call on a
chunk of rows then faults no page in, where glibc's defaults fault its feature maps in again on each call."""

import subprocess
import sys

# Page faults per decoder call (default config, 80 rows: the training and sampling chunk), after warm-up calls.
FAULTS_PER_DECODER_CALL = """
import resource, torch
from epure.config import load_config
from epure.model import MMVAEPlus
cfg = load_config("mmvaeplus_default")
model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
u, c = torch.randn(80, cfg.model.latent_dim_u), torch.randn(80, model.cond.out_features)
with torch.no_grad():
    for _ in range(3):
        model.decoders[0](u, c)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model.decoders[0](u, c)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_call(prelude: str) -> float:
    out = subprocess.run([sys.executable, "-c", prelude + FAULTS_PER_DECODER_CALL], capture_output=True, text=True,
                         check=True, timeout=300)
    return float(out.stdout.split()[-1])


def test_with_glibc_defaults_each_call_faults_its_feature_maps_in_again():
    assert faults_per_call("") > 5000  # the check below could fail: 16,000 to 20,000 faults (75 MB) a call measured


def test_the_cli_entry_keeps_freed_memory_for_reuse():
    # measured 0 in most processes, 640 (2.5 MB) in one of eight
    assert faults_per_call("from epure.cli import _setup\n_setup(verbose=False)\n") < 2000
