"""aiayn: the Transformer of "Attention Is All You Need", to train, translate, evaluate and inspect."""

from .model import Transformer, TransformerConfig

__version__ = "0.1.0"
__all__ = ["Transformer", "TransformerConfig", "__version__"]
