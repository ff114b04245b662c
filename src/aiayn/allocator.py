"""A fast memory allocator for aiayn's heavy commands: tcmalloc or jemalloc, preloaded.

Why. PyTorch on the CPU allocates and frees large tensors at every training step and every
decoding step, and has no caching allocator there. glibc's malloc serves blocks above its
mmap threshold (at most 32 MiB) with fresh ``mmap`` calls and hands them back to the kernel at
``free``, so every step pays page faults for memory it had a moment ago: on the demo's
training a third of the CPU time went to the kernel. tcmalloc and jemalloc keep freed memory
for reuse. PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) preloads one
of them for the same reason.

How. A library can only replace malloc if it is loaded before anything else, so the heavy
subcommands (`aiayn train`, `translate`, `evaluate`, `attention`, `demo`, `serve`) re-execute
their own command line once, early, with ``LD_PRELOAD`` naming the library. The re-executed
process sees the library already mapped and goes on. Child processes (torchrun workers, the
benchmark's peers) inherit the variable.

Where the library comes from. ``make setup`` runs ``python -m aiayn.allocator install``, which
fetches Debian's ``libtcmalloc-minimal4`` and ``libjemalloc2`` packages with ``apt-get
download`` (no root needed) and unpacks their shared libraries into the virtual environment
(``<venv>/lib/aiayn-allocators``). The system's own copies (``apt-get install
libtcmalloc-minimal4``) are used too. tcmalloc is preferred (jemalloc runs as fast here, but only
with ``MALLOC_CONF=retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1``, which aiayn sets for it).

Choice and off switch: the environment variable ``AIAYN_ALLOCATOR``

    auto (default)    tcmalloc, else jemalloc, else the system's malloc with a one-line note
    tcmalloc|jemalloc only that one (a note if it is missing)
    /path/to/lib.so   that library
    system (or off)   never preload anything
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV = "AIAYN_ALLOCATOR"
_GUARD = "AIAYN_ALLOCATOR_REEXEC"  # set in the re-executed process: never re-execute twice
VENV_DIR = Path(sys.prefix) / "lib" / "aiayn-allocators"
DEBIAN_PACKAGES = ("libtcmalloc-minimal4", "libjemalloc2")


@dataclass(frozen=True)
class Allocator:
    name: str  # tcmalloc | jemalloc | custom
    path: Path
    env: tuple[tuple[str, str], ...] = ()  # settings it needs, applied unless the user set them


# File names in preference order, with the settings each needs.
KNOWN = (
    # tcmalloc reports every allocation over 1 GiB on stderr by default; aiayn's output stays clean.
    ("tcmalloc", "libtcmalloc_minimal.so.4", (("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),)),
    ("tcmalloc", "libtcmalloc.so.4", (("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),)),
    # Without these, jemalloc also returns freed pages to the kernel (after 10 s by default).
    ("jemalloc", "libjemalloc.so.2", (("MALLOC_CONF", "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"),)),
)


def search_dirs() -> list[Path]:
    """The virtual environment's copy first, then the system's library directories."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    dirs = [VENV_DIR, Path("/usr/lib") / multiarch, Path("/lib") / multiarch, Path("/usr/lib64"),
            Path("/usr/local/lib"), Path("/usr/lib")]
    return [d for d in dirs if d.is_dir()]


def find(choice: str = "auto", dirs: list[Path] | None = None) -> Allocator | None:
    """The allocator ``choice`` names (see the module docstring), or None."""
    if choice in ("system", "off", "none", ""):
        return None
    if "/" in choice:
        path = Path(choice)
        return Allocator("custom", path) if path.is_file() else None
    for name, filename, env in KNOWN:
        if choice not in ("auto", name):
            continue
        for d in search_dirs() if dirs is None else dirs:
            if (d / filename).is_file():
                return Allocator(name, d / filename, env)
    return None


