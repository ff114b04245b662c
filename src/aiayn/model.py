"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3.

The classes follow the paper's order:

    TransformerConfig             §3, §6.2 every architectural choice; presets "base" and "big" (Table 3)
    scaled_dot_product_attention  §3.2.1   softmax(Q Kᵀ / √d_k) V
    MultiHeadAttention            §3.2.2   h heads, d_k = d_v = d_model / h, output projection W^O
    PositionwiseFeedForward       §3.3     Linear(d_model→d_ff), ReLU, Linear(d_ff→d_model)
    sinusoidal_table              §3.5     PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),
                                           PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))
    SinusoidalPositionalEncoding  §3.5     that table, grown on demand
    LearnedPositionalEmbedding    Table 3 (E) learned positions instead
    Embeddings                    §3.4     token embedding × √d_model (+ §3.5 positions), dropout
    SublayerConnection            §3.1, §5.4  LayerNorm(x + Dropout(Sublayer(x))) (or pre-LN)
    EncoderLayer / Encoder        §3.1     self-attention, then FFN
    DecoderLayer / Decoder        §3.1     masked self-attention, encoder-decoder attention, FFN
    Transformer                            the two stacks and the (tied) pre-softmax projection

This module is the paper and nothing else: it imports only torch and aiayn's config machinery.
Incremental decoding with a key/value cache, prepacked and int8 layers and the vocabulary
shortlist live in `aiayn.inference`, pinned to this module by tests (tests/test_inference.py);
the CPU-fast dropout used in training lives in `aiayn.train.dropout`.

Residual sublayers are post-LN by default, as the paper writes them (§3.1, §5.4):

    x = LayerNorm(x + Dropout(Sublayer(x)))

With ``norm_first=True`` they are pre-LN instead, ``x = x + Dropout(Sublayer(LayerNorm(x)))``,
and each stack ends with one more LayerNorm (the pre-LN form of Xiong et al., 2020).

Two deviations exist only for ablations (`aiayn.ablate`, docs/ablation.md), off by default:
``attention_scale=False`` drops the 1/√d_k of §3.2.1 (softmax(Q Kᵀ) V), and ``positions="none"``
adds no positional encoding at all. ``MultiHeadAttention.probe`` lets an ablation observe the
attention logits during training; it is None by default and then costs nothing.

