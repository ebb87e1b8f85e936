"""Atomic file writes: a reader never sees a half-written file, and a crash never leaves one.

    >>> import tempfile; from pathlib import Path; from epure.io import atomic_write_text
    >>> path = Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_text(path, "kept whole"); path.read_text()
    'kept whole'
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # created like open() would (the umask's mode), unlike mkstemp's private 0600, and never over another file
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def claim_dir(base: Path) -> Path:
    """Create ``base`` (or ``base_1``, ``base_2``, ...: the first name free) and return it.

    ``mkdir`` fails on a name that exists, so processes that want the same name at the same moment (two runs
    started in the same second, two sweep agents) always end up in different folders; checking ``exists()``
    first would leave a gap between the check and the ``mkdir`` for another process to fall into.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, n = base.with_name(f"{base.name}_{n}"), n + 1


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
