"""Where sentence pairs come from: the user's files, Multi30k, LibreOffice help, or a synthetic task.

Each loader returns a `Corpus`: either one pool of pairs that `prepare` splits itself, or
(Multi30k) the corpus's own fixed train/valid/test splits. Every pair carries its origin
(``FILE:LINE`` or ``PAGE#ELEMENT-ID``) and a group: pairs of one group (one help page) are
kept in the same split, so test paragraphs come from pages never seen in training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .libreoffice import load_libreoffice_help
from .text import read_parallel, read_tsv


@dataclass
class Pairs:
    src: list[str]
    tgt: list[str]
    origin: list[str]
    group: list[str] = field(default_factory=list)  # empty: every pair is its own group

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class Corpus:
    pool: Pairs | None = None  # to be split by `prepare`
    splits: dict[str, Pairs] | None = None  # fixed splits shipped with the corpus
    languages: dict[str, str | None] = field(default_factory=lambda: {"src": None, "tgt": None})
    info: dict = field(default_factory=dict)
    identical_allowed: bool = False  # synthetic tasks: identical pairs (copy, palindromes) are data
    held_out: dict[str, Pairs] = field(default_factory=dict)  # the user's own valid/test sets, if given


def _lang_of(path: Path) -> str | None:
    """train.de -> 'de': a file suffix that looks like a language code, else None."""
    suffix = path.suffix.lstrip(".").lower()
    return suffix if re.fullmatch(r"[a-z]{2,3}(_[a-z]{2})?", suffix) else None


def read_pairs(src_path: str | Path, tgt_path: str | Path) -> Pairs:
    """Two line-aligned files, validated (`text.read_parallel`), as Pairs with FILE:LINE origins."""
    src, tgt, lines = read_parallel(src_path, tgt_path)
    if not src:
        raise UserError("no sentence pairs (every line is empty)", path=src_path)
    name = Path(src_path).name
    return Pairs(src, tgt, [f"{name}:{n}" for n in lines])


def from_files(src_path: str, tgt_path: str) -> Corpus:
    return Corpus(pool=read_pairs(src_path, tgt_path),
                  languages={"src": _lang_of(Path(src_path)), "tgt": _lang_of(Path(tgt_path))},
                  info={"kind": "files", "src": str(src_path), "tgt": str(tgt_path)})


def from_tsv(path: str) -> Corpus:
    src, tgt, lines = read_tsv(path)
    name = Path(path).name
    return Corpus(pool=Pairs(src, tgt, [f"{name}:{n}" for n in lines]),
                  info={"kind": "tsv", "path": str(path)})


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
    splits = {split: read_pairs(src_file, tgt_file)
              for split, (src_file, tgt_file) in multi30k_files(directory, pair).items()}
    return Corpus(splits=splits, languages={"src": s, "tgt": t},
                  info={"kind": "multi30k", "path": str(directory), "pair": f"{s}-{t}"})


def from_libreoffice(lang: str, cache_dir: Path, log=print) -> Corpus:
    aligned, info = load_libreoffice_help(lang, cache_dir, log)
    pool = Pairs([p.src for p in aligned], [p.tgt for p in aligned],
                 [f"{p.page}#{p.element_id}" for p in aligned], [p.page for p in aligned])
    return Corpus(pool=pool, languages={"src": "en", "tgt": lang.lower()},
                  info={"kind": "libreoffice-help", "lang": lang.lower(), **info})


# Synthetic tasks: sequences over a small alphabet of words, for tests and quick checks.
SYNTHETIC_SYMBOLS = [chr(c) for c in range(ord("a"), ord("a") + 20)]
SYNTHETIC_LENGTHS = (2, 20)


def synthetic(task: str, n_pairs: int, seed: int) -> Corpus:
    """``copy``: target = source; ``reverse``: target = source reversed. Deterministic in seed."""
    if n_pairs < 1:
        raise UserError("--train-size must be positive")
    rng = random.Random(seed)
    lo, hi = SYNTHETIC_LENGTHS
    src, tgt = [], []
    for _ in range(n_pairs):
        words = [rng.choice(SYNTHETIC_SYMBOLS) for _ in range(rng.randint(lo, hi))]
        src.append(" ".join(words))
        tgt.append(" ".join(words if task == "copy" else words[::-1]))
    return Corpus(pool=Pairs(src, tgt, [f"{task}:{i + 1}" for i in range(n_pairs)]),
                  languages={"src": task, "tgt": task},
                  info={"kind": task, "symbols": len(SYNTHETIC_SYMBOLS),
                        "lengths": list(SYNTHETIC_LENGTHS), "generated_pairs": n_pairs},
                  identical_allowed=True)
