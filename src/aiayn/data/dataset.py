"""A prepared dataset directory, as written by ``aiayn prepare`` and read by every later stage.

Layout (also recorded under "files" in the manifest):

    manifest.json             settings, counts, filters, special ids, split, fingerprint
    spm.model, spm.vocab      the joint BPE model (sentencepiece) and its readable vocabulary
    {split}.src/.tgt          raw sentences (cleaned UTF-8, one per line): BLEU references
    {split}.origin            where each pair came from (FILE:LINE, or PAGE#ELEMENT-ID)
    {split}.{side}.ids.npy    the encoded sentences of one side, concatenated (int32 ids
                              without specials)
    {split}.{side}.offsets.npy  int64, one more than there are pairs: sentence i is
                              ids[offsets[i]:offsets[i + 1]]

for split in train, valid, test and side in src, tgt. The arrays are plain ``.npy`` files,
opened with ``np.load(mmap_mode="r")``: nothing is read until it is used, the operating system
pages them in and out, and several processes on one machine (``torchrun``) share one copy in
the page cache. What a process holds for itself is the length arrays the batcher needs
(4 bytes per pair and side). Format version 1 (``{split}.npz``, loaded whole) is still read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import read_versioned_json
from .batching import Batch, TokenBatchSampler, collate
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_files

FORMAT = "aiayn-dataset"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # 1: {split}.npz
SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")
MANIFEST = "manifest.json"
SPM_MODEL = "spm.model"


def array_files(split: str) -> list[str]:
    """The file names of a split's encoded pairs (format version 2)."""
    return [f"{split}.{side}.{kind}.npy" for side in SIDES for kind in ("ids", "offsets")]


class ArrayWriter:
    """A one-dimensional ``.npy`` file written piece by piece, its length unknown until the end.

    The data goes after a header of fixed size (`HEADER_BYTES`), which `close` fills in once the
    length is known: the ``.npy`` format 1.0 (magic, version, header length, then the header
    dict padded with spaces to the 64-byte alignment the format asks for). Memory: one piece."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), 0
        self._file = open(self.path, "wb")
        self._file.write(b"\0" * self.HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self.length += len(values)

    def close(self) -> None:
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                       "shape": (self.length,)}).encode("latin1")
        room = self.HEADER_BYTES - 10  # magic (6), version (2), header length (2)
        if len(header) + 1 > room:
            raise ValueError(f"npy header of {len(header)} bytes does not fit")
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + header.ljust(room - 1) + b"\n")
        self._file.close()


class RaggedWriter:
    """Sentences of one side (id arrays of any length) -> ``ids`` and ``offsets`` `ArrayWriter`s."""

    def __init__(self, ids_path: Path, offsets_path: Path):
        self.ids = ArrayWriter(ids_path, np.int32)
        self.offsets = ArrayWriter(offsets_path, np.int64)
        self.offsets.append(np.zeros(1, dtype=np.int64))
        self.total = 0

    def append(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Sentences given as their ids concatenated and their lengths."""
        self.ids.append(flat_ids)
        self.offsets.append(self.total + np.cumsum(lengths, dtype=np.int64))
        self.total += int(np.sum(lengths, dtype=np.int64))

    def close(self) -> None:
        self.ids.close()
        self.offsets.close()


class Ragged(Sequence):
    """Sentences stored as concatenated ``ids`` and ``offsets`` (often memory-mapped): ``r[i]``
    is sentence i (a view, nothing copied), ``r[a:b]`` a `Ragged` of those sentences."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return max(len(self.offsets) - 1, 0)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Ragged slices take every sentence (step 1)")
            return Ragged(self.ids, self.offsets[start:max(stop, start) + 1])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """The length of every sentence (int32: what the batcher keeps per pair)."""
        return np.diff(self.offsets).astype(np.int32)


class Split:
    """The encoded pairs of one split: ``.src[i]``, ``.tgt[i]`` are int arrays without specials
    (`Ragged`, memory-mapped), ``.src_lens``/``.tgt_lens`` their lengths."""

    def __init__(self, name: str, src: Ragged, tgt: Ragged):
        self.name = name
        self.src = src
        self.tgt = tgt
        self.src_lens = src.lengths()
        self.tgt_lens = tgt.lengths()

    def __len__(self) -> int:
        return len(self.src)

    def sampler(self, max_tokens: int, **kwargs) -> TokenBatchSampler:
        """A `TokenBatchSampler` over this split (kwargs: shuffle, seed, num_shards, shard_id)."""
        return TokenBatchSampler(self.src_lens, self.tgt_lens, max_tokens, **kwargs)

    def collate(self, indices: Sequence[int], max_len: int | None = None) -> Batch:
        """The pairs at ``indices`` as a `Batch`; ``max_len`` keeps at most that many tokens of
        each side (before EOS and BOS are added)."""
        return collate([self.src[i][:max_len] for i in indices], [self.tgt[i][:max_len] for i in indices])


def _check_ragged(ids: np.ndarray, offsets: np.ndarray) -> None:
    if ids.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError("ids and offsets do not match")


class PreparedData:
    """Read access to a prepared dataset directory; see the module docstring for the layout."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._splits: dict[str, Split] = {}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        if name not in self._splits:
            src, tgt = (self._read_v1(name) if self.manifest["version"] == 1 else
                        [self._read_side(name, side) for side in SIDES])
            expected = self.manifest["counts"][name]
            if len(src) != expected or len(tgt) != expected:
                raise UserError(f"the {name} split holds {len(src)}/{len(tgt)} pairs, the manifest says "
                                f"{expected}; re-run aiayn prepare --force", path=self.path)
            self._splits[name] = Split(name, src, tgt)
        return self._splits[name]

    def _read_side(self, name: str, side: str) -> Ragged:
        ids_path, offsets_path = (self.path / f"{name}.{side}.{kind}.npy" for kind in ("ids", "offsets"))
        try:
            ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
            offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
            _check_ragged(ids, offsets)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read encoded split ({e}); re-run aiayn prepare --force",
                            path=ids_path) from None
        return Ragged(ids, offsets)

    def _read_v1(self, name: str) -> tuple[Ragged, Ragged]:
        """Format version 1: both sides in one ``.npz``, read whole (it cannot be mapped)."""
        path = self.path / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                sides = [(z[f"{side}_ids"], z[f"{side}_offsets"]) for side in SIDES]
            for ids, offsets in sides:
                _check_ragged(ids, offsets)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cannot read encoded split ({e}); re-run aiayn prepare --force",
                            path=path) from None
        return Ragged(*sides[0]), Ragged(*sides[1])

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
    return read_versioned_json(file, FORMAT, READS_VERSIONS, what="dataset manifest",
                               remedy="re-run aiayn prepare --force")


def load_dataset(path: str | Path) -> PreparedData:
    """Open a prepared dataset directory; a missing or corrupt one raises `UserError`."""
    path = Path(path)
    manifest = read_manifest(path)
    arrays = [f"{s}.npz" for s in SPLITS] if manifest["version"] == 1 else [
        name for s in SPLITS for name in array_files(s)]
    if tokenizer_files(path) is None:
        raise UserError(f"incomplete dataset: {SPM_MODEL} is missing; re-run aiayn prepare --force", path=path)
    for name in arrays:
        if not (path / name).is_file():
            raise UserError(f"incomplete dataset: {name} is missing; re-run aiayn prepare --force",
                            path=path)
    return PreparedData(path, manifest)
