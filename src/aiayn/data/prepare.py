"""``aiayn prepare``: parallel text -> a dataset directory (see `dataset` for its layout).

The pipeline, in order, in memory bounded whatever the corpus's size (no stage holds the text,
nor a Python object per pair):

1. stream the input, validating every line (user files fail with FILE:LINE errors, before any
   other work), clean it (NFC, single spaces) and write it to work files; keep per pair only
   64-bit hashes of the pair and of its source, and a few flags (`_Pool`: ~20 bytes a pair);
2. on those arrays: drop exact duplicate pairs and untranslated (identical) pairs; split
   deterministically into train/valid/test (whole groups, e.g. help pages, per split); drop
   training pairs whose source sentence is held out, so no test source is trained on;
3. train one joint BPE model on the training text of both sides (§5.1), or on a seeded sample
   of ``--bpe-sample`` sentences of it, in a process of its own (its memory goes with it);
4. encode in chunks of `CHUNK_PAIRS` pairs on all cores, dropping training pairs that are too
   long or too unequal in length (valid and test are kept whole, so scores are over the full
   held-out sets), and append each chunk to the split's files and memory-mappable arrays;
5. all of it in a temporary directory that is moved into place at the end.

A fingerprint of the settings and the input (the digest of each input file by its role:
train.src, train.tgt, ...) is stored in the manifest: a second run with identical settings and
input into the same --out reuses the directory without any work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import artefact_kind, atomic_directory, refuse_to_replace, sha256_file
from ..progress import progress_bar
from . import corpora
from .corpora import Corpus
from .dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SIDES,
    SPLITS,
    SPM_MODEL,
    RaggedWriter,
    array_files,
    read_manifest,
)
from .libreoffice import default_cache_dir, package_name
from .options import PrepareOptions
from .text import require_text
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_tokenizer, tokenizer_files, train_bpe

# Bump when the pipeline changes what it writes: older directories are then rebuilt.
# 2: input digests keyed by role (train.src, train.tgt, ...) instead of file name.
# 3: streamed in bounded memory; memory-mapped arrays (format 2); pools without groups split by
#    a permutation of the pairs; BPE trained on a seeded sample of --bpe-sample sentences.
PIPELINE_VERSION = 3


def log(message: str) -> None:
    print(f"prepare: {message}", flush=True)




# -- options -----------------------------------------------------------------------------------


def _source_kind(args: PrepareOptions) -> str:
    """Exactly one source: --src/--tgt, --tsv or --corpus."""
    given = [name for name, on in (("--src/--tgt", args.src or args.tgt), ("--tsv", args.tsv),
                                   ("--corpus", args.corpus)) if on]
    if len(given) != 1:
        raise UserError("give exactly one source: --src FILE --tgt FILE, --tsv FILE, or "
                        "--corpus NAME" + (f" (got {' and '.join(given)})" if given else ""))
    if given[0] == "--src/--tgt":
        if not (args.src and args.tgt):
            raise UserError("--src and --tgt go together (two line-aligned files)")
        return "files"
    return "tsv" if args.tsv else args.corpus


HELD_OUT = ("valid", "test")


def _held_out_files(args: PrepareOptions, kind: str) -> dict[str, tuple[Path, Path]]:
    """The user's own held-out sets: split -> (source file, target file), from --valid-src/
    --valid-tgt and --test-src/--test-tgt. They go with the user's training data (--src/--tgt
    or --tsv); a built-in corpus has held-out sets of its own (or draws them from its pool)."""
    given = {}
    for split in HELD_OUT:
        src, tgt = getattr(args, f"{split}_src"), getattr(args, f"{split}_tgt")
        if bool(src) != bool(tgt):
            raise UserError(f"--{split}-src and --{split}-tgt go together (two line-aligned files)")
        if src:
            given[split] = (Path(src), Path(tgt))
    if given and kind not in ("files", "tsv"):
        raise UserError("--valid-src/--valid-tgt and --test-src/--test-tgt go with your own training data "
                        "(--src/--tgt or --tsv), not with --corpus")
    return given


def _split_off(args: PrepareOptions, kind: str, held_out: dict) -> dict[str, int]:
    """How many pairs each held-out split draws from the pool: --valid-size and --test-size,
    for the splits the user did not bring (Multi30k brings both)."""
    if kind == "multi30k":
        return {}
    return {split: getattr(args, f"{split}_size") for split in HELD_OUT if split not in held_out}


def _check_numbers(args: PrepareOptions, split_off: dict[str, int]) -> None:
    if args.vocab_size < 8:
        raise UserError(f"--vocab-size {args.vocab_size} is too small (at least 8)")
    if any(size < 1 for size in split_off.values()):
        raise UserError("--valid-size and --test-size must be at least 1")
    if args.max_len < 1:
        raise UserError("--max-len must be at least 1")
    if args.max_ratio < 1:
        raise UserError("--max-ratio must be at least 1.0")
    if args.bpe_sample < 100:
        raise UserError(f"--bpe-sample {args.bpe_sample} is too small (at least 100 sentences)")
    if args.corpus == "libreoffice-help":
        package_name(args.lang)  # a malformed --lang fails here, before any download


def _given_tokenizer(args: PrepareOptions):
    """--tokenizer-from: the tokenizer of that checkpoint (or dataset) directory, or None."""
    if args.tokenizer_from is None:
        return None
    if args.lowercase:
        raise UserError("--lowercase does not apply with --tokenizer-from: the checkpoint's tokenizer decides "
                        "whether text is lowercased")
    path = Path(args.tokenizer_from)
    if not path.is_dir():
        raise UserError("no such checkpoint directory (--tokenizer-from)", path=path)
    if tokenizer_files(path) is None:
        raise UserError("holds no tokenizer (spm.model, or source.spm, target.spm and vocab.json); give a "
                        "checkpoint directory to --tokenizer-from", path=path)
    return load_tokenizer(path)


def _settings(args: PrepareOptions, kind: str, split_off: dict[str, int], tokenizer=None) -> dict:
    """Every option that changes the output (and nothing that does not, like --force). The
    user's held-out files are inputs (in the fingerprint by role), not settings. A given
    tokenizer replaces the BPE settings by its digest."""
    s = {"pipeline_version": PIPELINE_VERSION, "source": kind, "max_len": args.max_len, "max_ratio": args.max_ratio,
         "seed": args.seed}
    if tokenizer is None:
        s.update(vocab_size=args.vocab_size, bpe_sample=args.bpe_sample)
        if args.lowercase:  # only when set, so the fingerprints of existing datasets stay valid
            s["lowercase"] = True
    else:
        s["tokenizer_sha256"] = tokenizer.sha256
    s.update({f"{split}_size": size for split, size in split_off.items()})
    if kind == "libreoffice-help":
        s["lang"] = args.lang.lower()
    if kind == "multi30k":
        s["pair"] = args.pair.lower()
    if kind in ("copy", "reverse"):
        s["train_size"] = args.train_size
    return s


def _digest(files: dict[str, Path]) -> dict[str, str]:
    """role ('train.src', 'valid.tgt', 'train.tsv', ...) -> SHA-256 of that file's bytes.

    Keyed by role, not by file name: en/train.txt and de/train.txt share a name, and swapping
    --src and --tgt swaps no names at all, yet either is a different dataset."""
    for path in files.values():  # a missing or empty file is named before any reading
        require_text(path)
    return {role: sha256_file(path) for role, path in files.items()}


def _fingerprint(settings: dict, digests: dict) -> str:
    blob = json.dumps({"settings": settings, "inputs": digests}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the output directory ----------------------------------------------------------------------


def _reusable(out: Path, fingerprint: str, force: bool) -> bool:
    """True if ``out`` already holds this exact dataset (and no --force asks to rebuild it);
    raise if it holds anything that may not be replaced (`files.refuse_to_replace`)."""
    if artefact_kind(out) == "dataset" and not force:
        try:
            manifest = read_manifest(out)
        except UserError:
            manifest = {}
        if manifest.get("fingerprint") == fingerprint and all(
                (out / name).is_file() for name in manifest.get("files", {}).get("list", [])):
            return True
        raise UserError("output directory exists and holds a dataset prepared with different settings or "
                        "input; use --force to replace it, or choose another --out", path=out)
    refuse_to_replace(out, force, kind="dataset")
    return False


# -- the pipeline ------------------------------------------------------------------------------

LABELS = {"train": 0, "valid": 1, "test": 2}
DROPPED = -1
UNDECIDED = -2  # a pool pair before the split
CHUNK_PAIRS = 20_000  # pairs encoded and written at a time (all that stage 4 holds)
HASH_CHUNK = 1 << 20  # pairs whose held-out check, or BPE sample, is decided at a time


def _load_corpus(kind: str, args: PrepareOptions, held_out: dict[str, tuple[Path, Path]]) -> Corpus:
    if kind in ("files", "tsv"):
        corpus = corpora.from_files(args.src, args.tgt) if kind == "files" else corpora.from_tsv(args.tsv)
        corpus.segments += [corpora.file_segment(split, *files) for split, files in held_out.items()]
        return corpus
    if kind == "multi30k":
        return corpora.from_multi30k(args.path, args.pair)
    if kind == "libreoffice-help":
        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        return corpora.from_libreoffice(args.lang, cache, log)
    return corpora.synthetic(kind, args.train_size + args.valid_size + args.test_size, args.seed)


def _input_files(kind: str, args: PrepareOptions, held_out: dict[str, tuple[Path, Path]]) -> dict[str, Path]:
    """The user's input files by role (split.side); built-in corpora have none."""
    own = {f"{split}.{side}": path for split, pair in held_out.items() for side, path in zip(("src", "tgt"), pair)}
    if kind == "files":
        return {"train.src": Path(args.src), "train.tgt": Path(args.tgt), **own}
    if kind == "tsv":
        return {"train.tsv": Path(args.tsv), **own}
    if kind == "multi30k":
        return {f"{split}.{side}": path for split, pair in corpora.multi30k_files(args.path, args.pair).items()
                for side, path in zip(("src", "tgt"), pair)}
    return {}


