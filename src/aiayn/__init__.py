"""aiayn: the Transformer of "Attention Is All You Need", to train, translate, evaluate and inspect.

    from aiayn import Translator, SearchConfig
    translator = Translator("runs/demo/train/averaged")
    translator.translate(["Click OK to close the dialog."])

The names below are imported on first use, so that ``aiayn --help`` does not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Transformer": "model", "TransformerConfig": "model",
    "SearchConfig": "config",
    "Translator": "translator", "Translation": "translator",
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
}
__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
