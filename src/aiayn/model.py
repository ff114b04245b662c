"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3.

The classes follow the paper's order:

    scaled_dot_product_attention  §3.2.1   softmax(Q Kᵀ / √d_k) V
    MultiHeadAttention            §3.2.2   h heads, d_k = d_v = d_model / h, output projection W^O
    PositionwiseFeedForward       §3.3     Linear(d_model→d_ff), ReLU, Linear(d_ff→d_model)
    Embeddings                    §3.4     token embedding × √d_model (+ §3.5 positions), dropout
    SinusoidalPositionalEncoding  §3.5     PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),
                                           PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))
    EncoderLayer / Encoder        §3.1     self-attention, then FFN
    DecoderLayer / Decoder        §3.1     masked self-attention, encoder-decoder attention, FFN
    Transformer                            the two stacks and the (tied) pre-softmax projection

Residual sublayers are post-LN by default, as the paper writes them (§3.1, §5.4):

    x = LayerNorm(x + Dropout(Sublayer(x)))

With ``norm_first=True`` they are pre-LN instead, ``x = x + Dropout(Sublayer(LayerNorm(x)))``,
and each stack ends with one more LayerNorm (the pre-LN form of Xiong et al., 2020).

Masks are boolean and follow ``torch.nn.functional.scaled_dot_product_attention``:
``True`` means "may attend". Padding positions are the tokens equal to ``config.pad_id``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import config as config_io
from .errors import UserError

# The paper's Table 3 rows "base" and "big" (§6.1); every other Table 3 row is an override.
PRESETS: dict[str, dict] = {
    "base": dict(n_encoder_layers=6, n_decoder_layers=6, d_model=512, d_ff=2048, n_heads=8, dropout=0.1),
    "big": dict(n_encoder_layers=6, n_decoder_layers=6, d_model=1024, d_ff=4096, n_heads=16, dropout=0.3),
}


