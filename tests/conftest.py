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

REPO = Path(__file__).resolve().parents[1]
COPY_CONFIG = REPO / "configs" / "copy.yaml"
# Overrides for quick runs of copy.yaml: a tiny model, no progress bar, one thread.
TINY = ["model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.n_encoder_layers=1",
        "model.n_decoder_layers=1", "train.progress=false", "train.num_threads=1"]

# Continuing the copy run: rounds of COPY_ROUND updates (= save_every in configs/copy.yaml, so
# every round ends on a checkpoint of the regular grid) at a falling learning rate, up to
# COPY_MAX_UPDATES in all. The falling rate is what makes the rounds converge. At copy.yaml's own
# rate the inverse-sqrt schedule decays too slowly for a model this small: its errors on the
# valid set wander between about 10 and 40 for as long as it trains (measured to 1,600 updates).
# At a fixed fifth of that rate a few of the longest sentences with repeated symbols can stay
# wrong (with AVX2 kernels: 2 to 4 errors from 1,000 to 1,800 updates); halving the rate each
# round settles them (0 errors from 1,200 updates on, in the same run).
COPY_ROUND = 200
COPY_COOLDOWN_LR = 0.1  # train.lr_factor of the first extra round (copy.yaml: 0.5); halved each round
COPY_MAX_UPDATES = 1800


def _unseen_copy_inputs() -> list[str]:
    """Random sequences of the copy task's symbols, 6-15 long: 20^6 or more possible inputs, so
    practically none was among the training pairs."""
    import torch

    from aiayn.data.corpora import SYNTHETIC_SYMBOLS

    g = torch.Generator().manual_seed(1234)
    return [" ".join(SYNTHETIC_SYMBOLS[int(i)] for i in torch.randint(len(SYNTHETIC_SYMBOLS), (int(n),), generator=g))
            for n in torch.randint(6, 16, (20,), generator=g)]


UNSEEN_COPY_INPUTS = _unseen_copy_inputs()


def prepare_synthetic(out: Path, task: str = "copy", *extra: str) -> Path:
    """``aiayn prepare --corpus TASK --out OUT`` through the CLI entry point."""
    from aiayn.cli import main

    assert main(["prepare", "--corpus", task, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def copy_dataset(tmp_path_factory) -> Path:
    """A prepared copy-task dataset directory (19k train / 1k valid / 1k test pairs)."""
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "copy", "copy")


def copy_failures(checkpoint: Path, dataset: Path) -> list[str]:
    """What the copy model gets wrong: each valid sentence and each `UNSEEN_COPY_INPUTS` line that
    greedy search or beam search (beam 4, alpha 0.6) does not copy exactly, as 'beam K: ids'.

    The check runs on token ids with the searches themselves (the copy task's target ids are
    its source ids), so the tests of the text path (`Translator`, the CLI) are not the check
    they rely on."""
    from aiayn.checkpoint import load_checkpoint
    from aiayn.data import collate, load_dataset
    from aiayn.decode import beam_search, greedy_search

    ckpt = load_checkpoint(checkpoint)
    sources = [list(map(int, s)) for s in load_dataset(dataset).split("valid").src]
    sources += ckpt.tokenizer.encode_batch(UNSEEN_COPY_INPUTS)
    failures = []
    for start in range(0, len(sources), 128):
        chunk = sources[start:start + 128]
        src = collate(chunk, chunk).src
        greedy = greedy_search(ckpt.model, src)
        beam = [hyps[0].tokens for hyps in beam_search(ckpt.model, src, beam=4, alpha=0.6)]
        for k, outputs in ((1, greedy), (4, beam)):
            failures += [f"beam {k}: {s} -> {out}" for s, out in zip(chunk, outputs) if out != s]
    return failures


@pytest.fixture(scope="session")
def copy_run(tmp_path_factory, copy_dataset):
    """A training run on the copy task with configs/copy.yaml, continued (see COPY_ROUND) until
    `copy_failures` finds nothing in its last checkpoint: the final TrainResult."""
    from aiayn.train import train

    out = tmp_path_factory.mktemp("runs") / "copy"
    result = train(COPY_CONFIG, copy_dataset, out, ["train.progress=false"])
    lr_factor = COPY_COOLDOWN_LR
    while failures := copy_failures(result.last_checkpoint, copy_dataset):
        if result.step >= COPY_MAX_UPDATES:
            pytest.fail(f"the copy-task model still fails {len(failures)} of its checks after {result.step} "
                        f"updates (cap {COPY_MAX_UPDATES}), e.g. {failures[0]}")
        result = train(COPY_CONFIG, copy_dataset, out, ["train.progress=false", f"train.lr_factor={lr_factor}",
                                                        f"train.max_updates={result.step + COPY_ROUND}"], resume=True)
        lr_factor /= 2
    return result


@pytest.fixture(scope="session")
def copy_checkpoint(copy_run) -> Path:
    """Path to a checkpoint directory (aiayn.checkpoint.load_checkpoint reads it) of a tiny
    Transformer trained on the copy task: the run's last checkpoint, the one `copy_run` checked
    to copy every valid sentence and `UNSEEN_COPY_INPUTS` exactly."""
    return copy_run.last_checkpoint


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


# Byte pieces a model with byte fallback can write, spelling control characters and line
# separators: newline, TAB, ESC, U+2028 (3 bytes), NEL U+0085 (2 bytes), CR.
BYTE_PIECE_OUTPUT = ["▁the", "<0x0A>", "▁cat", "<0x09>", "▁sat", "<0x1B>", "▁on", "<0xE2>", "<0x80>", "<0xA8>",
                     "▁mat", "<0xC2>", "<0x85>", "▁dog", "<0x0D>"]
BYTE_PIECE_TEXT = "the cat sat on mat dog"  # what a translation of any input must read: one line


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
        features = {}
        hook = model.generator.register_forward_hook(lambda m, inputs, out: features.update(h=inputs[0][:, 0]))
        ids = torch.tensor(chain[:-1])[:, None]
        model.decode(ids, model.encode(torch.tensor([[EOS_ID]] * len(ids))), torch.ones(len(ids), 1, dtype=torch.bool))
        hook.remove()
        model.generator.weight.zero_()
        # logit of the next token = 16 · cos(h(y), h(next's predecessor)) · |h| / sqrt(d) ≈ 16; others ≈ 0.
        h = features["h"]
        model.generator.weight[chain[1:]] = 16 * h / h.norm(dim=-1, keepdim=True) / cfg.d_model ** 0.5
    return save_checkpoint(root / "model", model, root / "spm.model", {"step": 0})