def _hash64(text: str) -> int:
    """64 bits of BLAKE2b: duplicates are found by these, never by holding the text. Two
    different sentences share a value with probability about n² / 2⁶⁵ over n of them (6·10⁻⁷
    at 4.5M pairs): the cost would be one pair wrongly dropped as a duplicate."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class _Pool:
    """Stage 1's output: every pair read, cleaned, in reading order, as three text files in the
    work directory (``pool.src``, ``pool.tgt``, ``pool.origin``: one line per pair) and compact
    per-pair arrays (the `array` module: 18 bytes a pair, not a Python object per pair): the
    hash of the pair and of its source, whether the two sides are identical, the segment it was
    read from, and, for corpora with groups (help pages), its group (an index into
    ``group_names``; -1: a group of its own; 8 bytes more)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = {kind: open(directory / f"pool.{kind}", "w", encoding="utf-8", newline="\n")
                      for kind in ("src", "tgt", "origin")}
        self.pair_hash, self.src_hash = array("Q"), array("Q")
        self.identical, self.segment = bytearray(), bytearray()
        self.group: array | None = None  # made at the first pair with a group
        self.group_names: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.segment)

    def add(self, segment: int, src: str, tgt: str, origin: str, group: str | None) -> None:
        self.files["src"].write(src + "\n")
        self.files["tgt"].write(tgt + "\n")
        self.files["origin"].write(origin + "\n")
        self.pair_hash.append(_hash64(src + "\0" + tgt))
        self.src_hash.append(_hash64(src))
        self.identical.append(src == tgt)
        self.segment.append(segment)
        if group is not None and self.group is None:
            self.group = array("q", [-1]) * (len(self.segment) - 1)
        if self.group is not None:
            self.group.append(-1 if group is None else self.group_names.setdefault(group, len(self.group_names)))

    def groups(self, where: np.ndarray) -> np.ndarray:
        """The group index of the pairs at ``where`` (-1, one byte each, for a pool without groups)."""
        if self.group is None:
            return np.full(len(where), -1, dtype=np.int8)
        return np.frombuffer(self.group, dtype=np.int64)[where]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def lines(self, kind: str) -> Iterator[str]:
        with open(self.directory / f"pool.{kind}", encoding="utf-8", newline="\n") as f:
            for line in f:
                yield line[:-1]

    def remove(self) -> None:
        for kind in self.files:
            (self.directory / f"pool.{kind}").unlink(missing_ok=True)