Masks are boolean and follow ``torch.nn.functional.scaled_dot_product_attention``:
``True`` means "may attend". Padding positions are the tokens equal to ``config.pad_id``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import config as config_io

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
    # Word dropout (not in the paper; Sennrich et al. 2016, as Marian's --dropout-src/--dropout-trg):
    # in training, each source / target-input token's whole embedding is dropped (`Embeddings`).
    source_word_dropout: float = 0.0
    target_word_dropout: float = 0.0
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN + a final LayerNorm
    positions: Literal["sinusoidal", "learned", "none"] = "sinusoidal"  # Table 3 row (E); none: an ablation
    max_positions: int = 1024  # size of the learned table; sinusoids extend beyond it on demand
    # "all": source embedding = target embedding = pre-softmax weights (§3.4, needs one vocabulary);
    # "decoder": target embedding = pre-softmax weights; "none": three separate matrices.
    tie_embeddings: Literal["all", "decoder", "none"] = "all"
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    # Deviations from the paper that pretrained models need (`aiayn.pretrained`: OPUS-MT/Marian).
    # The paper's values are the defaults.
    activation: Literal["relu", "gelu", "swish"] = "relu"  # the FFN's; swish = SiLU, x·σ(x)
    logits_bias: bool = False  # a fixed bias on the logits (Marian's final_logits_bias), not trained
    sinusoid_layout: Literal["interleaved", "concatenated"] = "interleaved"  # see `sinusoidal_table`
    # A deviation for ablations (`aiayn.ablate`): False drops §3.2.1's 1/√d_k, softmax(Q Kᵀ) V.
    attention_scale: bool = True

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
        for name in ("dropout", "attention_dropout", "activation_dropout", "source_word_dropout", "target_word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        for name, allowed in (("activation", ACTIVATIONS), ("sinusoid_layout", ("interleaved", "concatenated")),
                              ("positions", ("sinusoidal", "learned", "none")), ("tie_embeddings", ("all", "decoder", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None, **overrides) -> TransformerConfig:
        """A paper preset by name, with ``vocab_size`` for a shared vocabulary or
        ``src_vocab_size``/``tgt_vocab_size`` for separate ones, plus any field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        if vocab_size is not None:
            fields.update(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)
        fields.update(overrides)
        if fields.get("tgt_vocab_size", fields.get("src_vocab_size")) != fields.get("src_vocab_size"):
            fields.setdefault("tie_embeddings", "decoder")
        return cls(**fields)

    @classmethod
    def base(cls, vocab_size: int | None = None, **overrides) -> TransformerConfig:
        """Transformer (base): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1 (65M params in the paper)."""
        return cls.preset("base", vocab_size, **overrides)

    @classmethod
    def big(cls, vocab_size: int | None = None, **overrides) -> TransformerConfig:
        """Transformer (big): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (213M params in the paper)."""
        return cls.preset("big", vocab_size, **overrides)

    # -- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> TransformerConfig:
        """From a mapping; ``preset: base`` (or big) starts from the paper's numbers."""
        data = dict(data)
        name = data.pop("preset", None)
        if name is not None:
            config_io.check_choice(name, PRESETS, f"{where}.preset")
            data = {**PRESETS[name], **data}
        return config_io.from_dict(cls, data, where)


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
    fused_kernel: bool = True,
    scaled: bool = True,
    observe=None,
) -> tuple[Tensor, Tensor | None]:
    """Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V.

    q: (..., T, d_k), k: (..., S, d_k), v: (..., S, d_v); ``mask`` broadcasts to (..., T, S)
    and is True where a query may attend to a key.

    Two paths compute the same function. The default calls PyTorch's fused kernel, which
    never materialises the T×S probabilities. With ``need_weights=True`` or ``fused_kernel=False``
    the explicit formula runs instead, and with ``need_weights`` the probabilities are returned
    too (for inspection). The explicit path takes the softmax in fp32 whatever the inputs'
    dtype (in bf16 the products run in bf16, the normalisation does not lose digits).

    ``scaled=False`` (an ablation, not the paper) computes softmax(Q Kᵀ) V, in both paths.
    ``observe`` (ablations only): a function called with the logits (the softmax's input, before
    masking) and the probabilities; it forces the explicit path.
    """
    if fused_kernel and not need_weights and observe is None:
        scale = None if scaled else 1.0  # None: the kernel's own 1/√d_k
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale), None
    scores = torch.matmul(q, k.transpose(-2, -1))
    if scaled:
        scores = scores / math.sqrt(q.size(-1))
    logits = scores
    if mask is not None:
        # The most negative finite value rather than -inf: a row with no allowed key then gives
        # a uniform row instead of NaN, and the value cannot overflow in fp16 or bf16.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if observe is not None:
        observe(logits, probs)
    attn = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(attn.to(v.dtype), v), probs


