"""The fast allocator: which library is chosen, how it is preloaded, and that the heavy
commands really re-execute under it (aiayn.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiayn.allocator import Allocator, find, preload_env

SCRIPT = "from aiayn.allocator import reexec_with_fast_allocator, active; reexec_with_fast_allocator(); print(active())"


def fake_libs(directory: Path, *names: str) -> Path:
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_choice_order_and_off_switch(tmp_path):
    both = fake_libs(tmp_path / "both", "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    only_je = fake_libs(tmp_path / "je", "libjemalloc.so.2")
    assert find("auto", [both]).name == "tcmalloc"  # preferred
    assert find("jemalloc", [both]).path == both / "libjemalloc.so.2"
    assert find("auto", [only_je]).name == "jemalloc"
    assert find("tcmalloc", [only_je]) is None
    assert find("system", [both]) is None and find("off", [both]) is None
    assert find(str(only_je / "libjemalloc.so.2")).name == "custom"
    assert find(str(tmp_path / "missing.so")) is None


def test_preload_env_puts_the_allocator_first_and_keeps_user_settings():
    alloc = Allocator("jemalloc", Path("/x/libjemalloc.so.2"), (("MALLOC_CONF", "retain:true"),))
    env = preload_env(alloc, {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2 /y/libother.so"
    assert env["MALLOC_CONF"] == "retain:true"
    assert preload_env(alloc, {"MALLOC_CONF": "mine"})["MALLOC_CONF"] == "mine"  # the user's wins
    assert preload_env(alloc, {"LD_PRELOAD": "/x/libjemalloc.so.2"})["LD_PRELOAD"] == "/x/libjemalloc.so.2"


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AIAYN_ALLOCATOR", "AIAYN_ALLOCATOR_REEXEC")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)


def test_a_process_reexecutes_under_the_allocator_once():
    fast = find("auto")
    if fast is None:
        pytest.skip("no tcmalloc/jemalloc here (make setup installs one with `python -m aiayn.allocator install`)")
    proc = _run({})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == fast.name and proc.stderr == ""
    off = _run({"AIAYN_ALLOCATOR": "system"})
    assert off.stdout.strip() == "system" and off.stderr == ""


def test_missing_allocator_is_one_line_and_harmless(tmp_path):
    proc = _run({"AIAYN_ALLOCATOR": str(tmp_path / "nope.so")})
    assert proc.returncode == 0
    assert proc.stdout.strip() == "system"
    assert len(proc.stderr.strip().splitlines()) == 1 and "system's malloc" in proc.stderr