def _read(corpus: Corpus, work: Path) -> _Pool:
    """Stage 1: read every segment once, validating each line (a FILE:LINE error stops here,
    before any other work), into a `_Pool`."""
    pool = _Pool(work)
    try:
        for index, segment in enumerate(corpus.segments):
            for src, tgt, origin, group in segment.pairs():
                pool.add(index, src, tgt, origin, group)
    finally:
        pool.close()
    return pool


def _dedup(pool: _Pool, eligible: np.ndarray, drop_identical: bool, labels: np.ndarray, counts: dict) -> None:
    """Drop exact duplicate pairs among the ``eligible`` positions (the first occurrence kept)
    and, for real corpora, the identical (untranslated) ones: their labels become DROPPED."""
    hashes = np.frombuffer(pool.pair_hash, dtype=np.uint64)
    where = None if bool(eligible.all()) else np.flatnonzero(eligible)  # no copy in the usual case
    if where is not None:
        hashes = hashes[where]
    # The first occurrence of each hash: a stable sort, then the first of each run of equals;
    # 18 bytes a pair at the peak (np.unique(return_index=True) took about twice that).
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    del sorted_hashes
    keep = np.empty(len(order), dtype=bool)
    keep[order] = first
    del order, first
    counts["duplicates"] = counts.get("duplicates", 0) + int(len(keep) - keep.sum())
    if drop_identical:  # untranslated: a model would learn to copy
        same = np.frombuffer(pool.identical, dtype=np.uint8)
        identical = keep & ((same if where is None else same[where]) == 1)
        counts["identical"] = counts.get("identical", 0) + int(identical.sum())
        keep &= ~identical
    else:
        counts["identical"] = counts.get("identical", 0)
    dropped = np.flatnonzero(~keep)
    labels[dropped if where is None else where[dropped]] = DROPPED