@dataclass
class TransformerConfig:
    """Every architectural choice of the model, in one place.

    Table 3 of the paper varies h (``n_heads``), d_k = d_v (``d_k``), d_ff, N (the layer
    counts), P_drop (``dropout``) and the positional encoding (``positions``); each is a field.
    """

    src_vocab_size: int = 37000
    tgt_vocab_size: int | None = None  # None: the same (shared) vocabulary as the source
    d_model: int = 512
    d_ff: int = 2048
    n_heads: int = 8
    d_k: int | None = None  # per-head size of queries, keys and values; None: d_model // n_heads
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # P_drop: on every sublayer output and on the embedding sums (§5.4)
    attention_dropout: float = 0.0  # on attention probabilities; the paper uses none
    activation_dropout: float = 0.0  # after the FFN's ReLU; the paper uses none
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN + a final LayerNorm
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"  # Table 3 row (E)
    max_positions: int = 1024  # size of the learned table; sinusoids extend beyond it on demand
    # "all": source embedding = target embedding = pre-softmax weights (§3.4, needs one vocabulary);
    # "decoder": target embedding = pre-softmax weights; "none": three separate matrices.
    tie_embeddings: Literal["all", "decoder", "none"] = "all"
    layer_norm_eps: float = 1e-5
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.tgt_vocab_size is None:
            self.tgt_vocab_size = self.src_vocab_size
        if self.d_k is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; set d_k")
            self.d_k = self.d_model // self.n_heads
        if self.tie_embeddings == "all" and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "tie_embeddings='all' needs one shared vocabulary "
                f"(src {self.src_vocab_size} != tgt {self.tgt_vocab_size}); use 'decoder' or 'none'"
            )
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None, **overrides) -> "TransformerConfig":
        """A paper preset by name, with ``vocab_size`` for a shared vocabulary or
        ``src_vocab_size``/``tgt_vocab_size`` for separate ones, plus any field overrides."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        if vocab_size is not None:
            fields.update(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)
        fields.update(overrides)
        if fields.get("tgt_vocab_size", fields.get("src_vocab_size")) != fields.get("src_vocab_size"):
            fields.setdefault("tie_embeddings", "decoder")
        return cls(**fields)

    @classmethod
    def base(cls, vocab_size: int | None = None, **overrides) -> "TransformerConfig":
        """Transformer (base): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1 (65M params in the paper)."""
        return cls.preset("base", vocab_size, **overrides)

    @classmethod
    def big(cls, vocab_size: int | None = None, **overrides) -> "TransformerConfig":
        """Transformer (big): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (213M params in the paper)."""
        return cls.preset("big", vocab_size, **overrides)

    # -- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "TransformerConfig":
        """From a mapping; ``preset: base`` (or big) starts from the paper's numbers."""
        data = dict(data)
        name = data.pop("preset", None)
        if name is not None:
            if name not in PRESETS:
                raise UserError(f"{where}.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
            data = {**PRESETS[name], **data}
        return config_io.from_dict(cls, data, where)

    def to_yaml(self, path: str | Path) -> None:
        config_io.save_yaml(self.to_dict(), path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TransformerConfig":
        data = config_io.load_yaml(path)
        return cls.from_dict(data.get("model", data), where=str(path))


# ---------------------------------------------------------------------------------------------
# §5.4 Residual dropout
# ---------------------------------------------------------------------------------------------


class Dropout(nn.Module):
    """Dropout with rate P_drop (§5.4), in training only: each element is zeroed with
    probability p and the others are scaled by 1/(1-p), so the expected value is unchanged.

    On the CPU the keep-mask is drawn as 16-bit uniform integers, four from each 64-bit draw
    of torch's default generator, instead of torch's per-element Bernoulli draw, which took a
    quarter of a small model's forward pass (measured: 1.7 ms instead of 3.6 ms forward and
    backward for 384k elements). An element is dropped when its integer is among the lowest
    round(p·2¹⁶), so the rate is round(p·65536)/65536: 0.1 becomes 0.100006. Seeding and exact
    resume work as before (same generator). On GPUs torch's own fused kernel runs.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._threshold = -(1 << 15) + round(p * (1 << 16))  # int16 values below it are dropped

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
        bits = draws.view(torch.int16)[:n].view(x.shape)
        keep = bits.ge(self._threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------------------------------
# §3.2.1 Scaled dot-product attention
# ---------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V.

    q: (..., T, d_k), k: (..., S, d_k), v: (..., S, d_v); ``mask`` broadcasts to (..., T, S)
    and is True where a query may attend to a key.

    Two paths compute the same function. The default calls PyTorch's fused kernel, which
    never materialises the T×S probabilities. With ``need_weights=True`` the explicit
    formula runs instead and the probabilities are returned too (for inspection).
    """
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is not None:
        # The most negative finite value rather than -inf: a row with no allowed key then gives
        # a uniform row instead of NaN, and the value cannot overflow in fp16 or bf16.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    attn = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(attn, v), probs


# ---------------------------------------------------------------------------------------------
# §3.2.2 Multi-head attention
# ---------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head projections are stored as one matrix each (the heads side by side). For
    self-attention Q, K and V come from the same input, so one fused (d_model → 3·h·d_k)
    projection computes all three in a single matmul. For encoder-decoder attention Q comes
    from the decoder and K, V from the encoder output: one projection for Q, one fused for K, V.
    """

    def __init__(self, d_model: int, n_heads: int, d_k: int, *, self_attention: bool, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.d_k, self.dropout = n_heads, d_k, dropout
        self.self_attention = self_attention
        inner = n_heads * d_k
        if self_attention:
            self.qkv_proj = nn.Linear(d_model, 3 * inner)
        else:
            self.q_proj = nn.Linear(d_model, inner)
            self.kv_proj = nn.Linear(d_model, 2 * inner)
        self.out_proj = nn.Linear(inner, d_model)  # W^O

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: dict | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, d_model) queries. memory: (B', S, d_model) for encoder-decoder attention.

        ``cache`` (incremental decoding): for self-attention, a `KeyValueBuffer` holding the keys
        and values of earlier positions, to which the new ones are appended; for encoder-decoder
        attention a dict where they are computed from ``memory`` once, on the first call.

        Beam search without copying the encoder output: when B = K·B' (the K hypotheses of
        sentence i in rows i·K ... i·K+K-1), encoder-decoder attention folds the K hypotheses
        into the query-length axis, so each sentence's keys and values serve all its beams.
        """
        b, t, _ = x.shape
        if self.self_attention:
            q, k, v = self._project(self.qkv_proj(x), 3)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            (q,) = self._project(self.q_proj(x), 1)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._project(self.kv_proj(memory), 2)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        groups = b // k.size(0)
        if groups * k.size(0) != b:
            raise ValueError(f"decoder batch {b} is not a multiple of the encoder batch {k.size(0)}")
        if groups > 1:  # K beams per sentence share that sentence's encoder keys and values
            q = q.reshape(k.size(0), groups, self.n_heads, t, self.d_k).transpose(1, 2)
            q = q.reshape(k.size(0), self.n_heads, groups * t, self.d_k)
        out, probs = scaled_dot_product_attention(
            q, k, v, mask, dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights
        )
        if groups > 1:
            out = out.view(k.size(0), self.n_heads, groups, t, self.d_k).transpose(1, 2)
            out = out.reshape(b, self.n_heads, t, self.d_k)
            if probs is not None:
                probs = probs.view(k.size(0), self.n_heads, groups, t, -1).transpose(1, 2)
                probs = probs.reshape(b, self.n_heads, t, -1)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.d_k)
        return self.out_proj(out), probs

    def _project(self, x: Tensor, n: int) -> tuple[Tensor, ...]:
        """(B, L, n·h·d_k) -> n × (B, h, L, d_k). The fused weight stacks the Q, K, V blocks
        (each h·d_k rows, head i at rows i·d_k ...), the layout of torch.nn.MultiheadAttention."""
        b, length, _ = x.shape
        return x.view(b, length, n, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)


# ---------------------------------------------------------------------------------------------
# §3.3 Position-wise feed-forward network
# ---------------------------------------------------------------------------------------------


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, the same at every position."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.w1(x))
        if self.activation_dropout > 0:
            h = F.dropout(h, self.activation_dropout, self.training)
        return self.w2(h)


# ---------------------------------------------------------------------------------------------
# §3.4 Embeddings and §3.5 positional encoding
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(length: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)); PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    The paper's interleaved layout: sines on even dimensions, cosines on odd ones (some
    toolkits concatenate all sines and then all cosines instead; that is a different model).
    """
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, two_i / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed encodings of §3.5, grown on demand for longer inputs. Not a parameter and
    not saved with the weights: it is a function of the position."""

    def __init__(self, d_model: int, initial_length: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoidal_table(initial_length, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        if offset + length > self.table.size(0):
            self.table = sinusoidal_table(2 * (offset + length), self.d_model).to(self.table.device)
        return self.table[offset : offset + length]


class LearnedPositionalEmbedding(nn.Module):
    """Table 3 row (E): learned positions instead of sinusoids (the paper found nearly identical results)."""

    def __init__(self, d_model: int, max_positions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        if offset + length > self.weight.size(0):
            raise ValueError(f"sequence of {offset + length} positions exceeds max_positions {self.weight.size(0)}")
        return self.weight[offset : offset + length]


class Embeddings(nn.Module):
    """Token embedding multiplied by √d_model (§3.4), plus the positional encoding (§3.5),
    then dropout (§5.4). ``weight`` may be shared with the other embedding and the output layer."""

    def __init__(self, token: nn.Embedding, positions: nn.Module, dropout: float):
        super().__init__()
        self.token = token
        self.positions = positions
        self.scale = math.sqrt(token.embedding_dim)
        self.dropout = Dropout(dropout)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.token(ids) * self.scale + self.positions(ids.size(1), offset)
        return self.dropout(x)


# ---------------------------------------------------------------------------------------------
# §3.1 Encoder and decoder stacks
# ---------------------------------------------------------------------------------------------


class SublayerConnection(nn.Module):
    """The residual connection around each sublayer, with its LayerNorm.

    post-LN (paper): LayerNorm(x + Dropout(Sublayer(x)));  pre-LN: x + Dropout(Sublayer(LayerNorm(x))).
    """

    def __init__(self, d_model: int, dropout: float, norm_first: bool, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> tuple[Tensor, Tensor | None]:
        out, weights = sublayer(self.norm(x) if self.norm_first else x)
        y = x + self.dropout(out)
        return (y if self.norm_first else self.norm(y)), weights


class EncoderLayer(nn.Module):
    """Multi-head self-attention, then the position-wise FFN, each in a residual sublayer."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=True, dropout=cfg.attention_dropout)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first, cfg.layer_norm_eps) for _ in range(2)
        )

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        x, weights = self.sublayers[0](x, lambda h: self.self_attn(h, mask=mask, need_weights=need_weights))
        x, _ = self.sublayers[1](x, lambda h: (self.ffn(h), None))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, then the FFN (§3.1)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=True, dropout=cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=False, dropout=cfg.attention_dropout)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first, cfg.layer_norm_eps) for _ in range(3)
        )

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor | None,
        memory_mask: Tensor | None,
        cache: dict | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        self_cache = cache["self"] if cache is not None else None
        cross_cache = cache["cross"] if cache is not None else None
        x, self_w = self.sublayers[0](
            x, lambda h: self.self_attn(h, mask=self_mask, cache=self_cache, need_weights=need_weights)
        )
        x, cross_w = self.sublayers[1](
            x, lambda h: self.cross_attn(h, memory, mask=memory_mask, cache=cross_cache, need_weights=need_weights)
        )
        x, _ = self.sublayers[2](x, lambda h: (self.ffn(h), None))
        return x, self_w, cross_w


SPLIT_REORDER = 262_144  # elements per key (or value) tensor from which a reorder is split across threads


class KeyValueBuffer:
    """One self-attention layer's keys and values of the positions decoded so far.

    Preallocated and written in place: appending a step copies only the new position, where
    ``torch.cat`` would copy the whole history every step. The layout is (L, N, h, d_k), time
    first, so the first ``length`` positions are one contiguous block: reordering the rows
    (beams) writes into a second block with ``index_select(out=...)``, without allocating, and
    attention reads a permuted view (N, h, length, d_k) whose innermost axis is contiguous, as
    the fused attention kernels want. Capacity doubles when full (amortised: each position is
    copied O(1) times), so memory stays within 2x of what the positions need.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = max(1, capacity)
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._spare: tuple[Tensor, Tensor] | None = None  # the other block, for reordering

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``t`` new positions (k, v: (N, h, t, d_k)); returns all keys and values so far,
        (N, h, length, d_k) views."""
        n, h, t, d = k.shape
        end = self.length + t
        if self.k is None or end > self.k.size(0) or self.k.size(1) != n:
            self._resize(max(end, 2 * self.k.size(0) if self.k is not None else self.capacity), n, h, d, k)
        self.k[self.length : end].copy_(k.permute(2, 0, 1, 3))
        self.v[self.length : end].copy_(v.permute(2, 0, 1, 3))
        self.length = end
        return self.k[:end].permute(1, 2, 0, 3), self.v[:end].permute(1, 2, 0, 3)

    def _resize(self, capacity: int, n: int, h: int, d: int, like: Tensor) -> None:
        k = like.new_empty(capacity, n, h, d)
        v = like.new_empty(capacity, n, h, d)
        if self.k is not None:
            k[: self.length].copy_(self.k[: self.length])
            v[: self.length].copy_(self.v[: self.length])
        self.k, self.v, self._spare = k, v, None

    def reorder(self, index: Tensor) -> None:
        """Rows ``index`` of the current rows (beams after a search step, or fewer rows)."""
        if self.k is None:
            return
        length, n = self.length, index.numel()
        if self.k.requires_grad:  # autograd cannot record out=: the plain (allocating) form
            self.k, self.v, self._spare = self.k.index_select(1, index), self.v.index_select(1, index), None
            return
        cap, _, h, d = self.k.shape
        if self._spare is None or self._spare[0].size(1) != n:
            self._spare = (self.k.new_empty(cap, n, h, d), self.v.new_empty(cap, n, h, d))
        k, v = self._spare
        # Large reorders copy rows of the (N, L, h, d) views instead: index_select along dim 1
        # runs on one thread, along dim 0 torch splits it across threads. Measured on 2 threads
        # (Xeon, AVX-512): 25 positions × 256 beams of the base model 1.0 -> 0.6 ms per tensor,
        # and beam-4 search at batch 64 1.15x as fast (fp32; int8 1.16x); below ~200k elements
        # the split costs more than it saves, and on 1 thread it is 10% slower.
        split = length * n * h * d >= SPLIT_REORDER and torch.get_num_threads() > 1
        for old, new in ((self.k, k), (self.v, v)):
            if split:
                torch.index_select(old[:length].transpose(0, 1), 0, index, out=new[:length].transpose(0, 1))
            else:
                torch.index_select(old[:length], 1, index, out=new[:length])
        # The old block becomes the spare only if it has the new row count.
        self._spare = (self.k, self.v) if self.k.size(1) == n else None
        self.k, self.v = k, v


class DecoderCache:
    """Keys and values kept between the steps of incremental decoding.

    Self-attention entries (`KeyValueBuffer`) grow by one position per step and follow the
    hypotheses (rows) of the decoder batch. Encoder-decoder entries are computed once and follow
    the sentences. ``capacity``: the number of target positions expected (the buffers grow
    beyond it if needed).
    """

    def __init__(self, n_layers: int, capacity: int = 16):
        self.layers = [{"self": KeyValueBuffer(capacity), "cross": {}} for _ in range(n_layers)]
        self.offset = 0  # number of target positions already decoded

    def reorder(self, index: Tensor) -> None:
        """Reorder (or select) decoder rows, e.g. beams after a beam-search step."""
        for layer in self.layers:
            layer["self"].reorder(index)

    def select_sentences(self, index: Tensor) -> None:
        """Keep only these sentences' encoder-decoder keys and values (finished ones leave)."""
        for layer in self.layers:
            for key in ("k", "v"):
                if key in layer["cross"]:
                    layer["cross"][key] = layer["cross"][key].index_select(0, index)


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        # pre-LN leaves the residual stream un-normalised, so the stack ends with a LayerNorm.
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool = False) -> tuple[Tensor, list]:
        weights = []
        for layer in self.layers:
            x, w = layer(x, mask, need_weights)
            weights.append(w)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, weights


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, x, memory, self_mask, memory_mask, cache: DecoderCache | None = None, need_weights=False):
        self_ws, cross_ws = [], []
        for i, layer in enumerate(self.layers):
            x, sw, cw = layer(x, memory, self_mask, memory_mask, cache.layers[i] if cache else None, need_weights)
            self_ws.append(sw)
            cross_ws.append(cw)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, self_ws, cross_ws


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Encoder-decoder Transformer. ``model(src, tgt_in)`` -> logits (B, T, tgt_vocab).

    src: (B, S) source ids; tgt_in: (B, T) decoder inputs (BOS + target shifted right).
    Positions equal to ``config.pad_id`` are padding: keys there are masked out. The
    pre-softmax projection is the target embedding matrix when tied (§3.4), without a bias.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        src_tok = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=None)
        tgt_tok = src_tok if cfg.tie_embeddings == "all" else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.src_embed = Embeddings(src_tok, self._positions(cfg), cfg.dropout)
        self.tgt_embed = Embeddings(tgt_tok, self._positions(cfg), cfg.dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings in ("all", "decoder"):
            self.generator.weight = tgt_tok.weight

    @staticmethod
    def _positions(cfg: TransformerConfig) -> nn.Module:
        if cfg.positions == "learned":
            return LearnedPositionalEmbedding(cfg.d_model, cfg.max_positions)
        return SinusoidalPositionalEncoding(cfg.d_model, cfg.max_positions)

    def _init_weights(self) -> None:
        # The paper does not give its initialisation. Linear layers: Xavier-uniform weights and
        # zero biases (as tensor2tensor). Embeddings: N(0, d_model^-0.5), so that after the
        # ×√d_model scaling the token vectors have unit variance, like the sinusoids.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.d_model**-0.5)

    # -- masks --------------------------------------------------------------------------------
    def source_mask(self, src: Tensor) -> Tensor:
        """(B, S) bool, True at real (non-pad) source tokens."""
        return src.ne(self.config.pad_id)

    @staticmethod
    def _key_mask(mask: Tensor) -> Tensor:  # (B, S) -> (B, 1, 1, S), broadcast over heads and queries
        return mask[:, None, None, :]

    @staticmethod
    def causal_mask(t: int, offset: int = 0, device=None) -> Tensor:
        """(T, offset+T) bool: query i (absolute position offset+i) sees keys 0 .. offset+i."""
        return torch.ones(t, offset + t, dtype=torch.bool, device=device).tril(diagonal=offset)

    # -- the two halves -----------------------------------------------------------------------
    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Source ids (B, S) -> encoder output ("memory") (B, S, d_model)."""
        if src_mask is None:
            src_mask = self.source_mask(src)
        memory, _ = self.encoder(self.src_embed(src), self._key_mask(src_mask))
        return memory

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        cache: DecoderCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Decoder inputs (B, T) -> logits (B, T, V), or (B, 1, V) with ``last_only``.

        ``memory_mask`` is the (B', S) source mask (True = real token). With a ``cache`` only
        the new positions are passed (usually one), and B may be K·B' (K beams per sentence).
        """
        x = self.decode_states(tgt_in, memory, memory_mask, cache)
        if last_only:
            x = x[:, -1:]
        return self.generator(x)

    def decode_states(
        self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor, cache: DecoderCache | None = None
    ) -> Tensor:
        """The decoder's output (B, T, d_model) before the pre-softmax projection.

        A target padding mask is not needed: padding comes after the real tokens, and the
        causal mask already keeps every real position from seeing anything later.
        """
        offset = cache.offset if cache is not None else 0
        t = tgt_in.size(1)
        if t == 1 and cache is not None and not self.training:
            return self._decode_step(tgt_in, memory, memory_mask, cache)
        # One new position attends to every cached one: no mask, the fastest kernel.
        self_mask = None if t == 1 else self.causal_mask(t, offset, tgt_in.device)
        x = self.tgt_embed(tgt_in, offset)
        x, _, _ = self.decoder(x, memory, self_mask, self._key_mask(memory_mask), cache)
        if cache is not None:
            cache.offset += t
        return x

    def _decode_step(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor, cache: DecoderCache) -> Tensor:
        """`decode_states` for one new position with a cache, in eval mode: the decoder stack
        of §3.1 (the same sublayers, norms and attention as `DecoderLayer`) written out flat.

        Why a second form: a search calls this once per output token, and at batch 1 a
        decoder step is small work, so Python's per-call overhead (the sublayer closures, the
        general paths of `MultiHeadAttention`, eval-mode dropout calls) was a quarter of
        everything but the matrix products (measured, base model, one thread: 38 ms → 29 ms
        per sentence). The linear layers and the FFN are still called as modules, so packed
        and int8 models take this path too. Tests pin it to the module path
        (tests/test_model.py: cached decoding equals full recomputation, post- and pre-LN).
        """
        b = tgt_in.size(0)
        pre = self.config.norm_first
        key_mask = self._key_mask(memory_mask)
        x = self.tgt_embed(tgt_in, cache.offset)
        for layer, entry in zip(self.decoder.layers, cache.layers):
            self_attn, cross_attn = layer.self_attn, layer.cross_attn
            norm0, norm1, norm2 = (sub.norm for sub in layer.sublayers)
            # Masked self-attention: the new position sees every cached one, so no mask.
            h = norm0(x) if pre else x
            q, k, v = self_attn._project(self_attn.qkv_proj(h), 3)
            k, v = entry["self"].append(k, v)
            out = F.scaled_dot_product_attention(q, k, v)
            x = x + self_attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
            if not pre:
                x = norm0(x)
            # Encoder-decoder attention: keys and values computed once; the K beams of a
            # sentence are folded into its query axis (see `MultiHeadAttention.forward`).
            h = norm1(x) if pre else x
            kv = entry["cross"]
            if "k" not in kv:
                kv["k"], kv["v"] = cross_attn._project(cross_attn.kv_proj(memory), 2)
            sentences = kv["k"].size(0)
            if b % sentences:
                raise ValueError(f"decoder batch {b} is not a multiple of the encoder batch {sentences}")
            q = cross_attn.q_proj(h).view(sentences, b // sentences, cross_attn.n_heads, cross_attn.d_k).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, kv["k"], kv["v"], attn_mask=key_mask)
            x = x + cross_attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
            if not pre:
                x = norm1(x)
            # Position-wise FFN.
            x = x + layer.ffn(norm2(x) if pre else x)
            if not pre:
                x = norm2(x)
        if self.decoder.final_norm is not None:
            x = self.decoder.final_norm(x)
        cache.offset += 1
        return x

    def new_cache(self, capacity: int = 16) -> DecoderCache:
        """An empty cache for incremental decoding; ``capacity``: target positions expected."""
        return DecoderCache(len(self.decoder.layers), capacity)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.generator(self.states(src, tgt_in))

    def states(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced decoder output (B, T, d_model): ``forward`` without the projection.
        Training projects only the real target positions (`aiayn.train.loss`)."""
        src_mask = self.source_mask(src)
        return self.decode_states(tgt_in, self.encode(src, src_mask), src_mask)

    # -- inspection ---------------------------------------------------------------------------
    @torch.no_grad()
    def attention_weights(self, src: Tensor, tgt_in: Tensor) -> dict[str, list[Tensor]]:
        """Attention probabilities of every layer and head, via the explicit attention path.

        Returns {"encoder": [(B, h, S, S)] * N, "decoder": [(B, h, T, T)] * N,
        "cross": [(B, h, T, S)] * N}; masked positions get probability 0.
        """
        src_mask = self.source_mask(src)
        memory, enc_w = self.encoder(self.src_embed(src), self._key_mask(src_mask), need_weights=True)
        t = tgt_in.size(1)
        _, dec_w, cross_w = self.decoder(
            self.tgt_embed(tgt_in), memory, self.causal_mask(t, 0, src.device), self._key_mask(src_mask), need_weights=True
        )
        return {"encoder": enc_w, "decoder": dec_w, "cross": cross_w}

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())
