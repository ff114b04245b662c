"""``aiayn prepare``: parallel text -> a dataset directory (see `dataset` for its layout).

The pipeline, in order:

1. read and validate the input (user files fail fast with FILE:LINE errors, before any work);
2. clean (NFC, single spaces), drop exact duplicate pairs and untranslated (identical) pairs;
3. split deterministically into train/valid/test (whole groups, e.g. help pages, per split);
   drop training pairs whose source sentence is held out, so no test source is trained on;
4. train one joint BPE model on the training text of both sides (§5.1);
5. encode every split; drop training pairs that are too long or too unequal in length
   (valid and test are kept whole, so scores are over the full held-out sets);
6. write everything into a temporary directory and move it into place.

A fingerprint of the settings and the input (the digest of each input file by its role:
train.src, train.tgt, ...) is stored in the manifest: a second run with identical settings and
input into the same --out reuses the directory without any work.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import artefact_kind, atomic_directory, refuse_to_replace, sha256_file
from . import corpora
from .corpora import Corpus, Pairs
from .dataset import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, SPM_MODEL, read_manifest, save_split
from .libreoffice import default_cache_dir, package_name
from .options import PrepareOptions
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, roundtrip_failures, train_bpe

# Bump when the pipeline changes what it writes: older directories are then rebuilt.
# 2: input digests keyed by role (train.src, train.tgt, ...) instead of file name.
PIPELINE_VERSION = 2


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
    if args.corpus == "libreoffice-help":
        package_name(args.lang)  # a malformed --lang fails here, before any download


def _settings(args: PrepareOptions, kind: str, split_off: dict[str, int]) -> dict:
    """Every option that changes the output (and nothing that does not, like --force). The
    user's held-out files are inputs (in the fingerprint by role), not settings."""
    s = {"pipeline_version": PIPELINE_VERSION, "source": kind, "vocab_size": args.vocab_size,
         "max_len": args.max_len, "max_ratio": args.max_ratio, "seed": args.seed}
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


def _dedup(pairs: Pairs, drop_identical: bool, counts: dict) -> Pairs:
    """Drop exact duplicate pairs (first occurrence kept) and, for real corpora, identical pairs."""
    seen: set[tuple[str, str]] = set()
    keep = []
    duplicates = identical = 0
    for i, key in enumerate(zip(pairs.src, pairs.tgt)):
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if drop_identical and key[0] == key[1]:
            identical += 1  # untranslated: a model would learn to copy
            continue
        keep.append(i)
    counts["duplicates"] = counts.get("duplicates", 0) + duplicates
    counts["identical"] = counts.get("identical", 0) + identical
    return _subset(pairs, keep)


def _subset(pairs: Pairs, keep: list[int]) -> Pairs:
    return Pairs([pairs.src[i] for i in keep], [pairs.tgt[i] for i in keep],
                 [pairs.origin[i] for i in keep],
                 [pairs.group[i] for i in keep] if pairs.group else [])


def split_pool(pairs: Pairs, valid_size: int, test_size: int, seed: int) -> dict[str, Pairs]:
    """Deterministic split: shuffle the groups with ``seed``, fill test, then valid, rest train.

    Whole groups go to one split. A group is held out only if it still fits the requested
    size, so with many small groups (help pages) the sizes come out exact or nearly so; the
    manifest records the actual counts.
    """
    groups = pairs.group or [str(i) for i in range(len(pairs))]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = sorted(members)
    rng = np.random.default_rng(seed)
    order = [names[j] for j in rng.permutation(len(names))]
    if valid_size + test_size > len(pairs) // 2:
        raise UserError(f"the corpus has {len(pairs)} usable pairs: --valid-size {valid_size} + "
                        f"--test-size {test_size} must leave at least half for training")
    chosen: dict[str, list[int]] = {"test": [], "valid": [], "train": []}
    target = {"test": test_size, "valid": valid_size}
    for name in order:
        size = len(members[name])
        split = next((s for s in ("test", "valid") if len(chosen[s]) + size <= target[s]),
                     "train")
        chosen[split].extend(members[name])
    return {s: _subset(pairs, sorted(idx)) for s, idx in chosen.items()}