# ---------------------------------------------------------------------------------------------
# §3.2.2 Multi-head attention
# ---------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head projections are stored as one matrix each (the heads side by side). For
    self-attention Q, K and V come from the same input, so one fused (d_model → 3·h·d_k)
    projection computes all three in a single matmul. For encoder-decoder attention Q comes
    from the decoder and K, V from the encoder output: one projection for Q, one fused for K, V.

    ``fused_kernel``: attention through PyTorch's fused kernel (True) or the explicit formula (see
    `scaled_dot_product_attention`); the same function. ``scaled=False``: without the 1/√d_k (an
    ablation). ``probe`` (ablations, `aiayn.ablate.AttentionProbe`): while one is set and active,
    training runs the explicit formula and the probe sees the logits and probabilities; None by
    default, which costs nothing.
    """

    fused_kernel: bool = True
    probe = None

    def __init__(self, d_model: int, n_heads: int, d_k: int, *, self_attention: bool, dropout: float = 0.0,
                 scaled: bool = True):
        super().__init__()
        self.n_heads, self.d_k, self.dropout, self.scaled = n_heads, d_k, dropout, scaled
        self.self_attention = self_attention
        inner = n_heads * d_k
        if self_attention:
            self.qkv_proj = nn.Linear(d_model, 3 * inner)
        else:
            self.q_proj = nn.Linear(d_model, inner)
            self.kv_proj = nn.Linear(d_model, 2 * inner)
        self.out_proj = nn.Linear(inner, d_model)  # W^O

    def forward(
        self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, d_model) queries; ``memory``: (B, S, d_model) keys and values for
        encoder-decoder attention (None: self-attention on x). Returns the output and, with
        ``need_weights``, the attention probabilities (B, h, T, S)."""
        b, t, _ = x.shape
        if self.self_attention:
            q, k, v = self._project(self.qkv_proj(x), 3)
        else:
            (q,) = self._project(self.q_proj(x), 1)
            k, v = self._project(self.kv_proj(memory), 2)
        probe = self.probe
        observe = probe.observer(self) if probe is not None and self.training and probe.active else None
        out, probs = scaled_dot_product_attention(
            q, k, v, mask, dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
            fused_kernel=self.fused_kernel, scaled=self.scaled, observe=observe,
        )
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


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}  # gelu: the exact (erf) form


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, the same at every position.

    ``activation`` other than "relu" is a deviation for pretrained models: "swish" (SiLU,
    x·σ(x), as OPUS-MT's Marian models use) or "gelu" (the exact erf form)."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation_dropout = activation_dropout
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](self.w1(x))
        if self.activation_dropout > 0:
            h = F.dropout(h, self.activation_dropout, self.training)
        return self.w2(h)


