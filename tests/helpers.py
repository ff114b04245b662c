"""Helpers shared by the tests: constants, small models and data, the copy model's check.

The fixtures that use them are in conftest.py; tests import what they need from here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aiayn.config import SearchConfig
from aiayn.data.tokenizer import BOS_ID, EOS_ID
from aiayn.model import Transformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
COPY_CONFIG = REPO / "configs" / "copy.yaml"
# The suite's training runs are pinned to fp32, so that what they learn is the same on every
# machine (train.precision is auto by default: bf16 on CPUs with AVX512-BF16 or AMX, fp32 on
# others). bf16 training has its own tests (test_train_step.py, test_trainer.py).
FP32 = "train.precision=fp32"
# Overrides for quick runs of copy.yaml: a tiny model, no progress bar, one thread.
# fp32 products through MKL: "auto" would time MKL against oneDNN at each start, and runs that
# are compared bitwise must multiply through the same library (test_train_products.py tests auto).
MKL = "train.fp32_products=mkl"
TINY = ["model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.n_encoder_layers=1",
        "model.n_decoder_layers=1", "train.progress=false", "train.num_threads=1", FP32, MKL]

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


def copy_failures(checkpoint: Path, dataset: Path) -> list[str]:
    """What the copy model gets wrong: each valid sentence and each `UNSEEN_COPY_INPUTS` line that
    greedy search or beam search (beam 4, alpha 0.6) does not copy exactly, as 'beam K: ids'.

    The check runs on token ids with the searches themselves (the copy task's target ids are
    its source ids), so the tests of the text path (`Translator`, the CLI) are not the check
    they rely on."""
    from aiayn.checkpoint import load_checkpoint
    from aiayn.data import collate, load_dataset
    from aiayn.search import beam_search, greedy_search

    ckpt = load_checkpoint(checkpoint)
    sources = [list(map(int, s)) for s in load_dataset(dataset).split("valid").src]
    sources += ckpt.tokenizer.encode_batch(UNSEEN_COPY_INPUTS)
    failures = []
    for start in range(0, len(sources), 128):
        chunk = sources[start:start + 128]
        src = collate(chunk, chunk).src
        greedy = greedy_search(ckpt.model, src)
        beam = [hyps[0].tokens for hyps in beam_search(ckpt.model, src, SearchConfig(beam=4, alpha=0.6))]
        for k, outputs in ((1, greedy), (4, beam)):
            failures += [f"beam {k}: {s} -> {out}" for s, out in zip(chunk, outputs) if out != s]
    return failures


# A few sentences for tokenizers and decoding tests of random models.
TEXT = [
    "the cat sat on the mat", "a dog runs in the park", "two men are playing football",
    "a woman is reading a book", "children play near the water", "the sun is shining today",
]


# Byte pieces a model with byte fallback can write, spelling control characters and line
# separators: newline, TAB, ESC, U+2028 (3 bytes), NEL U+0085 (2 bytes), CR.
BYTE_PIECE_OUTPUT = ["▁the", "<0x0A>", "▁cat", "<0x09>", "▁sat", "<0x1B>", "▁on", "<0xE2>", "<0x80>", "<0xA8>",
                     "▁mat", "<0xC2>", "<0x85>", "▁dog", "<0x0D>"]
BYTE_PIECE_TEXT = "the cat sat on mat dog"  # what a translation of any input must read: one line


VOCAB = 24


def toy_model(vocab: int = VOCAB, seed: int = 2, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(src_vocab_size=vocab, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0, tie_embeddings="none")
    fields.update(overrides)
    model = Transformer(TransformerConfig(**fields)).eval()
    with torch.no_grad():  # peakier distributions, and EOS likely enough to end at varied lengths
        model.generator.weight.mul_(2.0)
        model.generator.weight[EOS_ID].mul_(1.5)
    return model


def batch_of(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A padded source batch: random tokens + EOS, rows of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths) + 1, dtype=torch.long)
    for row, n in enumerate(lengths):
        src[row, :n] = torch.randint(4, vocab, (n,), generator=g)
        src[row, n] = EOS_ID
    return src


LENGTHS = [3, 7, 5, 1, 9, 4, 12, 2]


def model_log_prob(model: Transformer, src_row: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens + EOS | src) by one teacher-forced forward pass (no search, no cache)."""
    src = src_row[src_row.ne(0) | (torch.arange(src_row.numel()) == 0)].unsqueeze(0)
    tgt_in = torch.tensor([[BOS_ID] + tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1)[0]
    gold = tokens + [EOS_ID]
    return sum(log_probs[t, w].item() for t, w in enumerate(gold))


# Small models for the model, search and inference tests.
PAD = 0


def small_config(**overrides) -> TransformerConfig:
    fields = dict(src_vocab_size=40, d_model=32, d_ff=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def small_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides)).eval()