def split_pool(groups: np.ndarray, names: list[str], valid_size: int, test_size: int, seed: int) -> np.ndarray:
    """Deterministic split of the pool: the label (`LABELS`) of each of its pairs.

    ``groups[i]`` is pair i's index into ``names``, or -1 where every pair is a group of its own.
    Shuffle the groups with ``seed`` (sorted by name first), fill test, then valid, rest train;
    whole groups go to one split, and a group is held out only if it still fits the requested
    size, so with many small groups (help pages) the sizes come out exact or nearly so; the
    manifest records the actual counts. Without groups this is a seeded permutation of the
    pairs cut into test, valid and train: no loop over pairs.
    """
    n = len(groups)
    if valid_size + test_size > n // 2:
        raise UserError(f"the corpus has {n} usable pairs: --valid-size {valid_size} + "
                        f"--test-size {test_size} must leave at least half for training")
    rng = np.random.default_rng(seed)
    labels = np.full(n, LABELS["train"], dtype=np.int8)
    if not bool(np.any(groups >= 0)):
        order = rng.permutation(n)
        labels[order[:test_size]] = LABELS["test"]
        labels[order[test_size:test_size + valid_size]] = LABELS["valid"]
        return labels
    if bool(np.any(groups < 0)):
        raise ValueError("a pool has groups for all of its pairs or for none")
    sizes = np.bincount(groups, minlength=len(names))
    by_name = sorted(np.flatnonzero(sizes).tolist(), key=lambda g: names[g])
    target, filled = {"test": test_size, "valid": valid_size}, {"test": 0, "valid": 0}
    chosen = np.full(len(names), LABELS["train"], dtype=np.int8)
    for j in rng.permutation(len(by_name)).tolist():
        g = by_name[j]
        split = next((s for s in ("test", "valid") if filled[s] + sizes[g] <= target[s]), "train")
        if split != "train":
            filled[split] += int(sizes[g])
            chosen[g] = LABELS[split]
    return chosen[groups]


def _decide(pool: _Pool, corpus: Corpus, split_off: dict[str, int], seed: int, counts: dict) -> np.ndarray:
    """Stage 2, on the per-pair arrays only: deduplicate, split the pool, and drop training pairs
    whose source sentence is held out (so no test source is trained on). Returns each pair's
    label: a split (`LABELS`) or DROPPED."""
    segment_split = np.array([LABELS.get(seg.split, UNDECIDED) for seg in corpus.segments], dtype=np.int8)
    labels = segment_split[np.frombuffer(pool.segment, dtype=np.uint8)]
    _dedup(pool, (labels == UNDECIDED) | (labels == LABELS["train"]), not corpus.identical_allowed, labels, counts)
    in_pool = np.flatnonzero(labels == UNDECIDED)
    if len(in_pool) or not corpus.own_splits:
        groups = pool.groups(in_pool)
        names = sorted(pool.group_names, key=pool.group_names.get)
        labels[in_pool] = split_pool(groups, names, split_off.get("valid", 0), split_off.get("test", 0), seed)
    src_hash = np.frombuffer(pool.src_hash, dtype=np.uint64)
    held_out = np.unique(src_hash[(labels == LABELS["valid"]) | (labels == LABELS["test"])])
    counts["held_out_source"] = 0
    if len(held_out):
        for start in range(0, len(labels), HASH_CHUNK):  # in chunks: a few bytes a pair at a time
            part = slice(start, start + HASH_CHUNK)
            h = src_hash[part]
            found = held_out[np.minimum(np.searchsorted(held_out, h), len(held_out) - 1)] == h
            drop = found & (labels[part] == LABELS["train"])
            counts["held_out_source"] += int(drop.sum())
            labels[part][drop] = DROPPED
    return labels