def _drop_held_out_sources(splits: dict[str, Pairs], counts: dict) -> None:
    held_out = set(splits["valid"].src) | set(splits["test"].src)
    keep = [i for i, s in enumerate(splits["train"].src) if s not in held_out]
    counts["held_out_source"] = len(splits["train"]) - len(keep)
    splits["train"] = _subset(splits["train"], keep)


def _length_filter(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int,
                   max_ratio: float, counts: dict) -> list[int]:
    """Indices of training pairs kept; lengths count the added eos (len + 1)."""
    keep = []
    too_long = ratio = 0
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        ls, lt = len(s) + 1, len(t) + 1
        if max(ls, lt) - 1 > max_len:
            too_long += 1
        elif max(ls, lt) / min(ls, lt) > max_ratio:
            ratio += 1
        else:
            keep.append(i)
    counts["too_long"] = too_long
    counts["length_ratio"] = ratio
    return keep


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def _load_corpus(kind: str, args: PrepareOptions, held_out: dict[str, tuple[Path, Path]]) -> Corpus:
    if kind in ("files", "tsv"):
        corpus = corpora.from_files(args.src, args.tgt) if kind == "files" else corpora.from_tsv(args.tsv)
        corpus.held_out = {split: corpora.read_pairs(*files) for split, files in held_out.items()}
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


def _length_stats(ids: list[list[int]]) -> dict:
    lens = np.array([len(x) for x in ids]) if ids else np.zeros(1)
    return {"tokens": int(lens.sum()), "mean": round(float(lens.mean()), 2),
            "max": int(lens.max())}


def prepare_dataset(args: PrepareOptions) -> Path:
    """Build the dataset directory ``args.out`` (or reuse it when it already holds exactly this
    dataset); returns its path. ``prepare_dataset(PrepareOptions(out="data/copy", corpus="copy"))``."""
    started = time.time()
    kind = _source_kind(args)
    held_out = _held_out_files(args, kind)
    split_off = _split_off(args, kind, held_out)
    _check_numbers(args, split_off)
    out = Path(args.out)
    settings = _settings(args, kind, split_off)

    # 1. Validate user input before any work (this reads the files fully; they are small
    # next to what training costs).
    corpus = _load_corpus(kind, args, held_out) if kind in ("files", "tsv", "multi30k") else None
    inputs = _digest(_input_files(kind, args, held_out))
    fingerprint = _fingerprint(settings, inputs)
    if _reusable(out, fingerprint, args.force):
        counts = read_manifest(out)["counts"]
        log(f"reusing {out} (identical settings and input): "
            f"{counts['train']} train / {counts['valid']} valid / {counts['test']} test pairs")
        return out
    if corpus is None:
        corpus = _load_corpus(kind, args, held_out)

    filters: dict[str, int] = {}
    if corpus.splits is not None:
        splits = {s: _dedup(p, not corpus.identical_allowed, filters) if s == "train" else p
                  for s, p in corpus.splits.items()}
        split_info = {"method": "the corpus's own splits", **{
            s: f"{corpora.MULTI30K_SPLITS[s]}" for s in SPLITS}}
    else:
        pool = _dedup(corpus.pool, not corpus.identical_allowed, filters)
        log(f"{len(corpus.pool)} pairs read; {filters['duplicates']} duplicates and "
            f"{filters['identical']} untranslated (identical) pairs dropped")
        # The user's own valid/test sets are kept whole; the others are split off the pool.
        splits = {**split_pool(pool, split_off.get("valid", 0), split_off.get("test", 0), args.seed),
                  **corpus.held_out}
        split_info = {"method": "seeded shuffle of " + ("pages" if pool.group else "pairs")
                      + "; whole groups per split", "seed": args.seed, "requested": split_off,
                      "from": {split: (f"--{split}-src {held_out[split][0].name} --{split}-tgt "
                                       f"{held_out[split][1].name}" if split in held_out else "the pool")
                               for split in SPLITS}}
        for split, pairs in corpus.held_out.items():
            log(f"{split}: {len(pairs)} pairs from {held_out[split][0]} and {held_out[split][1]}")
    _drop_held_out_sources(splits, filters)

    with atomic_directory(out, kind="dataset", force=args.force) as tmp:
        manifest = _build(tmp, corpus, splits, filters, split_info, args, settings, fingerprint, inputs)
    c = manifest["counts"]
    log(f"wrote {out}: {c['train']} train / {c['valid']} valid / {c['test']} test pairs, "
        f"vocabulary {manifest['vocab']['size']}, in {time.time() - started:.1f}s")
    return out


