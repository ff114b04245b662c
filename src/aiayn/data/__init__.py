"""The data stage: parallel corpora -> a joint subword vocabulary -> token-based batches.

- `prepare_dataset` (``aiayn prepare``) builds a dataset directory from the user's files, a TSV,
  Multi30k, LibreOffice's help pages (English-X, from Debian packages) or a synthetic task,
  as `PrepareOptions` say.
- `load_dataset` opens such a directory: ``.manifest``, ``.tokenizer``, ``.split(name)``,
  ``.raw(name, side)``.
- `TokenBatchSampler` and `collate` turn a split into the paper's batches (§5.1).

The names are imported on first use, so that ``aiayn --help`` and `aiayn.data.options` do not
import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Batch": "batching", "TokenBatchSampler": "batching", "collate": "batching",
    "PreparedData": "dataset", "Split": "dataset", "load_dataset": "dataset",
    "PrepareOptions": "options", "prepare_dataset": "prepare",
    "Tokenizer": "tokenizer", "PAD_ID": "tokenizer", "UNK_ID": "tokenizer", "BOS_ID": "tokenizer",
    "EOS_ID": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
