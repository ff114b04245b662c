"""A real parallel corpus that needs no account or large download: LibreOffice's help pages.

Debian ships the LibreOffice help as one package per language (``libreoffice-help-en-us``,
``libreoffice-help-de``, ``-fr``, ``-es``, ...; MPL-2.0). Every language has the same tree of
HTML pages, and every paragraph and heading carries the same stable element id
(``par_id3148618``, ``hd_id3153394``) in each translation. Aligning is therefore exact, not
statistical: the same relative page path in both trees, and the same element id inside it.

The packages are fetched with ``apt-get download`` (no root needed, except for ``apt-get
update`` when apt has no package lists yet) and unpacked with ``dpkg-deb -x`` into a cache
directory, so later runs reuse them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import UserError
from .text import clean

SOURCE_PACKAGE = "libreoffice-help-en-us"
ID_PATTERN = re.compile(r"^(par|hd)_id")
# Elements that never have a closing tag in HTML; they must not be pushed on the element stack.
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
             "param", "source", "track", "wbr"}


@dataclass
class AlignedPair:
    src: str
    tgt: str
    page: str  # relative HTML path, e.g. text/shared/optionen/java.html
    element_id: str  # e.g. par_id3148618


class _ParagraphParser(HTMLParser):
    """Collects the visible text of every element whose id is ``par_id…`` or ``hd_id…``.

    Help pages hold platform variants side by side in hidden spans (``<span hidden id="MAC…">``
    next to ``<span hidden id="default…">``); the browser script shows one of them. We keep
    the ``default…`` variant and skip the others, so each paragraph reads as on Linux.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._stack: list[tuple[str, bool, str | None]] = []  # (tag, hidden, paragraph id)
        self._parts: dict[str, list[str]] = {}

    def _hidden(self) -> bool:
        return any(hidden for _, hidden, _ in self._stack)

    def _open_ids(self) -> list[str]:
        return [pid for _, _, pid in self._stack if pid is not None]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            if tag == "br":  # a line break separates words, as on screen
                self.handle_data(" ")
            return
        a = dict(attrs)
        element_id = a.get("id") or ""
        hidden = "hidden" in a and not element_id.startswith("default")
        pid = element_id if ID_PATTERN.match(element_id) else None
        if (pid is not None and pid not in self._parts and pid not in self.paragraphs
                and not self._hidden()):
            self._parts[pid] = []
        elif pid is not None:
            pid = None  # a repeated id (embedded twice) or a hidden variant: keep the first
        self._stack.append((tag, hidden, pid))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag: str) -> None:
        # Pop to the matching open tag (tolerates an unclosed inline element).
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                for _, _, pid in self._stack[depth:]:
                    if pid is not None:
                        self.paragraphs.setdefault(pid, clean("".join(self._parts.pop(pid))))
                del self._stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self._hidden():
            return
        # Text belongs to the innermost open paragraph only (ids do not nest in practice).
        ids = self._open_ids()
        if ids:
            self._parts[ids[-1]].append(data)

    def close(self) -> None:
        super().close()
        for pid, parts in self._parts.items():  # unclosed at end of file
            self.paragraphs.setdefault(pid, clean("".join(parts)))
        self._parts.clear()