def _build(tmp: Path, corpus: Corpus, splits: dict[str, Pairs], filters: dict, split_info: dict,
           args: PrepareOptions, settings: dict, fingerprint: str, inputs: dict[str, str]) -> dict:
    train = splits["train"]
    log(f"training a joint BPE model (vocab {args.vocab_size}) on {len(train)} pairs ...")
    spm_settings = train_bpe(train.src + train.tgt, tmp / "spm", args.vocab_size,
                             byte_fallback=False if corpus.identical_allowed else None)
    tok = Tokenizer.load(tmp / SPM_MODEL)

    encoded = {}
    for name in SPLITS:
        p = splits[name]
        src_ids, tgt_ids = tok.encode_batch(p.src), tok.encode_batch(p.tgt)
        if name == "train":
            keep = _length_filter(src_ids, tgt_ids, args.max_len, args.max_ratio, filters)
            src_ids = [src_ids[i] for i in keep]
            tgt_ids = [tgt_ids[i] for i in keep]
            p = splits[name] = _subset(p, keep)
        encoded[name] = (src_ids, tgt_ids)
        save_split(tmp / f"{name}.npz", src_ids, tgt_ids)
        _write_lines(tmp / f"{name}.src", p.src)
        _write_lines(tmp / f"{name}.tgt", p.tgt)
        _write_lines(tmp / f"{name}.origin", p.origin)
    for key, label in (("held_out_source", "sources held out in valid/test"),
                       ("too_long", f"longer than {args.max_len} subwords"),
                       ("length_ratio", f"length ratio above {args.max_ratio}")):
        log(f"training filter: {filters[key]} pairs dropped ({label})")

    held_out = splits["valid"].src + splits["valid"].tgt + splits["test"].src + splits["test"].tgt
    files = ["manifest.json", SPM_MODEL, "spm.vocab"] + [
        f"{s}.{ext}" for s in SPLITS for ext in ("src", "tgt", "origin", "npz")]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "inputs_sha256": inputs,  # by role; with the settings they make the fingerprint
        "source": corpus.info,
        "languages": corpus.languages,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "vocab": {"size": tok.vocab_size, "requested": args.vocab_size, "model": SPM_MODEL,
                  "joint": True, **{k: spm_settings[k] for k in
                                    ("model_type", "normalization_rule_name", "byte_fallback",
                                     "character_coverage", "split_digits")}},
        "counts": {s: len(splits[s]) for s in SPLITS},
        "filters": filters,
        "split": split_info,
        "lengths": {s: {"src": _length_stats(encoded[s][0]), "tgt": _length_stats(encoded[s][1])}
                    for s in SPLITS},
        "train_words_per_sentence": {
            "src": round(float(np.mean([len(x.split()) for x in splits["train"].src])), 2),
            "tgt": round(float(np.mean([len(x.split()) for x in splits["train"].tgt])), 2)},
        "roundtrip_failures_valid_test": roundtrip_failures(tok, held_out),
        "files": {"list": files,
                  "layout": "{split}.src/.tgt: raw text, one sentence per line; {split}.origin: "
                            "FILE:LINE or PAGE#ID of each pair; {split}.npz: src_ids, "
                            "src_offsets, tgt_ids, tgt_offsets (int32 ids without specials, "
                            "pair i = ids[offsets[i]:offsets[i+1]])"},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return manifest
