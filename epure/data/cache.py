"""Where epure keeps what it can rebuild: decoded datasets, the built-in data, downloaded artifacts.

    python -c "from epure.data.cache import cache_root; print(cache_root())"
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EPURE_CACHE_DIR``, else ``$XDG_CACHE_HOME/epure``, else ``~/.cache/epure``."""
    if os.environ.get("EPURE_CACHE_DIR"):
        return Path(os.environ["EPURE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "epure"
