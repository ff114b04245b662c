"""A joint subword vocabulary (paper §5.1: byte-pair encoding, shared by source and target).

One BPE model is trained with sentencepiece on the source and target training text together,
so the encoder and decoder can share one embedding matrix (§3.4). The special ids are fixed
project-wide: pad=0, unk=1, bos=2, eos=3.

Exact round trip: text is stored in a canonical form (`text.clean`: NFC, single spaces), the
model uses the ``identity`` normalization (no NFKC rewriting), and for vocabularies of
`BYTE_FALLBACK_MIN_VOCAB` or more, characters unseen in training are spelled as UTF-8 byte
pieces instead of ``<unk>``. So ``decode(encode(x)) == x`` for any cleaned text.

A lowercasing model (``aiayn prepare --lowercase``) is the one exception, by design: its
normalization is a table of Python's ``str.lower`` for every character that has a lower case
(`lowercase_rules`; no NFKC, no other rewriting), kept inside spm.model, so it lowercases every
text it encodes, in training and in translation alike, and ``decode(encode(x)) == x.lower()``.

A model imported from Marian (`aiayn.pretrained`) brings its own pair instead: a `PairTokenizer`
(source.spm for sources, target.spm for targets, vocab.json from pieces to ids). Both kinds
have one interface (``encode``/``encode_batch``/``decode`` with a ``side``, ``pieces``, the
special ids, ``vocab_size``, ``sha256``, ``save``), and `load_tokenizer` opens whichever a
checkpoint or dataset directory holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from ..errors import UserError
from .text import one_line

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Byte fallback reserves 256 pieces; below this size it would crowd out the real vocabulary.
# The synthetic tasks turn it off: every character they use is seen in training.
BYTE_FALLBACK_MIN_VOCAB = 1000


class Tokenizer:
    """A sentencepiece BPE model with the project's fixed special ids."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self.sp = processor
        self.path = path
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise UserError(f"subword model has special ids (pad, unk, bos, eos) = {ids}, "
                            f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}", path=path)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        return cls(_load_spm(path), path)

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the serialised sentencepiece model (the bytes of its spm.model file):
        identifies the vocabulary. Checkpoints and shortlists record it."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def src_vocab_size(self) -> int:
        """The same as `vocab_size`: one joint vocabulary."""
        return self.vocab_size

    FILES = ("spm.model",)

    def save(self, directory: str | Path) -> None:
        """Write the model's file (spm.model) into ``directory``."""
        (Path(directory) / self.FILES[0]).write_bytes(self.sp.serialized_model_proto())

    def encode(self, text: str, side: str = "src") -> list[int]:
        """Subword ids of one sentence, without bos/eos (the batcher adds those). One joint
        model: ``side`` ("src" or "tgt") changes nothing."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], side: str = "src") -> list[list[int]]:
        """`encode` of many sentences, on all cores (sentencepiece's ``num_threads=-1``; its 0
        is one thread)."""
        return self.sp.encode(list(texts), out_type=int, num_threads=-1)

    def decode(self, ids: Iterable[int], side: str = "tgt") -> str:
        """Text of a list of ids; pad/bos/eos are skipped (unk decodes as ' ⁇ '). ``side``: as in
        `encode`."""
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def decode_line(self, ids: Iterable[int]) -> str:
        """`decode` as one line of text (`text.one_line`): what translation outputs. Byte pieces
        can spell a newline or another control character; `decode` keeps them (it must invert
        `encode` exactly), this never does."""
        return one_line(self.decode(ids))

    def pieces(self, ids: Iterable[int], side: str = "tgt") -> list[str]:
        """Subword strings of ids (with the '▁' word-start mark), e.g. for attention plots."""
        return [self.sp.id_to_piece(int(i)) for i in ids]

    @cached_property
    def lowercases(self) -> bool:
        """Whether the model lowercases what it encodes (trained with ``aiayn prepare
        --lowercase``): then it reads and writes lowercased text."""
        return _lowercases(self.sp)


def _lowercases(processor: spm.SentencePieceProcessor) -> bool:
    """Whether a sentencepiece model's normalization lowercases (it adds the word-start mark)."""
    return processor.normalize("A").lstrip("\u2581") == "a"


