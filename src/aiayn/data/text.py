"""Reading and validating a user's parallel text, before any work is done.

Every problem a user can fix becomes one `UserError` naming the file and the line:
a missing or empty file, invalid UTF-8, a NUL byte, files of different lengths, a line
empty on one side only, a TSV line without exactly one TAB. CRLF line endings and a UTF-8
byte-order mark are accepted silently (both are common in files exported from Windows tools).

Lines are split on ``\\n`` only (what ``wc -l`` and every aligner count), never on the other
Unicode line separators that `str.splitlines` would also break on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError

BOM = b"\xef\xbb\xbf"


def clean(text: str) -> str:
    """One canonical form for a sentence: NFC, single spaces, no leading/trailing space.

    sentencepiece collapses whitespace itself, so storing the collapsed form is what makes
    ``decode(encode(x)) == x`` hold exactly for the raw references kept in a dataset.
    NFC (not NFKC) only merges canonically equivalent code points; it never changes meaning.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


# What must never appear inside one line of output: the C0/C1 control characters (Unicode
# category Cc: newline, CR, TAB, ESC, NEL U+0085, ...) and the line and paragraph separators
# U+2028/U+2029. A model with byte fallback can emit any of them as byte pieces (<0x0A> is a
# newline), and a newline inside a translation would shift every later line of the output.
_NOT_IN_A_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Model output as one line: control characters and line/paragraph separators become
    spaces, then whitespace is collapsed as `clean` does for inputs."""
    return clean(_NOT_IN_A_LINE.sub(" ", text))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError("file not found", path=path)
    if not path.is_file():
        raise UserError("not a regular file", path=path)


def _decode(raw: bytes, path: str | Path, number: int) -> str:
    """One raw line (without its ``\\n``) -> text: CR stripped; a NUL byte or invalid UTF-8 is a
    UserError naming ``path`` and the line."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if b"\x00" in raw:
        column = raw.index(b"\x00") + 1
        raise UserError(f"NUL byte at column {column} (is this a binary or UTF-16 file?)",
                        path=path, line=number)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                        path=path, line=number) from None


def _raw_lines(stream: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary stream split on ``\\n`` only (the newline removed), a UTF-8 BOM
    dropped from the first. Buffered: memory is one line, whatever the file's size."""
    first = True
    for raw in stream:
        if first:
            raw, first = raw.removeprefix(BOM), False
        yield raw[:-1] if raw.endswith(b"\n") else raw


def require_text(path: str | Path) -> None:
    """A UserError unless ``path`` is a regular file with something besides whitespace (and a
    BOM) in it. Reads only up to the first such byte."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(len(BOM))
        block = head.removeprefix(BOM)
        while True:
            if block.strip():
                return
            block = f.read(1 << 16)
            if not block:
                raise UserError("file is empty", path=path)


def iter_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, each validated as it is read (without holding the
    file); raises UserError at the first problem. The file must not be empty
    (`require_text`, checked before the first line)."""
    path = Path(path)
    require_text(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(_raw_lines(f), start=1):
            yield _decode(raw, path, number)


def iter_input_lines(path: str | Path | None) -> Iterator[str]:
    """Lines to translate or score, read as they are needed: a UTF-8 file, or standard input
    when ``path`` is None, split on ``\\n`` only.

    Unlike `iter_lines` (training data, where an empty file is a mistake), a file that is empty
    or all blank lines is valid here: it has that many empty sentences. CRLF endings and a UTF-8
    byte-order mark are accepted; invalid UTF-8 or a NUL byte is a UserError naming the line
    (raised when that line is reached).
    """
    import sys

    if path is None:
        for number, raw in enumerate(_raw_lines(sys.stdin.buffer), start=1):
            yield _decode(raw, "<stdin>", number)
        return
    _check_file(Path(path))
    with open(path, "rb") as f:
        for number, raw in enumerate(_raw_lines(f), start=1):
            yield _decode(raw, path, number)


def count_lines(path: str | Path) -> int:
    """Lines in a file as `iter_input_lines` counts them (a last line without ``\\n`` counts),
    read in blocks: for progress bars over files too large to hold."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _check_pair(src: str, tgt: str, where_src: tuple[Path, int], where_tgt: tuple[Path, int]):
    """A pair may be empty on both sides (skipped) but not on one side only."""
    if not src.strip() and tgt.strip():
        raise UserError(f"line is empty but {where_tgt[0]}:{where_tgt[1]} is not",
                        path=where_src[0], line=where_src[1])
    if src.strip() and not tgt.strip():
        raise UserError(f"line is empty but {where_src[0]}:{where_src[1]} is not",
                        path=where_tgt[0], line=where_tgt[1])


def iter_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[tuple[int, str, str]]:
    """Two line-aligned files, streamed -> (line number, src, tgt) per pair, cleaned; pairs blank
    on both sides are skipped. Every line is validated as it is read; memory is one line of
    each file, whatever their size."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    require_text(src_path)
    require_text(tgt_path)
    src_lines, tgt_lines = iter_lines(src_path), iter_lines(tgt_path)
    number = 0
    while True:
        s = next(src_lines, None)
        t = next(tgt_lines, None)
        if s is None or t is None:
            if s is None and t is None:
                return
            # One file ended first: count the rest of the other for the message.
            rest = 1 + sum(1 for _ in (tgt_lines if s is None else src_lines))
            n_src, n_tgt = (number, number + rest) if s is None else (number + rest, number)
            longer, shorter = (tgt_path, src_path) if s is None else (src_path, tgt_path)
            raise UserError(
                f"line has no counterpart: {src_path} has {n_src} lines, "
                f"{tgt_path} has {n_tgt} (the files must be line-aligned; {shorter} ends "
                f"after line {number})", path=longer, line=number + 1)
        number += 1
        _check_pair(s, t, (src_path, number), (tgt_path, number))
        if s.strip():
            yield number, clean(s), clean(t)


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str], list[int]]:
    """Two line-aligned files -> (src, tgt, line numbers), cleaned, pairs blank on both sides dropped."""
    src, tgt, numbers = [], [], []
    for number, s, t in iter_parallel(src_path, tgt_path):
        src.append(s)
        tgt.append(t)
        numbers.append(number)
    return src, tgt, numbers


def iter_tsv(path: str | Path) -> Iterator[tuple[int, str, str]]:
    """A ``source<TAB>target`` file, streamed -> (line number, src, tgt); blank lines are skipped."""
    path = Path(path)
    found = False
    for i, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"expected exactly one TAB (source<TAB>target), found {len(fields) - 1}",
                            path=path, line=i)
        s, t = fields
        if not s.strip() or not t.strip():
            side = "source" if not s.strip() else "target"
            raise UserError(f"the {side} side is empty", path=path, line=i)
        found = True
        yield i, clean(s), clean(t)
    if not found:
        raise UserError("file has no sentence pairs", path=path)
