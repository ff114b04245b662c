"""A prepared dataset directory, as written by ``aiayn prepare`` and read by every later stage.

Layout (also recorded under "files" in the manifest):

    manifest.json        settings, counts, filters, special ids, split, fingerprint
    spm.model, spm.vocab the joint BPE model (sentencepiece) and its readable vocabulary
    {split}.src/.tgt     raw sentences (cleaned UTF-8, one per line): BLEU references
    {split}.origin       where each pair came from (FILE:LINE, or PAGE#ELEMENT-ID)
    {split}.npz          the encoded pairs: src_ids, src_offsets, tgt_ids, tgt_offsets
                         (ids concatenated, int32; pair i is ids[offsets[i]:offsets[i+1]])

for split in train, valid, test. Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import read_versioned_json
from .batching import Batch, TokenBatchSampler, collate
from .tokenizer import Tokenizer

FORMAT = "aiayn-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")
MANIFEST = "manifest.json"
SPM_MODEL = "spm.model"


def pack(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (concatenated int32 ids, int64 offsets of length n + 1)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def unpack(ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, offsets[1:-1]) if len(offsets) > 1 else []


def save_split(path: Path, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> None:
    src_ids, src_offsets = pack(src)
    tgt_ids, tgt_offsets = pack(tgt)
    np.savez(path, src_ids=src_ids, src_offsets=src_offsets,
             tgt_ids=tgt_ids, tgt_offsets=tgt_offsets)


class Split:
    """The encoded pairs of one split: ``.src[i]``, ``.tgt[i]`` are int arrays without specials."""

    def __init__(self, name: str, src: list[np.ndarray], tgt: list[np.ndarray]):
        self.name = name
        self.src = src
        self.tgt = tgt
        self.src_lens = np.fromiter((len(s) for s in src), dtype=np.int64, count=len(src))
        self.tgt_lens = np.fromiter((len(t) for t in tgt), dtype=np.int64, count=len(tgt))

    def __len__(self) -> int:
        return len(self.src)

    def sampler(self, max_tokens: int, **kwargs) -> TokenBatchSampler:
        """A `TokenBatchSampler` over this split (kwargs: shuffle, seed, num_shards, shard_id)."""
        return TokenBatchSampler(self.src_lens, self.tgt_lens, max_tokens, **kwargs)

    def collate(self, indices: Sequence[int], max_len: int | None = None) -> Batch:
        """The pairs at ``indices`` as a `Batch`; ``max_len`` keeps at most that many tokens of
        each side (before EOS and BOS are added)."""
        return collate([self.src[i][:max_len] for i in indices], [self.tgt[i][:max_len] for i in indices])


class PreparedData:
    """Read access to a prepared dataset directory; see the module docstring for the layout."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._splits: dict[str, Split] = {}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / SPM_MODEL)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        if name not in self._splits:
            path = self.path / f"{name}.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    src = unpack(z["src_ids"], z["src_offsets"])
                    tgt = unpack(z["tgt_ids"], z["tgt_offsets"])
            except (OSError, KeyError, ValueError) as e:
                raise UserError(f"cannot read encoded split ({e}); re-run aiayn prepare --force",
                                path=path) from None
            expected = self.manifest["counts"][name]
            if len(src) != expected or len(tgt) != expected:
                raise UserError(f"holds {len(src)}/{len(tgt)} pairs, the manifest says {expected}; "
                                "re-run aiayn prepare --force", path=path)
            self._splits[name] = Split(name, src, tgt)
        return self._splits[name]

    def raw(self, name: str, side: str) -> list[str]:
        """The raw (untokenized) sentences of a split, side "src" or "tgt" (BLEU references)."""
        if name not in SPLITS or side not in SIDES:
            raise UserError(f"no raw text for split {name!r} side {side!r}")
        path = self.path / f"{name}.{side}"
        if not path.is_file():
            raise UserError("missing raw split file; re-run aiayn prepare --force", path=path)
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():
        raise UserError("dataset directory not found (create it with aiayn prepare)", path=path)
    if not file.is_file():
        raise UserError(f"not a prepared dataset: no {MANIFEST} (create it with aiayn prepare)",
                        path=path)
    return read_versioned_json(file, FORMAT, FORMAT_VERSION, what="dataset manifest",
                               remedy="re-run aiayn prepare --force")


def load_dataset(path: str | Path) -> PreparedData:
    """Open a prepared dataset directory; a missing or corrupt one raises `UserError`."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in [SPM_MODEL] + [f"{s}.npz" for s in SPLITS]:
        if not (path / name).is_file():
            raise UserError(f"incomplete dataset: {name} is missing; re-run aiayn prepare --force",
                            path=path)
    return PreparedData(path, manifest)