def paragraphs(html: str) -> dict[str, str]:
    """element id -> visible text, for every ``par_id…``/``hd_id…`` element of one page."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return {k: v for k, v in parser.paragraphs.items() if v}


def align_trees(src_root: Path, tgt_root: Path) -> list[AlignedPair]:
    """Pairs of (source, target) paragraphs: same relative page, same element id.

    Returned in a fixed order (sorted pages, then document order of the source page), so
    everything downstream is deterministic.
    """
    pairs: list[AlignedPair] = []
    for src_page in sorted(src_root.rglob("*.html")):
        rel = src_page.relative_to(src_root)
        tgt_page = tgt_root / rel
        if not tgt_page.is_file():
            continue
        src_pars = paragraphs(src_page.read_text(encoding="utf-8", errors="replace"))
        tgt_pars = paragraphs(tgt_page.read_text(encoding="utf-8", errors="replace"))
        for element_id, src_text in src_pars.items():
            tgt_text = tgt_pars.get(element_id)
            if tgt_text:
                pairs.append(AlignedPair(src_text, tgt_text, rel.as_posix(), element_id))
    return pairs


# -- fetching the packages ---------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aiayn"


def package_name(lang: str) -> str:
    """--lang de -> libreoffice-help-de; pt-br -> libreoffice-help-pt-br (Debian names are lower case)."""
    lang = lang.strip().lower()
    if not re.fullmatch(r"[a-z]{2,3}(-[a-z0-9]{2,8})?", lang):
        raise UserError(f"--lang {lang!r} is not a language code like de, fr, es or pt-br")
    if lang in ("en", "en-us"):
        raise UserError("--lang en: the source side is already English; pick the target "
                        "language, e.g. --lang de")
    return f"libreoffice-help-{lang}"


def _require_tools() -> None:
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not found: the libreoffice-help corpus is fetched as Debian "
            "packages with apt. On a system without apt, prepare your own parallel text with "
            "--src FILE --tgt FILE (or --tsv FILE).")


def _apt_has_lists() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any("Packages" in p.name for p in lists.iterdir())


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE`` into dest -> the .deb path (runs apt-get update if needed)."""
    if not _apt_has_lists():
        _run(["apt-get", "update", "-qq"], dest, "apt-get update (apt has no package lists)")
    result = subprocess.run(["apt-get", "download", "-qq", package], cwd=dest,
                            capture_output=True, text=True)
    if result.returncode != 0 and "Unable to locate package" in result.stderr:
        raise UserError(f"apt knows no package {package}: check --lang (Debian has "
                        "libreoffice-help-de, -fr, -es, -it, -pt-br, ...)")
    if result.returncode != 0:
        raise UserError(f"apt-get download {package} failed: {_last_line(result.stderr)}")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise UserError(f"apt-get download {package} produced no .deb file in {dest}")
    return debs[-1]


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{what} failed: {_last_line(result.stderr or result.stdout)}")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def fetch_help_tree(package: str, cache_dir: Path, log=print) -> tuple[Path, str]:
    """Download and unpack one help package (once) -> (its help/<lang> directory, .deb name)."""
    unpacked = cache_dir / "libreoffice-help" / package
    marker = unpacked / ".complete"
    if not marker.is_file():
        _require_tools()
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            tmp_path = Path(tmp)
            log(f"downloading {package} with apt-get ...")
            deb = _apt_download(package, tmp_path)
            target = tmp_path / "tree"
            _run(["dpkg-deb", "-x", str(deb), str(target)], tmp_path, f"dpkg-deb -x {deb.name}")
            (target / ".complete").write_text(deb.name + "\n")
            if unpacked.exists():
                shutil.rmtree(unpacked)
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            target.rename(unpacked)
    deb_name = marker.read_text().strip()
    help_dir = unpacked / "usr" / "share" / "libreoffice" / "help"
    langs = [d for d in help_dir.iterdir() if d.is_dir() and (d / "text").is_dir()] \
        if help_dir.is_dir() else []
    if len(langs) != 1:
        raise UserError(f"unexpected layout in {unpacked}: no single help/<lang>/text directory "
                        "(delete the cache directory and retry)", path=unpacked)
    return langs[0], deb_name


def load_libreoffice_help(lang: str, cache_dir: Path, log=print) -> tuple[list[AlignedPair], dict]:
    """Fetch (or reuse) the English and the --lang help packages and align their paragraphs."""
    tgt_package = package_name(lang)
    src_root, src_deb = fetch_help_tree(SOURCE_PACKAGE, cache_dir, log)
    tgt_root, tgt_deb = fetch_help_tree(tgt_package, cache_dir, log)
    log(f"aligning paragraphs of {src_root.name} and {tgt_root.name} help pages ...")
    pairs = align_trees(src_root, tgt_root)
    info = {"source_package": src_deb, "target_package": tgt_deb,
            "license": "MPL-2.0 (LibreOffice help, as packaged by Debian)",
            "aligned_pairs": len(pairs)}
    return pairs, info
