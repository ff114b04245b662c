"""Shared fixtures: a synthetic copy dataset and a tiny model trained on it.

`copy_checkpoint` trains once per test session (through `aiayn.train.train`, the Python API
behind ``aiayn train``) so the decode, attention and CLI tests can use a real trained model
without training their own. What those tests rely on is checked, not hoped for: greedy search
and beam search (beam 4) copy every valid sentence and every line of `UNSEEN_COPY_INPUTS`
exactly. Numerics differ between CPUs (AVX2 or AVX-512, MKL/oneDNN kernels), so after the
800 updates of configs/copy.yaml one machine's model may still drop a repeated symbol that
another's copies; the fixture then continues the run until the property holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (  # noqa: F401
    BYTE_PIECE_OUTPUT,
    COPY_CONFIG,
    COPY_COOLDOWN_LR,
    COPY_MAX_UPDATES,
    COPY_ROUND,
    FP32,
    TEXT,
    copy_failures,
    prepare_synthetic,
)


@pytest.fixture(scope="session")
def small_copy(tmp_path_factory) -> Path:
    """A small prepared copy-task dataset (helpers.SMALL_COPY) for the training tests' short runs."""
    from helpers import SMALL_COPY

    return prepare_synthetic(tmp_path_factory.mktemp("data") / "small_copy", "copy", *SMALL_COPY)


@pytest.fixture(scope="session")
def copy_dataset(tmp_path_factory) -> Path:
    """A prepared copy-task dataset directory (19k train / 1k valid / 1k test pairs)."""
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "copy", "copy")


@pytest.fixture(scope="session")
def copy_run(tmp_path_factory, copy_dataset):
    """A training run on the copy task with configs/copy.yaml, continued (see COPY_ROUND) until
    `copy_failures` finds nothing in its last checkpoint: the final TrainResult."""
    from aiayn.train import train

    out = tmp_path_factory.mktemp("runs") / "copy"
    result = train(COPY_CONFIG, copy_dataset, out, ["train.progress=false", FP32])
    lr_factor = COPY_COOLDOWN_LR
    while failures := copy_failures(result.last_checkpoint, copy_dataset):
        if result.step >= COPY_MAX_UPDATES:
            pytest.fail(f"the copy-task model still fails {len(failures)} of its checks after {result.step} "
                        f"updates (cap {COPY_MAX_UPDATES}), e.g. {failures[0]}")
        result = train(COPY_CONFIG, copy_dataset, out, ["train.progress=false", FP32, f"train.lr_factor={lr_factor}",
                                                        f"train.max_updates={result.step + COPY_ROUND}"], resume=True)
        lr_factor /= 2
    return result


@pytest.fixture(scope="session")
def copy_checkpoint(copy_run) -> Path:
    """Path to a checkpoint directory (aiayn.checkpoint.load_checkpoint reads it) of a tiny
    Transformer trained on the copy task: the run's last checkpoint, the one `copy_run` checked
    to copy every valid sentence and `UNSEEN_COPY_INPUTS` exactly."""
    return copy_run.last_checkpoint


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A checkpoint of a small random (untrained) model with a 60-piece vocabulary."""
    import torch

    from aiayn.checkpoint import save_checkpoint
    from aiayn.data.tokenizer import Tokenizer, train_bpe
    from aiayn.model import Transformer, TransformerConfig

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


@pytest.fixture(scope="session")
def byte_piece_checkpoint(tmp_path_factory):
    """A checkpoint whose model writes the pieces of BYTE_PIECE_OUTPUT, then EOS, for any input.

    Its tokenizer has byte fallback (a vocabulary of 1000 asks for it), as real ones do. The
    model's decoder sublayers are zeroed, so each position's output is a fixed function h(y) of
    the token y it reads; the output layer maps h(y) to the token that follows y in the list."""
    import torch

    from aiayn.checkpoint import save_checkpoint
    from aiayn.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_bpe
    from aiayn.model import Transformer, TransformerConfig

    root = tmp_path_factory.mktemp("bytes")
    train_bpe(TEXT * 20, root / "spm", vocab_size=1000)
    tokenizer = Tokenizer.load(root / "spm.model")
    chain = [BOS_ID] + [tokenizer.sp.piece_to_id(p) for p in BYTE_PIECE_OUTPUT] + [EOS_ID]
    assert tokenizer.unk_id not in chain and len(set(chain)) == len(chain)
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=1,
                            n_decoder_layers=1, dropout=0.0, tie_embeddings="none", positions="learned",
                            max_positions=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            for sublayer in (layer.self_attn, layer.cross_attn, layer.ffn):
                for p in sublayer.parameters():
                    p.zero_()
        model.tgt_embed.positions.weight.zero_()
        ids = torch.tensor(chain[:-1])[:, None]
        states = model.decode(ids, model.encode(torch.tensor([[EOS_ID]] * len(ids))),
                              torch.ones(len(ids), 1, dtype=torch.bool))
        features = {"h": states[:, 0]}
        model.generator.weight.zero_()
        # logit of the next token = 16 · cos(h(y), h(next's predecessor)) · |h| / sqrt(d) ≈ 16; others ≈ 0.
        h = features["h"]
        model.generator.weight[chain[1:]] = 16 * h / h.norm(dim=-1, keepdim=True) / cfg.d_model ** 0.5
    return save_checkpoint(root / "model", model, root / "spm.model", {"step": 0})
