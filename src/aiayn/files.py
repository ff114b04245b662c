"""Writing directories so that nothing is ever half-written or silently replaced.

Every stage that writes a directory (a dataset, a checkpoint, an export, attention pictures)
writes it through `atomic_directory`: the files go into a temporary sibling, and only when all
of them are written does one rename put the directory in place. A crash or a kill leaves the
old directory (or none), never half of a new one; the hidden temporary sibling is removed on
any error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def refuse_to_replace(path: Path, force: bool) -> None:
    """Nothing a user made is overwritten without --force."""
    if path.exists() and not force:
        raise UserError("already exists; pass --force to replace it", path=path)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (directories can be fsync'd on POSIX; elsewhere this is a no-op)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success ``tmp`` becomes
    ``out`` in one rename. An existing ``out`` is renamed aside first and removed only after
    the new one is in place. Callers check `refuse_to_replace` before doing the work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    # mkdtemp makes the directory private (0700); the result should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
