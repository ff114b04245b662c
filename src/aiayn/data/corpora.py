"""Where sentence pairs come from: the user's files, Multi30k, LibreOffice help, or a synthetic task.

Each loader returns a `Corpus`: a list of `Segment`s, each a run of pairs read in order,
either the pool that `prepare` splits itself or pairs that belong to one split (Multi30k's own
train/valid/test, the user's own valid/test files). A segment is read as a stream (files line
by line, each line validated as it is reached), so a corpus of any size is never held in
memory. Every pair carries its origin (``FILE:LINE`` or ``PAGE#ELEMENT-ID``) and, in the
LibreOffice pool, a group: pairs of one group (one help page) are kept in the same split, so
test paragraphs come from pages never seen in training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .libreoffice import load_libreoffice_help
from .text import iter_parallel, iter_tsv

Pair = tuple[str, str, str, "str | None"]  # source, target, origin, group (None: its own group)


@dataclass
class Segment:
    """Pairs read in order: ``pairs()`` gives a fresh iterator over them."""

    split: str | None  # None: the pool, split by `prepare`; else "train", "valid" or "test"
    pairs: Callable[[], Iterator[Pair]]
    where: str = ""  # for messages: the files it is read from


@dataclass
class Corpus:
    segments: list[Segment]
    languages: dict[str, str | None] = field(default_factory=lambda: {"src": None, "tgt": None})
    info: dict = field(default_factory=dict)
    identical_allowed: bool = False  # synthetic tasks: identical pairs (copy, palindromes) are data

    @property
    def own_splits(self) -> bool:
        """True if the corpus brings its own training split (Multi30k), so nothing is split off."""
        return any(segment.split == "train" for segment in self.segments)


def _lang_of(path: Path) -> str | None:
    """train.de -> 'de': a file suffix that looks like a language code, else None."""
    suffix = path.suffix.lstrip(".").lower()
    return suffix if re.fullmatch(r"[a-z]{2,3}(_[a-z]{2})?", suffix) else None


def stream_pairs(src_path: str | Path, tgt_path: str | Path) -> Iterator[Pair]:
    """Two line-aligned files, validated line by line (`text.iter_parallel`), with FILE:LINE origins."""
    name = Path(src_path).name
    found = False
    for number, src, tgt in iter_parallel(src_path, tgt_path):
        found = True
        yield src, tgt, f"{name}:{number}", None
    if not found:
        raise UserError("no sentence pairs (every line is empty)", path=src_path)


def file_segment(split: str | None, src_path: str | Path, tgt_path: str | Path) -> Segment:
    return Segment(split, lambda: stream_pairs(src_path, tgt_path), f"{src_path} and {tgt_path}")


def from_files(src_path: str, tgt_path: str) -> Corpus:
    return Corpus([file_segment(None, src_path, tgt_path)],
                  languages={"src": _lang_of(Path(src_path)), "tgt": _lang_of(Path(tgt_path))},
                  info={"kind": "files", "src": str(src_path), "tgt": str(tgt_path)})


def from_tsv(path: str) -> Corpus:
    name = Path(path).name

    def pairs() -> Iterator[Pair]:
        for number, src, tgt in iter_tsv(path):
            yield src, tgt, f"{name}:{number}", None

    return Corpus([Segment(None, pairs, str(path))], info={"kind": "tsv", "path": str(path)})


MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test2016"}


def parse_pair(pair: str) -> tuple[str, str]:
    m = re.fullmatch(r"([a-z]{2,3})-([a-z]{2,3})", pair.strip().lower())
    if not m or m.group(1) == m.group(2):
        raise UserError(f"--pair {pair!r} must look like en-de (source-target)")
    return m.group(1), m.group(2)


def multi30k_files(directory: str | Path, pair: str) -> dict[str, tuple[Path, Path]]:
    """split -> (source file, target file) of a local Multi30k copy (train/val/test2016.LANG)."""
    if not directory:
        raise UserError("--corpus multi30k needs --path DIR (a directory with train.en, "
                        "train.de, val.*, test2016.*)")
    root = Path(directory)
    if not root.is_dir():
        raise UserError("Multi30k directory not found", path=root)
    s, t = parse_pair(pair)
    return {split: (root / f"{stem}.{s}", root / f"{stem}.{t}")
            for split, stem in MULTI30K_SPLITS.items()}


def from_multi30k(directory: str | Path, pair: str) -> Corpus:
    s, t = parse_pair(pair)
    segments = [file_segment(split, src_file, tgt_file)
                for split, (src_file, tgt_file) in multi30k_files(directory, pair).items()]
    return Corpus(segments, languages={"src": s, "tgt": t},
                  info={"kind": "multi30k", "path": str(directory), "pair": f"{s}-{t}"})


def from_libreoffice(lang: str, cache_dir: Path, log=print) -> Corpus:
    aligned, info = load_libreoffice_help(lang, cache_dir, log)
    pairs = lambda: ((p.src, p.tgt, f"{p.page}#{p.element_id}", p.page) for p in aligned)  # noqa: E731
    return Corpus([Segment(None, pairs, "LibreOffice help")], languages={"src": "en", "tgt": lang.lower()},
                  info={"kind": "libreoffice-help", "lang": lang.lower(), **info})


# Synthetic tasks: sequences over a small alphabet of words, for tests and quick checks.
SYNTHETIC_SYMBOLS = [chr(c) for c in range(ord("a"), ord("a") + 20)]
SYNTHETIC_LENGTHS = (2, 20)


def synthetic(task: str, n_pairs: int, seed: int) -> Corpus:
    """``copy``: target = source; ``reverse``: target = source reversed. Deterministic in seed."""
    if n_pairs < 1:
        raise UserError("--train-size must be positive")
    lo, hi = SYNTHETIC_LENGTHS

    def pairs() -> Iterator[Pair]:
        rng = random.Random(seed)
        for i in range(n_pairs):
            words = [rng.choice(SYNTHETIC_SYMBOLS) for _ in range(rng.randint(lo, hi))]
            yield " ".join(words), " ".join(words if task == "copy" else words[::-1]), f"{task}:{i + 1}", None

    return Corpus([Segment(None, pairs, task)], languages={"src": task, "tgt": task},
                  info={"kind": task, "symbols": len(SYNTHETIC_SYMBOLS),
                        "lengths": list(SYNTHETIC_LENGTHS), "generated_pairs": n_pairs},
                  identical_allowed=True)
