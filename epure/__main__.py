"""`python -m epure` (and `torchrun -m epure`) runs the CLI."""

from epure.cli import app

app()
