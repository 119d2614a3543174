"""Safe output: every export lands atomically or not at all.

A file is written to a temporary sibling (same directory, so ``os.replace`` is an atomic rename on
the same filesystem) and renamed into place only after it was written completely. A directory
export is built in a temporary sibling directory the same way. An existing output is never replaced
unless ``force`` is given, and the checks run *before* any expensive work, so a bad path fails fast.
Whatever goes wrong (disk full, permissions, an exception in the writer), no temporary is left behind;
a process killed mid-write (``kill -9``) cannot clean up, so the temporaries carry the writer's pid and
the next write to the same path removes those whose process is gone.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..cli import UserError

__all__ = ["ExportError", "check_output", "atomic_file", "atomic_dir", "remove_stale_temporaries"]


class ExportError(UserError, ValueError):
    """An export that cannot be done as asked: bad output path, unsupported model or scheme.
    A ``UserError``, so the scripts report it as one message with exit code 2."""


def check_output(path: str | os.PathLike, force: bool = False, is_dir: bool = False) -> Path:
    """Validate an output path before any work is done; return it as an absolute Path."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    if path.exists():
        if not force:
            raise ExportError(f"{path} already exists; pass force=True (--force) to overwrite it")
        if is_dir and not path.is_dir():
            raise ExportError(f"{path} exists and is not a directory")
        if not is_dir and path.is_dir():
            raise ExportError(f"{path} is a directory; give a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ExportError(f"output directory {parent} {what}; create it, or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output directory {parent} is not writable")
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of earlier writes to ``path`` whose process no longer runs; returns them."""
    removed = []
    for p in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*"):
        p = Path(p)
        pid, _, rest = p.name[len(path.name) + 2:].partition(".")
        if not (pid.isdigit() and rest.endswith((".tmp", ".old"))) or _alive(int(pid)):
            continue
        if rest.endswith(".old") and (p / "x").exists() and not path.exists():
            os.replace(p / "x", path)  # killed between moving the previous export aside and the new one in
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _umask_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp (and safetensors) create 0600/0700; give the output the permissions a plain ``open``
    would, so a runtime running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _os_error(e: OSError, path: Path) -> ExportError:
    if e.errno == errno.ENOSPC:
        return ExportError(f"no space left on the device while writing {path}; nothing was written")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(f"cannot write {path}: {e.strerror}; nothing was written")
    return ExportError(f"writing {path} failed: {e}; nothing was written")


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it."""
    path = check_output(path, force)
    remove_stale_temporaries(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _os_error(e, path) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _umask_mode(tmp, 0o666)
        yield tmp
        if path.exists() and not force:  # appeared while we were writing
            raise ExportError(f"{path} appeared while exporting; pass force=True to overwrite it")
        os.replace(tmp, path)
    except OSError as e:
        raise _os_error(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success move it to ``path``, else delete it.

    With ``force``, an existing ``path`` is moved aside first and removed only once the new
    directory is in place, so a failure never leaves neither."""
    path = check_output(path, force, is_dir=True)
    remove_stale_temporaries(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _os_error(e, path) from e
    old = None
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            if not p.is_symlink():
                _umask_mode(p, 0o777 if p.is_dir() else 0o666)
        if path.exists():
            if not force:
                raise ExportError(f"{path} appeared while exporting; pass force=True to overwrite it")
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except OSError as e:
        if old is not None and (old / "x").exists() and not path.exists():
            os.replace(old / "x", path)
        raise _os_error(e, path) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