def random_ids(b: int, n: int, vocab: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (b, n), generator=g)  # ids >= 4: never pad/unk/bos/eos


# Tiny models and batches for the training tests (tests/test_train_*.py, tests/test_trainer.py).


def tiny_model(vocab: int = 45, dropout: float = 0.0, seed: int = 0) -> Transformer:
    """A 1+1-layer Transformer, d_model 32, for the copy task's 45-entry vocabulary."""
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(src_vocab_size=vocab, d_model=32, d_ff=64, n_heads=2, n_encoder_layers=1,
                                         n_decoder_layers=1, dropout=dropout))


def adam(model: torch.nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)


def train_pairs(dataset: Path, indices: list[int]):
    """The training pairs at ``indices`` of a prepared dataset: (sources, targets) as id arrays."""
    from aiayn.data import load_dataset

    train_split = load_dataset(dataset).split("train")
    return [train_split.src[i] for i in indices], [train_split.tgt[i] for i in indices]


def poison_decoder(model, value: float):
    """Make the decoder's output non-finite (a forward hook; call .remove() on the result)."""
    return model.decoder.register_forward_hook(lambda mod, inp, out: (out[0] * value, *out[1:]))


# A copy-task dataset small enough for runs of whole epochs: `aiayn prepare --corpus copy` options.
# Its 300 training pairs make 27 micro-batches of 150 tokens per epoch (train.batch_tokens=300,
# train.update_freq=2): an odd number, so one update takes its micro-batches from two epochs.
SMALL_COPY = ("--train-size", "300", "--valid-size", "40", "--test-size", "20")


def last_checkpoint_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The newest checkpoint of a run: its weights, its Adam tensors and its trainer state."""
    import json

    from safetensors.torch import load_file

    from aiayn.train.state import list_checkpoints

    last = list_checkpoints(run)[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    return {"model": load_file(str(last / "model.safetensors")), "optimizer": load_file(str(last / "optimizer.safetensors")),
            "state": {"step": state["step"], "sampler": state["sampler"]}}


def assert_same_final_state(run: Path, reference: Path) -> None:
    """The newest checkpoints of two runs hold bitwise the same weights, Adam moments, update count
    and data position."""
    got, want = last_checkpoint_tensors(run), last_checkpoint_tensors(reference)
    assert got["state"] == want["state"]
    for part in ("model", "optimizer"):
        assert got[part].keys() == want[part].keys()
        for key in want[part]:
            assert torch.equal(got[part][key], want[part][key]), f"{part}: {key}"


def one_second_updates(monkeypatch) -> list[float]:
    """A fake clock for the trainer: every update takes exactly one second and nothing else
    takes time. Returns the clock (a one-element list, seconds) for the test to read."""
    import aiayn.train.trainer as trainer_module
    from aiayn.train.step import train_update

    clock = [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0]

    def one_second_update(*args, **kwargs):
        clock[0] += 1.0
        return train_update(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "time", FakeTime)
    monkeypatch.setattr(trainer_module, "train_update", one_second_update)
    return clock

