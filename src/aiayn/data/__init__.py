"""The data stage: parallel corpora -> a joint subword vocabulary -> token-based batches.

- `prepare_main` (``aiayn prepare``) builds a dataset directory from the user's files, a TSV,
  Multi30k, LibreOffice's help pages (English-X, from Debian packages) or a synthetic task.
- `load_dataset` opens such a directory: ``.manifest``, ``.tokenizer``, ``.split(name)``,
  ``.raw(name, side)``.
- `TokenBatchSampler` and `collate` turn a split into the paper's batches (§5.1).
"""

from .batching import Batch, TokenBatchSampler, collate
from .dataset import PreparedData, Split, load_dataset
from .prepare import prepare_main
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

__all__ = ["Batch", "TokenBatchSampler", "collate", "PreparedData", "Split", "load_dataset",
           "prepare_main", "Tokenizer", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
