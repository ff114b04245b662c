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
from pathlib import Path

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


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, each validated; raises UserError at the first problem."""
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path=path)
    if not path.is_file():
        raise UserError("not a regular file", path=path)
    data = path.read_bytes().removeprefix(BOM)
    if not data.strip():
        raise UserError("file is empty", path=path)
    return decode_lines(data, path)


def decode_lines(data: bytes, path: str | Path) -> list[str]:
    """Bytes (without a BOM) -> lines split on ``\\n``, CR stripped; a NUL byte or invalid
    UTF-8 is a UserError naming ``path`` and the line."""
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":  # a final newline ends the last line; it does not start another
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\x00" in raw:
            column = raw.index(b"\x00") + 1
            raise UserError(f"NUL byte at column {column} (is this a binary or UTF-16 file?)",
                            path=path, line=number)
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                            path=path, line=number) from None
    return lines


def read_input_lines(path: str | Path | None) -> list[str]:
    """Lines to translate or score: a UTF-8 file, or standard input when ``path`` is None,
    split on ``\n`` only.

    Unlike `read_lines` (training data, where an empty file is a mistake), a file that is empty
    or all blank lines is valid here: it has that many empty sentences. CRLF endings and a UTF-8
    byte-order mark are accepted; invalid UTF-8 or a NUL byte is a UserError naming the line.
    """
    import sys

    name = "<stdin>" if path is None else path
    if path is None:
        data = sys.stdin.buffer.read()
    else:
        if not Path(path).is_file():
            raise UserError("file not found" if not Path(path).exists() else "not a regular file", path=path)
        data = Path(path).read_bytes()
    return decode_lines(data.removeprefix(BOM), name)


def _check_pair(src: str, tgt: str, where_src: tuple[Path, int], where_tgt: tuple[Path, int]):
    """A pair may be empty on both sides (skipped) but not on one side only."""
    if not src.strip() and tgt.strip():
        raise UserError(f"line is empty but {where_tgt[0]}:{where_tgt[1]} is not",
                        path=where_src[0], line=where_src[1])
    if src.strip() and not tgt.strip():
        raise UserError(f"line is empty but {where_src[0]}:{where_src[1]} is not",
                        path=where_tgt[0], line=where_tgt[1])


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str], list[int]]:
    """Two line-aligned files -> (src, tgt, line numbers), cleaned, pairs blank on both sides dropped."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        longer, shorter = ((src_path, tgt_path) if len(src_lines) > len(tgt_lines)
                           else (tgt_path, src_path))
        n_short = min(len(src_lines), len(tgt_lines))
        raise UserError(
            f"line has no counterpart: {src_path} has {len(src_lines)} lines, "
            f"{tgt_path} has {len(tgt_lines)} (the files must be line-aligned; {shorter} ends "
            f"after line {n_short})", path=longer, line=n_short + 1)
    src, tgt, numbers = [], [], []
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1):
        _check_pair(s, t, (src_path, i), (tgt_path, i))
        if s.strip():
            src.append(clean(s))
            tgt.append(clean(t))
            numbers.append(i)
    return src, tgt, numbers


def read_tsv(path: str | Path) -> tuple[list[str], list[str], list[int]]:
    """A ``source<TAB>target`` file -> (src, tgt, line numbers); blank lines are skipped."""
    path = Path(path)
    src, tgt, numbers = [], [], []
    for i, line in enumerate(read_lines(path), start=1):
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
        src.append(clean(s))
        tgt.append(clean(t))
        numbers.append(i)
    if not src:
        raise UserError("file has no sentence pairs", path=path)
    return src, tgt, numbers
