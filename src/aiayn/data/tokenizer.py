"""A joint subword vocabulary (paper §5.1: byte-pair encoding, shared by source and target).

One BPE model is trained with sentencepiece on the source and target training text together,
so the encoder and decoder can share one embedding matrix (§3.4). The special ids are fixed
project-wide: pad=0, unk=1, bos=2, eos=3.

Exact round trip: text is stored in a canonical form (`text.clean`: NFC, single spaces), the
model uses the ``identity`` normalization (no NFKC rewriting), and for vocabularies of
`BYTE_FALLBACK_MIN_VOCAB` or more, characters unseen in training are spelled as UTF-8 byte
pieces instead of ``<unk>``. So ``decode(encode(x)) == x`` for any cleaned text.
"""

from __future__ import annotations

import hashlib
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
        if not path.is_file():
            raise UserError("subword model not found", path=path)
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"not a sentencepiece model ({e})", path=path) from None
        return cls(sp, path)

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the serialised sentencepiece model (the bytes of its spm.model file):
        identifies the vocabulary. Checkpoints and shortlists record it."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of one sentence, without bos/eos (the batcher adds those)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many sentences, on all cores (sentencepiece's ``num_threads=-1``; its 0
        is one thread)."""
        return self.sp.encode(list(texts), out_type=int, num_threads=-1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids; pad/bos/eos are skipped (unk decodes as ' ⁇ ')."""
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def decode_line(self, ids: Iterable[int]) -> str:
        """`decode` as one line of text (`text.one_line`): what translation outputs. Byte pieces
        can spell a newline or another control character; `decode` keeps them (it must invert
        `encode` exactly), this never does."""
        return one_line(self.decode(ids))

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Subword strings of ids (with the '▁' word-start mark), e.g. for attention plots."""
        return [self.sp.id_to_piece(int(i)) for i in ids]


def train_bpe(texts: Iterable[str], model_prefix: Path, vocab_size: int, *,
              byte_fallback: bool | None = None, sample: int = 2_000_000) -> dict:
    """Train a joint BPE model on ``texts`` -> writes PREFIX.model/.vocab; returns its settings.

    ``texts`` is streamed to sentencepiece (empty ones skipped), which keeps at most ``sample``
    of them (``input_sentence_size``; `prepare` gives it a sample of that size already).
    ``hard_vocab_limit=False`` makes vocab_size an upper bound, so a tiny corpus (the copy
    task) gets the vocabulary it can support instead of an error.
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
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences,
                                       model_prefix=str(model_prefix),
                                       minloglevel=2, **settings)
    except RuntimeError as e:
        raise UserError(f"sentencepiece could not train a BPE model: {e}") from None
    return settings
