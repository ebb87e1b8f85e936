"""`python -m epure` (and `torchrun -m epure`) runs the CLI.

    python -m epure train --max-steps 20
"""

from epure.cli import app

app()