def loaded(path: Path) -> bool:
    """True if this process has ``path``'s library mapped (preloaded or otherwise)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return path.name in maps


def active() -> str:
    """The allocator this process runs with: 'tcmalloc', 'jemalloc', a path, or 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name, filename, _ in KNOWN:
        if filename in maps:
            return name
    return "system"


def preload_env(alloc: Allocator, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``alloc`` put first in LD_PRELOAD and its settings added."""
    env = dict(env)
    current = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    env["LD_PRELOAD"] = " ".join([str(alloc.path)] + [p for p in current if p != str(alloc.path)])
    for key, value in alloc.env:
        env.setdefault(key, value)
    return env


def reexec_with_fast_allocator(argv: list[str] | None = None) -> None:
    """Replace this process with the same command under a fast allocator, when one is found
    and not yet loaded. Returns (doing nothing) when it is loaded already, when switched off,
    or when none is found (then it says so in one line on stderr)."""
    if sys.platform != "linux" or os.environ.get(_GUARD):
        return
    choice = os.environ.get(ENV, "auto").strip()
    if choice.lower() in ("system", "off", "none"):
        return
    alloc = find(choice)
    if alloc is None:
        wanted = "tcmalloc or jemalloc" if choice == "auto" else choice
        print(f"aiayn: note: no {wanted} found, so this runs with the system's malloc, which is slower "
              f"(install one with `python -m aiayn.allocator install` or `apt-get install {DEBIAN_PACKAGES[0]}`; "
              f"{ENV}=system silences this)", file=sys.stderr)
        return
    if loaded(alloc.path):
        return
    env = preload_env(alloc, os.environ)
    env[_GUARD] = "1"
    argv = list(sys.orig_argv) if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


# ---------------------------------------------------------------------------------------------
# python -m aiayn.allocator install
# ---------------------------------------------------------------------------------------------


def install(target: Path = VENV_DIR) -> list[Path]:
    """Fetch Debian's tcmalloc and jemalloc packages (``apt-get download``, no root needed)
    and copy their shared libraries into ``target``. Returns the files installed; raises
    RuntimeError with the reason when it cannot."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get and dpkg-deb are not available (not a Debian-based system)")
    installed = []
    with tempfile.TemporaryDirectory(prefix="aiayn-alloc-") as tmp:

        def download() -> list[Path]:
            for package in DEBIAN_PACKAGES:  # one at a time: the other may still come if one fails
                subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            return sorted(Path(tmp).glob("*.deb"))

        debs = download()
        if not debs and hasattr(os, "geteuid") and os.geteuid() == 0:
            # A fresh machine may have no package lists yet; root can fetch them.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            debs = download()
        if not debs:
            raise RuntimeError(f"apt-get download {' '.join(DEBIAN_PACKAGES)} fetched nothing "
                               "(run `apt-get update` first?)")
        root = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
        target.mkdir(parents=True, exist_ok=True)
        for _, filename, _ in KNOWN:
            for found in root.rglob(filename):
                # resolve(): the packages ship version-named files behind these symlinks
                shutil.copyfile(found.resolve(), target / filename)
                installed.append(target / filename)
                break
    return installed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m aiayn.allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "show"], help="install: fetch tcmalloc/jemalloc into "
                        "the environment; show: which allocator aiayn would use")
    args = parser.parse_args(argv)
    if args.action == "show":
        alloc = find(os.environ.get(ENV, "auto"))
        print(f"{alloc.name}: {alloc.path}" if alloc else "system malloc (none found or switched off)")
        return 0
    if find("auto") is not None and find("auto").path.parent == VENV_DIR:
        print(f"aiayn: fast allocators already in {VENV_DIR}")
        return 0
    try:
        files = install()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        # Not fatal: aiayn runs with the system's malloc and says so.
        print(f"aiayn: could not install a fast allocator ({e}); aiayn will use the system's malloc", file=sys.stderr)
        return 0
    print(f"aiayn: installed {', '.join(f.name for f in files)} into {VENV_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
