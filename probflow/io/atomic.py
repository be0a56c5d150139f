"""Atomic file output for the CLI: write to a temporary file beside the target, then rename over it.

A reader never sees a half-written file, and an existing file is replaced only when asked (`force`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_writable"]


def check_writable(path: str | os.PathLike, force: bool = False, name: str = "out") -> Path:
    """Refuse an existing target unless `force`; fail early on a missing parent folder."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{name}: {path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise FileNotFoundError(f"{name}: folder {path.parent} does not exist")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = False,
                 name: str = "out") -> Path:
    """Call `write(tmp_path)` to produce the file, then move it onto `path` in one rename."""
    path = check_writable(path, force, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
