"""Experiment tracking: every Weights & Biases call of epure lives in this module.

Training talks to a ``Tracker``; ``NullTracker`` is what runs when tracking is off, so the training loop
never checks whether W&B is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullTracker:
    """Tracking switched off: every call does nothing."""

    enabled = False
    sync_hint: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Any], step: int) -> None:
        pass

    def log_checkpoint(self, checkpoint: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def mark_preempting(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