def _load_spm(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise UserError("subword model not found", path=path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"not a sentencepiece model ({e})", path=path) from None
    return sp


class PairTokenizer:
    """Marian's tokenizer (OPUS-MT): ``source.spm`` splits sources into pieces, ``target.spm``
    targets, and ``vocab.json`` maps the pieces of both to ids (one vocabulary), or, for a model
    with separate vocabularies, those of the source while ``target_vocab.json`` maps the
    target's; a piece that is not in its map is ``<unk>``. What ``transformers.MarianTokenizer`` computes, with aiayn's fixed
    special ids (the importer renumbers the vocabulary: `aiayn.pretrained`) and without its
    optional Moses punctuation normalisation (used only where ``sacremoses`` is installed). A
    source that starts with a language token such as ``>>deu<<`` (multilingual models) keeps it
    as one piece, as MarianTokenizer does."""

    FILES = ("source.spm", "target.spm", "vocab.json")
    TARGET_VOCAB = "target_vocab.json"  # only with separate vocabularies

    def __init__(self, source: spm.SentencePieceProcessor, target: spm.SentencePieceProcessor,
                 vocab: dict[str, int], path: Path | None = None, target_vocab: dict[str, int] | None = None):
        self.spm = {"src": source, "tgt": target}
        self.path = path
        self.separate = target_vocab is not None
        self.vocab = dict(vocab)
        self.target_vocab = dict(target_vocab) if self.separate else self.vocab
        self.maps = {"src": self.vocab, "tgt": self.target_vocab}
        self.names = {side: {i: piece for piece, i in m.items()} for side, m in self.maps.items()}
        self.id_to_piece = self.names["src"]
        names = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
        for side, file in (("src", "vocab.json"), ("tgt", self.TARGET_VOCAB if self.separate else "vocab.json")):
            if sorted(self.names[side]) != list(range(len(self.maps[side]))):
                raise UserError(f"{file} must number its pieces 0 .. n-1, each id once", path=path)
            if any(self.names[side].get(i) != name for i, name in names.items()):
                raise UserError(f"{file} must give the ids {sorted(names)} to {list(names.values())} "
                                "(aiayn import writes it so)", path=path)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
        self._specials = {PAD_ID, BOS_ID, EOS_ID}

    @classmethod
    def from_files(cls, source: str | Path, target: str | Path, vocab: dict[str, int],
                   target_vocab: dict[str, int] | None = None) -> PairTokenizer:
        return cls(_load_spm(Path(source)), _load_spm(Path(target)), vocab, target_vocab=target_vocab)

    @staticmethod
    def _read_map(file: Path) -> dict[str, int]:
        try:
            vocab = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{file.name} not found", path=file) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {file.name} ({e})", path=file) from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise UserError(f"{file.name} must map pieces to integer ids", path=file)
        return vocab

    @classmethod
    def load(cls, directory: str | Path) -> PairTokenizer:
        directory = Path(directory)
        target = directory / cls.TARGET_VOCAB
        return cls(_load_spm(directory / "source.spm"), _load_spm(directory / "target.spm"),
                   cls._read_map(directory / "vocab.json"), directory,
                   cls._read_map(target) if target.is_file() else None)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        for side, name in (("src", "source.spm"), ("tgt", "target.spm")):
            (directory / name).write_bytes(self.spm[side].serialized_model_proto())
        for vocab, name in ((self.vocab, "vocab.json"), (self.target_vocab if self.separate else None, self.TARGET_VOCAB)):
            if vocab is not None:
                (directory / name).write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @cached_property
    def sha256(self) -> str:
        """Identifies the vocabulary: SHA-256 over both sentencepiece models and the id map(s)."""
        h = hashlib.sha256()
        for side in ("src", "tgt"):
            h.update(hashlib.sha256(self.spm[side].serialized_model_proto()).digest())
        h.update(json.dumps(self.vocab, sort_keys=True, ensure_ascii=False).encode())
        if self.separate:
            h.update(json.dumps(self.target_vocab, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()

    @property
    def vocab_size(self) -> int:
        """The target side's vocabulary (the output layer's rows)."""
        return len(self.target_vocab)

    @property
    def src_vocab_size(self) -> int:
        return len(self.vocab)

    def _ids(self, pieces: list[str], side: str) -> list[int]:
        unk, vocab = self.unk_id, self.maps[side]
        return [vocab.get(p, unk) for p in pieces]

    def _split_code(self, text: str) -> tuple[list[str], str]:
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            return [text[: end + 2]], text[end + 2:]
        return [], text

    def encode(self, text: str, side: str = "src") -> list[int]:
        """Ids of one sentence of ``side`` ("src": source.spm, "tgt": target.spm), without eos."""
        return self.encode_batch([text], side)[0]

    def encode_batch(self, texts: Sequence[str], side: str = "src") -> list[list[int]]:
        codes, bodies = zip(*(self._split_code(t) for t in texts)) if texts else ((), ())
        pieces = self.spm[side].encode(list(bodies), out_type=str, num_threads=-1) if texts else []
        return [self._ids(list(c) + p, side) for c, p in zip(codes, pieces)]

    def decode(self, ids: Iterable[int], side: str = "tgt") -> str:
        """Text of ids (pad/bos/eos skipped), joined by ``side``'s sentencepiece model."""
        names = self.names[side]
        pieces = [names.get(int(i), "<unk>") for i in ids if int(i) not in self._specials]
        return self.spm[side].decode_pieces(pieces)

    def decode_line(self, ids: Iterable[int]) -> str:
        return one_line(self.decode(ids))

    def pieces(self, ids: Iterable[int], side: str = "tgt") -> list[str]:
        names = self.names[side]
        return [names.get(int(i), "<unk>") for i in ids]

    @cached_property
    def lowercases(self) -> bool:
        """Whether the target model lowercases (as `Tokenizer.lowercases`; Marian's do not)."""
        return _lowercases(self.spm["tgt"])


def tokenizer_files(directory: str | Path) -> tuple[str, ...] | None:
    """The tokenizer files ``directory`` holds (a joint model's or a pair's), or None."""
    directory = Path(directory)
    for kind in (Tokenizer, PairTokenizer):
        if all((directory / name).is_file() for name in kind.FILES):
            extra = (PairTokenizer.TARGET_VOCAB,) if kind is PairTokenizer and (
                directory / PairTokenizer.TARGET_VOCAB).is_file() else ()
            return kind.FILES + extra
    return None


def load_tokenizer(directory: str | Path) -> Tokenizer | PairTokenizer:
    """The tokenizer of a checkpoint or dataset directory: ``spm.model`` (aiayn's joint model),
    else ``source.spm``, ``target.spm`` and ``vocab.json`` (an imported Marian pair)."""
    directory = Path(directory)
    if (directory / "spm.model").is_file() or not (directory / "vocab.json").is_file():
        return Tokenizer.load(directory / "spm.model")
    return PairTokenizer.load(directory)


def copy_tokenizer(source: str | Path, destination: str | Path) -> None:
    """Copy a directory's tokenizer files (whichever kind) into another directory."""
    files = tokenizer_files(source)
    if files is None:
        raise UserError("holds no tokenizer (spm.model, or source.spm + target.spm + vocab.json)", path=source)
    for name in files:
        shutil.copyfile(Path(source) / name, Path(destination) / name)


def lowercase_rules(path: Path) -> Path:
    """Write sentencepiece's normalization table for lowercasing to ``path`` (a TSV: a code
    point, then the code points it becomes, in hex): Python's ``str.lower`` of every character
    it changes. Unlike sentencepiece's own ``nmt_nfkc_cf`` this is lowercasing and nothing else
    (no NFKC rewriting such as '…' to '...', no case folding such as 'ß' to 'ss'), so a model's
    lowercased output matches ``str.lower`` of the references, which is what sacreBLEU's
    ``-lc`` compares."""
    rows = []
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:  # surrogates are not characters
            continue
        lower = chr(code).lower()
        if lower != chr(code):
            rows.append(f"{code:X}\t{' '.join(f'{ord(c):X}' for c in lower)}\n")
    path.write_text("".join(rows), encoding="ascii")
    return path


def train_bpe(texts: Iterable[str], model_prefix: Path, vocab_size: int, *,
              byte_fallback: bool | None = None, sample: int = 2_000_000, in_subprocess: bool = False,
              lowercase: bool = False) -> dict:
    """Train a joint BPE model on ``texts`` -> writes PREFIX.model/.vocab; returns its settings.

    ``texts`` is streamed to sentencepiece (empty ones skipped), which keeps at most ``sample``
    of them (``input_sentence_size``; `prepare` gives it a sample of that size already).
    ``hard_vocab_limit=False`` makes vocab_size an upper bound, so a tiny corpus (the copy
    task) gets the vocabulary it can support instead of an error.

    ``in_subprocess``: the texts go to PREFIX.txt and a process of its own trains on that file,
    so the trainer's memory (about 0.5 KB a sentence) is given back when it ends, instead of
    staying with this process (`prepare` then encodes the corpus in what is left).

    ``lowercase``: the model's normalization is `lowercase_rules` instead of ``identity``; the
    returned settings name it ``lowercase``.
    """
    if byte_fallback is None:
        byte_fallback = vocab_size >= BYTE_FALLBACK_MIN_VOCAB
    settings = dict(
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity", byte_fallback=byte_fallback,
        character_coverage=0.9999 if byte_fallback else 1.0,
        split_digits=True,
        # Long help paragraphs must not be dropped from BPE training.
        max_sentence_length=1 << 16,
        input_sentence_size=sample, shuffle_input_sentence=True,
        num_threads=2,
    )
    if vocab_size < 8:
        raise UserError(f"--vocab-size {vocab_size} is too small (at least 8)")
    sentences = (t for t in texts if t)
    trainer_settings = dict(settings)
    if lowercase:
        del trainer_settings["normalization_rule_name"]
        rules = lowercase_rules(Path(str(model_prefix) + ".lowercase.tsv"))
        trainer_settings["normalization_rule_tsv"] = str(rules)
        settings["normalization_rule_name"] = "lowercase"
    try:
        if in_subprocess:
            _train_bpe_in_subprocess(sentences, Path(model_prefix), trainer_settings)
            return settings
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=sentences,
                                           model_prefix=str(model_prefix),
                                           minloglevel=2, **trainer_settings)
        except RuntimeError as e:
            raise UserError(f"sentencepiece could not train a BPE model: {e}") from None
        return settings
    finally:
        if lowercase:
            rules.unlink(missing_ok=True)


def _train_bpe_in_subprocess(sentences: Iterable[str], model_prefix: Path, settings: dict) -> None:
    import subprocess
    import sys

    text = model_prefix.with_suffix(".txt")
    with open(text, "w", encoding="utf-8", newline="\n") as f:
        for sentence in sentences:
            f.write(sentence + "\n")
    program = ("import json, sys\nimport sentencepiece as spm\n"
               "args = json.loads(sys.argv[1])\n"
               "try:\n    spm.SentencePieceTrainer.train(**args)\n"
               "except RuntimeError as e:\n    sys.exit(str(e))\n")
    args = dict(input=str(text), model_prefix=str(model_prefix), minloglevel=2, **settings)
    try:
        done = subprocess.run([sys.executable, "-c", program, json.dumps(args)], capture_output=True, text=True)
    finally:
        text.unlink(missing_ok=True)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["exit status " + str(done.returncode)])[-1]
        raise UserError(f"sentencepiece could not train a BPE model: {message}")
