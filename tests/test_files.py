"""Directories written through aiayn.files.atomic_directory get the usual permissions, and a
place where they cannot be made is a one-line error."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from aiayn.checkpoint import save_checkpoint
from aiayn.errors import UserError
from aiayn.files import atomic_directory

from helpers import small_model


@pytest.fixture
def umask():
    """Set the process's umask for a test; the old one comes back after it."""
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


def modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *sorted(root.rglob("*"))]}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_a_checkpoint_gets_the_usual_modes(tmp_path, umask, random_checkpoint, mask, file_mode, dir_mode):
    umask(mask)
    out = save_checkpoint(tmp_path / "ckpt", small_model(src_vocab_size=60), random_checkpoint / "spm.model")
    found = modes(out)
    assert set(found) == {".", "model.safetensors", "config.yaml", "spm.model", "meta.json"}
    assert found == {name: dir_mode if name == "." else file_mode for name in found}


def test_atomic_directory_fixes_private_files_and_directories(tmp_path, umask):
    umask(0o022)
    with atomic_directory(tmp_path / "out", kind="attention") as tmp:
        inner = tempfile.mkdtemp(dir=tmp)  # 0700
        fd, private = tempfile.mkstemp(dir=inner)  # 0600
        os.close(fd)
        (tmp / "tool.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "tool.sh", 0o700)
        os.symlink("tool.sh", tmp / "link")
    out = tmp_path / "out"
    found = modes(out)
    inner_name = os.path.basename(inner)
    assert found["."] == 0o755 and found[inner_name] == 0o755
    assert found[f"{inner_name}/{os.path.basename(private)}"] == 0o644
    assert found["tool.sh"] == 0o755  # executable stays executable
    assert (out / "link").is_symlink()


def test_an_output_directory_that_cannot_be_made_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the output directory"):
        with atomic_directory(tmp_path / "file" / "out", kind="export"):
            pass