# ---------------------------------------------------------------------------------------------
# §3.4 Embeddings and §3.5 positional encoding
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(length: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)); PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    ``interleaved``, the paper's layout: sines on even dimensions, cosines on odd ones.
    ``concatenated`` (a deviation, for Marian/OPUS-MT models): the same d_model/2 sines in
    dimensions 0 .. d_model/2 - 1, then their cosines. The positions are added to the embeddings,
    so the two are different models, not a relabelling.
    """
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, two_i / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    if layout == "concatenated":
        half = d_model - d_model // 2  # the sines (one more than the cosines when d_model is odd)
        table[:, :half] = torch.sin(angle)
        table[:, half:] = torch.cos(angle[:, : d_model // 2])
    else:
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed encodings of §3.5, grown on demand for longer inputs. Not a parameter and
    not saved with the weights: it is a function of the position."""

    def __init__(self, d_model: int, initial_length: int = 1024, layout: str = "interleaved"):
        super().__init__()
        self.d_model, self.layout = d_model, layout
        self.register_buffer("table", sinusoidal_table(initial_length, d_model, layout), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        if offset + length > self.table.size(0):
            self.table = sinusoidal_table(2 * (offset + length), self.d_model, self.layout).to(self.table)
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
    then dropout (§5.4). ``weight`` may be shared with the other embedding and the output layer.
    ``positions`` None (``positions: none``, an ablation): no positional encoding at all.

    ``word_dropout`` w (a deviation, 0 in the paper): in training, each token's whole embedding
    vector is zeroed with probability w and the kept ones are scaled by 1/(1-w), before the
    positions are added, so the model sees the position but not the word. At w = 0 and in eval
    mode it is the identity."""

    def __init__(self, token: nn.Embedding, positions: nn.Module | None, dropout: float, word_dropout: float = 0.0):
        super().__init__()
        self.token = token
        self.positions = positions
        self.scale = math.sqrt(token.embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = word_dropout

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.token(ids) * self.scale
        if self.training and self.word_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.word_dropout
            x = x * keep.unsqueeze(-1).to(x.dtype).mul_(1.0 / (1.0 - self.word_dropout))
        if self.positions is not None:
            x = x + self.positions(ids.size(1), offset)
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
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> tuple[Tensor, Tensor | None]:
        out, weights = sublayer(self.norm(x) if self.norm_first else x)
        y = x + self.dropout(out)
        return (y if self.norm_first else self.norm(y)), weights


class EncoderLayer(nn.Module):
    """Multi-head self-attention, then the position-wise FFN, each in a residual sublayer."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=True, dropout=cfg.attention_dropout,
                                            scaled=cfg.attention_scale)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
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
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=True, dropout=cfg.attention_dropout,
                                            scaled=cfg.attention_scale)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, self_attention=False, dropout=cfg.attention_dropout,
                                             scaled=cfg.attention_scale)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
        self.sublayers = nn.ModuleList(
            SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm_first, cfg.layer_norm_eps) for _ in range(3)
        )

    def forward(
        self, x: Tensor, memory: Tensor, self_mask: Tensor | None, memory_mask: Tensor | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, self_w = self.sublayers[0](x, lambda h: self.self_attn(h, mask=self_mask, need_weights=need_weights))
        x, cross_w = self.sublayers[1](x, lambda h: self.cross_attn(h, memory, mask=memory_mask, need_weights=need_weights))
        x, _ = self.sublayers[2](x, lambda h: (self.ffn(h), None))
        return x, self_w, cross_w


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

    def forward(self, x, memory, self_mask, memory_mask, need_weights: bool = False) -> tuple[Tensor, list, list]:
        self_ws, cross_ws = [], []
        for layer in self.layers:
            x, sw, cw = layer(x, memory, self_mask, memory_mask, need_weights)
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
    pre-softmax projection is the target embedding matrix when tied (§3.4), without a bias
    (with ``logits_bias``, a pretrained model's fixed one).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        src_tok = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=None)
        tgt_tok = src_tok if cfg.tie_embeddings == "all" else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.src_embed = Embeddings(src_tok, self._positions(cfg), cfg.dropout, cfg.source_word_dropout)
        self.tgt_embed = Embeddings(tgt_tok, self._positions(cfg), cfg.dropout, cfg.target_word_dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.logits_bias)
        self._init_weights()
        if cfg.tie_embeddings in ("all", "decoder"):
            self.generator.weight = tgt_tok.weight
        if cfg.logits_bias:  # a pretrained model's fixed bias (Marian's final_logits_bias): not trained
            self.generator.bias.requires_grad_(False)

    @staticmethod
    def _positions(cfg: TransformerConfig) -> nn.Module | None:
        if cfg.positions == "none":  # an ablation: the model sees no word order but the causal mask's
            return None
        if cfg.positions == "learned":
            return LearnedPositionalEmbedding(cfg.d_model, cfg.max_positions)
        return SinusoidalPositionalEncoding(cfg.d_model, cfg.max_positions, cfg.sinusoid_layout)

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

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Decoder inputs (B, T) -> the decoder's output (B, T, d_model), before the pre-softmax
        projection (`generator`). ``memory_mask`` is the (B, S) source mask (True = real token).

        A target padding mask is not needed: padding comes after the real tokens, and the
        causal mask already keeps every real position from seeing anything later.
        """
        t = tgt_in.size(1)
        x = self.tgt_embed(tgt_in)
        x, _, _ = self.decoder(x, memory, self.causal_mask(t, 0, tgt_in.device), self._key_mask(memory_mask))
        return x

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, tgt_vocab)."""
        return self.generator(self.states(src, tgt_in))

    def states(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced decoder output (B, T, d_model): ``forward`` without the projection.
        Training projects only the real target positions (`aiayn.train.loss`)."""
        src_mask = self.source_mask(src)
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

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
