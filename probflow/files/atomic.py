"""Atomic output for the CLI: write beside the target, then rename into place.

A file is written to a temporary file in the target's folder and moved onto the target with one
`os.replace`; a set of files (a folder of PNGs) is written into a temporary sibling folder that is renamed
into place at the end. A reader therefore never sees a half-written file or a partial set, an interrupted
run (Ctrl-C, an exception) removes its temporary files, and a run killed outright (SIGKILL) leaves at most a
hidden `.NAME.*.tmp` sibling, never a partial target. An existing target is replaced only when asked
(`force`); a folder is then replaced as a whole, so old and new files never mix.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["atomic_write", "atomic_folder", "check_writable", "check_writable_folder"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _check_parent(path: Path, name: str) -> None:
    """The folder that will hold `path` exists, is a folder, and a file can be created in it (probed with a
    temporary file, so that read-only mounts, permissions and ACLs all count) — before any work is done."""
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"{name}: folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{name}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise ValueError(f"{name}: cannot write in folder {parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | os.PathLike, force: bool = False, name: str = "out") -> Path:
    """Check, before any work, that one file can be written at `path`: not an existing folder, not an existing
    file or (dangling) symbolic link unless `force`, in an existing, writable folder. Raises ValueError /
    FileExistsError / FileNotFoundError naming `name`."""
    text = os.fspath(path)
    if isinstance(text, str) and text.endswith(("/", os.sep)) or text in ("", ".", ".."):
        raise ValueError(f"{name}: {text!r} names a folder, not a file name")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder; expected a file name")
    if path.is_symlink() and not path.exists() and not force:
        raise FileExistsError(f"{name}: {path} is a symbolic link (to a missing file); pass --force to replace it")
    if path.exists() and not force:
        raise FileExistsError(f"{name}: {path} exists; pass --force to overwrite it")
    _check_parent(path, name)
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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable_folder(folder: str | os.PathLike, force: bool = False, name: str = "out",
                          replaceable: Iterable[str] = (".png",)) -> Path:
    """Check, before any work, that a set of files can be written as the folder `folder`: it does not exist,
    or is empty, or `force` is given and it holds nothing but plain files with a suffix in `replaceable` (what
    probflow writes there: the whole folder is replaced, so nothing else may be lost); its parent exists and
    is writable. Returns the absolute path."""
    folder = Path(os.path.abspath(folder))
    if folder.is_symlink() and not force:
        raise FileExistsError(f"{name}: {folder} is a symbolic link; pass --force to replace it")
    if folder.exists() and not folder.is_symlink():
        if not folder.is_dir():
            raise FileExistsError(f"{name}: {folder} exists and is not a folder")
        entries = sorted(folder.iterdir())
        if entries and not force:
            shown = ", ".join(e.name for e in entries[:3]) + (" …" if len(entries) > 3 else "")
            raise FileExistsError(f"{name}: folder {folder} exists and is not empty ({shown}); pass --force to "
                                  "replace it as a whole")
        foreign = [e.name for e in entries
                   if e.is_symlink() or not e.is_file() or e.suffix.lower() not in tuple(replaceable)]
        if foreign:
            raise ValueError(f"{name}: --force replaces the folder {folder} as a whole, but it holds "
                             f"{', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which probflow did not "
                             f"write (only {', '.join(replaceable)} files); move them or choose another folder")
    _check_parent(folder, name)
    return folder


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def atomic_folder(folder: str | os.PathLike, write: Callable[[Path], None], force: bool = False,
                  name: str = "out", replaceable: Iterable[str] = (".png",)) -> Path:
    """Call `write(tmp_folder)` to fill a temporary sibling folder, then rename it to `folder`.

    An existing `folder` (only with `force`, see `check_writable_folder`) is first renamed aside and
    removed after the new one is in place; if the run is interrupted between the two renames the old folder
    is put back. On any exception or Ctrl-C the temporary folder is removed and `folder` is as before."""
    folder = check_writable_folder(folder, force, name, replaceable)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old: Path | None = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        if folder.is_symlink() or (folder.exists() and any(folder.iterdir())):
            old = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
            os.rename(folder, old)
        os.replace(tmp, folder)  # onto a missing or empty folder
    finally:
        if old is not None and (old.exists() or old.is_symlink()):
            if folder.exists() or folder.is_symlink():
                _remove(old)
            else:  # interrupted between the two renames: put the old folder back
                os.rename(old, folder)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