def _sample_mask(total: int, sample: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded uniform sample of ``sample`` of ``total`` items (all if fewer), as boolean masks
    of consecutive blocks of `HASH_CHUNK` items: each block's share is drawn from the
    hypergeometric distribution of what is left, then its positions uniformly, so the sample is
    exactly uniform and memory is one block, whatever ``total``."""
    rng = np.random.default_rng([seed, 5])
    left, wanted = total, min(sample, total)
    for start in range(0, total, HASH_CHUNK):
        size = min(HASH_CHUNK, total - start)
        k = int(rng.hypergeometric(size, left - size, wanted)) if left > size else wanted
        mask = np.zeros(size, dtype=bool)
        mask[rng.choice(size, k, replace=False)] = True
        left, wanted = left - size, wanted - k
        yield mask


def _bpe_sentences(pool: _Pool, labels: np.ndarray, sample: int, seed: int) -> tuple[Iterator[str], int]:
    """Stage 3's input: the training sentences of both sides (all sources, then all targets, in
    pool order), or a seeded uniform sample of ``sample`` of them. Returns (iterator, how many)."""
    is_train = labels == LABELS["train"]
    total = 2 * int(is_train.sum())

    def flags() -> Iterator[bool]:  # is_train as Python bools, a block at a time
        for start in range(0, len(is_train), HASH_CHUNK):
            yield from is_train[start:start + HASH_CHUNK].tolist()

    def sentences() -> Iterator[str]:
        masks = _sample_mask(total, sample, seed)
        mask, k = np.zeros(0, dtype=bool), 0
        for side in SIDES:
            for line, train in zip(pool.lines(side), flags()):
                if train:
                    if k == len(mask):
                        mask, k = next(masks), 0
                    if mask[k]:
                        yield line
                    k += 1

    return sentences(), min(total, sample)


class _SplitWriter:
    """Stage 4's output for one split: raw text, origins and the encoded arrays, written as the
    chunks come, with the statistics the manifest reports."""

    def __init__(self, directory: Path, name: str):
        self.text = {kind: open(directory / f"{name}.{kind}", "w", encoding="utf-8", newline="\n")
                     for kind in ("src", "tgt", "origin")}
        self.ids = {side: RaggedWriter(*(directory / f"{name}.{side}.{kind}.npy" for kind in ("ids", "offsets")))
                    for side in SIDES}
        self.count = 0
        self.tokens, self.longest, self.words = (dict.fromkeys(SIDES, 0) for _ in range(3))

    def write(self, texts: dict[str, list[str]], ids: dict[str, list[list[int]]]) -> None:
        for kind in ("src", "tgt", "origin"):
            self.text[kind].write("".join(line + "\n" for line in texts[kind]))
        for side in SIDES:
            lengths = np.fromiter(map(len, ids[side]), dtype=np.int64, count=len(ids[side]))
            flat = np.fromiter(itertools.chain.from_iterable(ids[side]), dtype=np.int32, count=int(lengths.sum()))
            self.ids[side].append(flat, lengths)
            self.tokens[side] += int(lengths.sum())
            self.longest[side] = max(self.longest[side], int(lengths.max(initial=0)))
            self.words[side] += sum(len(line.split()) for line in texts[side])
        self.count += len(texts["src"])

    def close(self) -> None:
        for f in self.text.values():
            f.close()
        for writer in self.ids.values():
            writer.close()

    def length_stats(self, side: str) -> dict:
        mean = round(self.tokens[side] / self.count, 2) if self.count else 0.0
        return {"tokens": self.tokens[side], "mean": mean, "max": self.longest[side]}


def _length_filter(src_len: np.ndarray, tgt_len: np.ndarray, max_len: int, max_ratio: float,
                   counts: dict) -> np.ndarray:
    """Which training pairs are kept; lengths count the added eos (len + 1)."""
    ls, lt = src_len + 1, tgt_len + 1
    longer, shorter = np.maximum(ls, lt), np.minimum(ls, lt)
    too_long = longer - 1 > max_len
    ratio = ~too_long & (longer / shorter > max_ratio)
    counts["too_long"] += int(too_long.sum())
    counts["length_ratio"] += int(ratio.sum())
    return ~(too_long | ratio)


def _encode_and_write(pool: _Pool, labels: np.ndarray, tok: Tokenizer, tmp: Path, args: PrepareOptions,
                      counts: dict) -> tuple[dict[str, _SplitWriter], int]:
    """Stage 4: encode the pool chunk by chunk (`CHUNK_PAIRS` pairs, on all cores) and write each
    split's files; training pairs that are too long or too unequal in length are dropped here
    (valid and test are kept whole, so scores are over the full held-out sets). Returns the
    writers (with their statistics) and the round-trip failures of valid and test."""
    writers = {name: _SplitWriter(tmp, name) for name in SPLITS}
    counts["too_long"] = counts["length_ratio"] = 0
    failures = 0
    lines = zip(pool.lines("src"), pool.lines("tgt"), pool.lines("origin"))
    kept = int(np.sum(labels >= 0))
    with progress_bar(kept, "prepare: encode", "pair", enabled=kept >= 100_000) as bar:
        for start in range(0, len(labels), CHUNK_PAIRS):
            chunk = list(itertools.islice(lines, CHUNK_PAIRS))
            chunk_labels = labels[start:start + len(chunk)]
            for name in SPLITS:
                rows = np.flatnonzero(chunk_labels == LABELS[name]).tolist()
                if not rows:
                    continue
                texts = {kind: [chunk[r][k] for r in rows] for k, kind in enumerate(("src", "tgt", "origin"))}
                ids = {side: tok.encode_batch(texts[side], side) for side in SIDES}
                if name == "train":
                    keep = _length_filter(*(np.fromiter(map(len, ids[side]), dtype=np.int64, count=len(rows))
                                            for side in SIDES), args.max_len, args.max_ratio, counts)
                    if not keep.all():
                        where = np.flatnonzero(keep).tolist()
                        texts = {kind: [v[i] for i in where] for kind, v in texts.items()}
                        ids = {side: [v[i] for i in where] for side, v in ids.items()}
                else:
                    failures += sum(tok.decode(x, side) != (t.lower() if tok.lowercases else t)
                                    for side in SIDES for x, t in zip(ids[side], texts[side]))
                writers[name].write(texts, ids)
                bar.update(len(rows))
    for writer in writers.values():
        writer.close()
    return writers, failures


def prepare_dataset(args: PrepareOptions) -> Path:
    """Build the dataset directory ``args.out`` (or reuse it when it already holds exactly this
    dataset); returns its path. ``prepare_dataset(PrepareOptions(out="data/copy", corpus="copy"))``."""
    started = time.time()
    kind = _source_kind(args)
    held_out = _held_out_files(args, kind)
    split_off = _split_off(args, kind, held_out)
    _check_numbers(args, split_off)
    out = Path(args.out)
    given = _given_tokenizer(args)
    settings = _settings(args, kind, split_off, given)

    inputs = _digest(_input_files(kind, args, held_out))
    fingerprint = _fingerprint(settings, inputs)
    if _reusable(out, fingerprint, args.force):
        counts = read_manifest(out)["counts"]
        log(f"reusing {out} (identical settings and input): "
            f"{counts['train']} train / {counts['valid']} valid / {counts['test']} test pairs")
        return out
    corpus = _load_corpus(kind, args, held_out)
    with atomic_directory(out, kind="dataset", force=args.force) as tmp:
        manifest = _build(tmp, corpus, held_out, split_off, args, settings, fingerprint, inputs, given)
    c = manifest["counts"]
    log(f"wrote {out}: {c['train']} train / {c['valid']} valid / {c['test']} test pairs, "
        f"vocabulary {manifest['vocab']['size']}, in {time.time() - started:.1f}s")
    return out


def _build(tmp: Path, corpus: Corpus, held_out: dict[str, tuple[Path, Path]], split_off: dict[str, int],
           args: PrepareOptions, settings: dict, fingerprint: str, inputs: dict[str, str], given=None) -> dict:
    # 1. Read and validate everything (FILE:LINE errors come here, before any other work).
    pool = _read(corpus, tmp)
    filters: dict[str, int] = {}
    segment_of = np.frombuffer(pool.segment, dtype=np.uint8)
    # 2. Deduplicate, split, drop held-out sources: on the per-pair arrays.
    labels = _decide(pool, corpus, split_off, args.seed, filters)
    if corpus.own_splits:
        split_info = {"method": "the corpus's own splits", **{s: corpora.MULTI30K_SPLITS[s] for s in SPLITS}}
    else:
        log(f"{int(np.sum(segment_of == 0))} pairs read; {filters['duplicates']} duplicates and "
            f"{filters['identical']} untranslated (identical) pairs dropped")
        for index, segment in enumerate(corpus.segments[1:], start=1):
            log(f"{segment.split}: {int(np.sum(segment_of == index))} pairs from {segment.where}")
        split_info = {"method": "seeded shuffle of " + ("pages" if pool.group_names else "pairs")
                      + "; whole groups per split", "seed": args.seed, "requested": split_off,
                      "from": {split: (f"--{split}-src {held_out[split][0].name} --{split}-tgt "
                                       f"{held_out[split][1].name}" if split in held_out else "the pool")
                               for split in SPLITS}}

    # 3. One joint BPE model on (a sample of) the training text of both sides (§5.1), or the
    #    tokenizer of the checkpoint to fine-tune (--tokenizer-from).
    if given is None:
        sentences, sample = _bpe_sentences(pool, labels, args.bpe_sample, args.seed)
        log(f"training a joint BPE model (vocab {args.vocab_size}) on {sample} sentences of "
            f"{int(np.sum(labels == LABELS['train']))} training pairs ...")
        spm_settings = train_bpe(sentences, tmp / "spm", args.vocab_size, in_subprocess=True,
                                 byte_fallback=False if corpus.identical_allowed else None, sample=args.bpe_sample,
                                 lowercase=args.lowercase)
        tok = Tokenizer.load(tmp / SPM_MODEL)
        vocab = {"size": tok.vocab_size, "requested": args.vocab_size, "model": SPM_MODEL, "joint": True,
                 "trained_on_sentences": sample,
                 **{k: spm_settings[k] for k in ("model_type", "normalization_rule_name", "byte_fallback",
                                                 "character_coverage", "split_digits")}}
    else:
        tok = given
        tok.save(tmp)
        vocab = {"size": tok.vocab_size, "from_checkpoint": Path(args.tokenizer_from).resolve().name,
                 "sha256": tok.sha256, "model": ", ".join(tokenizer_files(tmp)), "joint": tok.FILES == Tokenizer.FILES}
        log(f"encoding with the tokenizer of {args.tokenizer_from} ({tok.vocab_size} ids)")

    # 4. Encode and write every split, chunk by chunk.
    writers, failures = _encode_and_write(pool, labels, tok, tmp, args, filters)
    pool.remove()
    for key, label in (("held_out_source", "sources held out in valid/test"),
                       ("too_long", f"longer than {args.max_len} subwords"),
                       ("length_ratio", f"length ratio above {args.max_ratio}")):
        log(f"training filter: {filters[key]} pairs dropped ({label})")

    train = writers["train"]
    tokenizer_list = [SPM_MODEL, "spm.vocab"] if given is None else list(tokenizer_files(tmp))
    files = ["manifest.json", *tokenizer_list] + [
        name for s in SPLITS for name in [f"{s}.{ext}" for ext in ("src", "tgt", "origin")] + array_files(s)]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "inputs_sha256": inputs,  # by role; with the settings they make the fingerprint
        "source": corpus.info,
        "languages": corpus.languages,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "vocab": vocab,
        "counts": {s: writers[s].count for s in SPLITS},
        "filters": filters,
        "split": split_info,
        "lengths": {s: {side: writers[s].length_stats(side) for side in SIDES} for s in SPLITS},
        "train_words_per_sentence": {
            side: round(train.words[side] / train.count, 2) if train.count else 0.0 for side in SIDES},
        "roundtrip_failures_valid_test": failures,
        "files": {"list": files,
                  "layout": "{split}.src/.tgt: raw text, one sentence per line; {split}.origin: "
                            "FILE:LINE or PAGE#ID of each pair; {split}.{side}.ids.npy: int32 ids "
                            "without specials, concatenated; {split}.{side}.offsets.npy: int64, "
                            "pair i = ids[offsets[i]:offsets[i+1]]"},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return manifest
