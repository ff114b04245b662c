"""Writing directories so that nothing is ever half-written, silently replaced, or lost.

Every stage that writes a directory (a dataset, a checkpoint, an export, attention pictures)
writes it through `atomic_directory`: the files go into a temporary sibling, and only when all
of them are written does one rename put the directory in place, with the usual permissions
(files 0644, directories 0755 under the common umask; `usual_modes`). A crash or a kill leaves the
old directory (or none), never half of a new one; the hidden temporary sibling is removed on
any error.

What may be replaced is decided here too (`refuse_to_replace`): an output path may be new or
an empty directory; an existing aiayn artefact of the kind being written (`artefact_kind`) is
replaced only with --force; anything else never, --force or not. So ``train --out data/x
--force`` cannot delete a dataset, nor ``prepare --out ~/notes --force`` a user's notes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# The kinds of directory aiayn writes, and how `artefact_kind` recognises each: by the files
# its writer puts there (aiayn.data.dataset, aiayn.train, aiayn.checkpoint, aiayn.export,
# aiayn.attention; an averaged model is a checkpoint), so directories written by any version count.
ARTEFACTS = {
    "dataset": "an aiayn dataset",  # manifest.json with "format": "aiayn-dataset"
    "run": "an aiayn training run",  # config.yaml with metrics.jsonl or checkpoints/
    "checkpoint": "an aiayn checkpoint",  # model.safetensors, config.yaml, spm.model
    "export": "an aiayn Marian export",  # model.safetensors, config.json, vocab.json, *.spm
    "attention": "aiayn attention pictures",  # attention.json and the PNGs
    "heads": "aiayn head statistics",  # heads.json with "format": "aiayn-heads", heads.md, heads.png
}


def read_versioned_json(file: Path, fmt: str, version: int | tuple[int, ...], *, what: str, remedy: str) -> dict:
    """A JSON object that aiayn wrote with "format": ``fmt`` and "version": ``version`` (or one of
    the versions given: a dataset manifest, a shortlist). A file that is not valid JSON, is of
    another format or has another version is a UserError naming it; ``remedy`` says how to make
    a new one."""
    versions = version if isinstance(version, tuple) else (version,)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt {what} ({e})", path=file) from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"not an aiayn {what}", path=file)
    if data.get("version") not in versions:
        readable = " or ".join(map(str, versions))
        raise UserError(f"{what} format version {data.get('version')}, this aiayn reads {readable}; {remedy}",
                        path=file)
    return data


def artefact_kind(path: str | Path) -> str | None:
    """Which kind of aiayn directory ``path`` is (a key of `ARTEFACTS`), or None."""
    path = Path(path)
    if not path.is_dir():
        return None

    def has(*names: str) -> bool:
        return all((path / name).is_file() for name in names)

    def json_of_format(name: str, fmt: str) -> bool:
        if not has(name):
            return False
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and data.get("format") == fmt

    if json_of_format("manifest.json", "aiayn-dataset"):
        return "dataset"
    if has("config.yaml") and (has("metrics.jsonl") or (path / "checkpoints").is_dir()):
        return "run"
    if has("model.safetensors", "config.yaml", "spm.model"):
        return "checkpoint"
    if has("model.safetensors", "config.json", "vocab.json", "source.spm", "target.spm"):
        return "export"
    if has("attention.json", "encoder.png", "cross.png"):
        return "attention"
    if json_of_format("heads.json", "aiayn-heads"):
        return "heads"
    return None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def describe(path: Path) -> str:
    """What is at an existing ``path``, for error messages: 'holds an aiayn dataset', ..."""
    if not path.is_dir():
        return "exists and is not a directory"
    kind = artefact_kind(path)
    if kind is not None:
        return f"holds {ARTEFACTS[kind]}"
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"is not a directory aiayn wrote (it holds {shown})"


def refuse_to_replace(path: str | Path, force: bool, *, kind: str) -> None:
    """Nothing a user made is overwritten or lost: ``path`` may be new or an empty directory;
    an aiayn artefact of ``kind`` (a key of `ARTEFACTS`) is replaced only with ``force``; anything
    else is a UserError that says what the directory holds, with or without ``force``."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()) or is_empty_dir(path):
        return
    want = ARTEFACTS[kind]
    if artefact_kind(path) != kind:
        raise UserError(f"{describe(path)}; --force replaces only {want}: choose another output path "
                        "(nothing was changed)", path=path)
    if not force:
        raise UserError(f"already exists ({want}); pass --force to replace it", path=path)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _umask() -> int:
    """The process's umask. Read from /proc where it can be: setting it to read it back (the
    portable way) changes it for every thread for a moment, and a file another thread creates
    then would get mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # the strictest mask while it is read back
    os.umask(umask)
    return umask


def usual_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a file or directory made the usual way
    gets (0644 and 0755 under the common umask 022): mkdtemp makes its directory private (0700),
    and some writers (safetensors) make their files 0600. Executable files stay executable;
    symbolic links are left alone."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(directory, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IXUSR):
                os.chmod(p, 0o777 & ~umask)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, kind: str, force: bool = False) -> Iterator[Path]:
    """``with atomic_directory(out, kind=...) as tmp:`` write into ``tmp``; on success ``tmp``
    becomes ``out`` in one rename. An existing ``out`` may be replaced as `refuse_to_replace`
    allows (checked here again; callers check it before doing the work, to fail fast); it is
    renamed aside first and removed only after the new one is in place."""
    path = Path(path)
    refuse_to_replace(path, force, kind=kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise UserError(f"cannot create the output directory: {e.strerror or e}", path=path) from None
    try:
        yield tmp
        usual_modes(tmp)
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


def check_output_path(path: str | Path | None, force: bool) -> None:
    """Refuse to overwrite an existing output file unless ``force`` (None: standard output)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError("is a directory, not a file", path=p)
    if p.exists() and not force:
        raise UserError("already exists; pass --force to overwrite it", path=p)
    if not p.parent.is_dir():
        raise UserError("no such directory", path=p.parent)
