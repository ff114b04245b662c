"""The options of data preparation, in a module of their own: the command line reads their
defaults for its ``--help`` without importing the data stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrepareOptions:
    """What ``aiayn prepare`` builds, one field per option (``--vocab-size`` is ``vocab_size``).

    The source is exactly one of: ``src`` and ``tgt`` (two line-aligned files), ``tsv``, or
    ``corpus`` (``libreoffice-help`` with ``lang``; ``multi30k`` with ``path`` and ``pair``;
    the synthetic ``copy`` and ``reverse`` with ``train_size``).
    """

    out: str
    src: str | None = None
    tgt: str | None = None
    tsv: str | None = None
    corpus: str | None = None
    valid_src: str | None = None  # your own validation (dev) set; else drawn from the pool
    valid_tgt: str | None = None
    test_src: str | None = None  # your own test set; else drawn from the pool
    test_tgt: str | None = None
    lang: str = "de"  # libreoffice-help: the target language
    path: str | None = None  # multi30k: the directory with train/val/test2016 files
    pair: str = "en-de"  # multi30k: SRC-TGT
    vocab_size: int = 8000  # joint BPE vocabulary
    lowercase: bool = False  # the BPE model lowercases all it encodes: the model reads and writes lowercase
    bpe_sample: int = 2_000_000  # BPE is trained on at most this many sentences (a seeded sample)
    tokenizer_from: str | None = None  # a checkpoint whose tokenizer encodes the data (no BPE training)
    valid_size: int = 1000  # validation pairs drawn from the training data
    test_size: int = 1000  # test pairs drawn from the training data
    max_len: int = 256  # training pairs longer than this (subwords) are dropped
    max_ratio: float = 3.0  # training pairs with a larger length ratio are dropped
    seed: int = 1  # for the splits and the synthetic data
    train_size: int = 20000  # copy/reverse: training pairs to generate
    cache_dir: str | None = None  # where downloaded packages are unpacked (None: ~/.cache/aiayn)
    force: bool = False  # replace an existing dataset directory
