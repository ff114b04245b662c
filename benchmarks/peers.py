"""The systems under test, built with the same dimensions (and, where the layout allows, the
same weights) as the aiayn model they are compared with.

- aiayn: `aiayn.model.Transformer`.
- nn.Transformer: `torch.nn.Transformer`, wrapped minimally with the shared √d-scaled
  embedding, the paper's sinusoidal positions and a tied output projection. Its own
  initialisation; same sizes. (nn.Transformer ends both stacks with an extra LayerNorm even
  in post-LN mode: 2·d_model more parameters and a negligible amount of work.)
- Hugging Face `MarianMTModel` and CTranslate2: the aiayn weights exported to the Marian layout
  (`aiayn.export`), which computes the same function; CTranslate2 converts that directory
  with its stock converter.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.export import export_marian
from aiayn.model import Transformer, TransformerConfig, sinusoidal_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access: everything is built locally
warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")


def quiet_transformers() -> None:
    """Errors only, no progress bars: the log shows the measurements."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def config(name: str) -> TransformerConfig:
    """`base` is the paper's (Table 3) with its 37k shared vocabulary; `small` is N=3,
    d_model=256, d_ff=1024, h=4 with an 8k vocabulary (a Multi30k-sized model)."""
    if name == "base":
        return TransformerConfig.base(vocab_size=37000)
    if name == "small":
        return TransformerConfig(src_vocab_size=8000, d_model=256, d_ff=1024, n_heads=4,
                                 n_encoder_layers=3, n_decoder_layers=3, dropout=0.1)
    if name == "tiny":  # --quick only
        return TransformerConfig(src_vocab_size=1000, d_model=64, d_ff=256, n_heads=4,
                                 n_encoder_layers=2, n_decoder_layers=2, dropout=0.1)
    raise ValueError(name)


def aiayn_model(cfg: TransformerConfig, seed: int = 0) -> Transformer:
    from aiayn.train.dropout import use_fast_dropout

    torch.manual_seed(seed)
    return use_fast_dropout(Transformer(cfg))  # as the trainer builds it


@torch.no_grad()
def make_specials_unreachable(model: Transformer) -> None:
    """Random weights, fixed output length: give </s>, <s> and pad constant embedding rows.

    The decoder's last sublayer ends in a LayerNorm (post-LN), whose output h has zero mean
    over its d_model features while γ = 1 and β = 0 (their initial values). A row c·1 then
    has the logit h · c·1 = c·Σh_i = 0, while the other logits spread as N(0, ~1), so with
    thousands of candidates it is never among the best. For </s>: every system decodes the
    full length, the same number of decoder steps, without any min-length option. For <s>
    and pad: aiayn's search never outputs them, the peers have no such rule; now no system
    picks them, so the outputs can be compared token by token.
    """
    d = model.config.d_model
    for special in (PAD, BOS, EOS):
        model.src_embed.token.weight[special] = d**-0.5  # the same norm (1) as a N(0, 1/d) row


def random_batch(vocab: int, sentences: int, min_len: int, max_len: int, seed: int) -> Tensor:
    """(sentences, max_len+1) ids: random subwords (ids >= 4), then </s>, then padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (sentences,), generator=g)
    batch = torch.full((sentences, max_len + 1), PAD, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        batch[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        batch[i, n] = EOS
    return batch


# ---------------------------------------------------------------------------------------------
# torch.nn.Transformer, wrapped minimally
# ---------------------------------------------------------------------------------------------


class TorchTransformerMT(nn.Module):
    """nn.Transformer + shared embedding (×√d_model) + sinusoidal positions + tied output layer."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)
        self.register_buffer("pe", sinusoidal_table(1024, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_encoder_layers,
            num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff, dropout=cfg.dropout,
            activation="relu", batch_first=True, norm_first=cfg.norm_first,
        )
        self.scale = math.sqrt(cfg.d_model)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.dropout(self.embed(ids) * self.scale + self.pe[: ids.size(1)])

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        pad = src.eq(PAD)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)
        h = self.transformer(
            self._embed(src), self._embed(tgt_in), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=pad, memory_key_padding_mask=pad,
        )
        return F.linear(h, self.embed.weight)  # tied pre-softmax projection


# ---------------------------------------------------------------------------------------------
# Hugging Face Marian and CTranslate2, from the exported aiayn weights
# ---------------------------------------------------------------------------------------------


def tiny_sentencepiece(directory: Path) -> Path:
    """A small sentencepiece model with the project's special ids. The Marian tokenizer files
    (which CTranslate2's converter loads) need one; the benchmark model has random weights,
    so its rows beyond these pieces are named <unused_N> by the export."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = directory / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(800)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "sp"), vocab_size=200, model_type="bpe",
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False, minloglevel=2,
    )
    return directory / "sp.model"


def export_hf(model: Transformer, directory: Path, spm_file: Path) -> Path:
    return export_marian(model, directory, spm_file, force=True)


def load_hf(directory: Path):
    from transformers import MarianMTModel

    quiet_transformers()
    return MarianMTModel.from_pretrained(str(directory)).eval()


def hf_inputs(src: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Our padded source -> the exported model's input_ids (pad = id V) and attention mask."""
    mask = src.ne(PAD)
    return src.masked_fill(~mask, vocab), mask.long()


def convert_ct2(hf_dir: Path, out: Path) -> Path:
    """CTranslate2's stock converter, float32 weights (int8 is chosen when loading)."""
    from ctranslate2.converters import TransformersConverter

    quiet_transformers()
    TransformersConverter(str(hf_dir)).convert(str(out), force=True)
    return out


def ct2_pieces(hf_dir: Path) -> dict[int, str]:
    """id -> token string, from the export's vocab.json (CTranslate2 takes strings)."""
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    return {i: p for p, i in vocab.items()}


def ct2_tokens(src: Tensor, pieces: dict[int, str]) -> list[list[str]]:
    return [[pieces[int(i)] for i in row if int(i) != PAD] for row in src]
