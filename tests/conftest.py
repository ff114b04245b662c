"""Shared fixtures: a synthetic copy dataset and a tiny model trained on it.

`copy_checkpoint` trains once per test session (through `aiayn.train.train`, the Python API
behind ``aiayn train``) so the decode, attention and CLI tests can use a real trained model
without training their own. It is checked to reach >= 99% teacher-forced token accuracy on
the valid set; it takes well under a minute on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COPY_CONFIG = REPO / "configs" / "copy.yaml"


def prepare_synthetic(out: Path, task: str = "copy", *extra: str) -> Path:
    """``aiayn prepare --corpus TASK --out OUT`` through the CLI entry point."""
    from aiayn.cli import main

    assert main(["prepare", "--corpus", task, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def copy_dataset(tmp_path_factory) -> Path:
    """A prepared copy-task dataset directory (19k train / 1k valid / 1k test pairs)."""
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "copy", "copy")


@pytest.fixture(scope="session")
def copy_run(tmp_path_factory, copy_dataset):
    """A training run on the copy task with configs/copy.yaml: the TrainResult."""
    from aiayn.train import train

    out = tmp_path_factory.mktemp("runs") / "copy"
    return train(COPY_CONFIG, copy_dataset, out, ["train.progress=false"])


@pytest.fixture(scope="session")
def copy_checkpoint(copy_run) -> Path:
    """Path to a checkpoint directory (aiayn.checkpoint.load_checkpoint reads it) of a tiny
    Transformer trained on the copy task to >= 99% token accuracy: the run's best-BLEU checkpoint."""
    import json

    best = copy_run.out_dir / "best"
    meta = json.loads((best / "meta.json").read_text())
    accuracy = meta["valid"]["accuracy"]
    assert accuracy >= 0.99, f"copy-task model reached only {accuracy:.4f} token accuracy"
    return best


# A few sentences for tokenizers and decoding tests of random models.
TEXT = [
    "the cat sat on the mat", "a dog runs in the park", "two men are playing football",
    "a woman is reading a book", "children play near the water", "the sun is shining today",
]


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A checkpoint of a small random (untrained) model with a 60-piece vocabulary."""
    import torch

    from aiayn.checkpoint import save_checkpoint
    from aiayn.model import Transformer, TransformerConfig
    from aiayn.data.tokenizer import Tokenizer, train_bpe

    root = tmp_path_factory.mktemp("ckpt")
    train_bpe(TEXT * 20, root / "spm", vocab_size=60)
    tokenizer = Tokenizer.load(root / "spm.model")
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, n_heads=4,
                            n_encoder_layers=2, n_decoder_layers=2, positions="learned", max_positions=64)
    model = Transformer(cfg)
    with torch.no_grad():
        model.generator.weight.mul_(2.0)  # tied: also sharpens the embeddings; fine for a random model
    return save_checkpoint(root / "model", model, root / "spm.model", {"step": 0})
