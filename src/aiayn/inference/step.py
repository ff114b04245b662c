"""One step of incremental decoding: the decoder stack of §3.1 for one new position, with a cache.

`decode_step` computes exactly what ``Transformer.decode`` computes for the last position of a
prefix (tests/test_inference.py pins the two together, post- and pre-LN, sinusoidal and
learned positions), but reads the earlier positions' keys and values from a `DecoderCache`
instead of recomputing them. It is written out flat, over the model's own sublayers, norms and
projections, because a search calls it once per output token and at small batches the
per-call Python of the general module path (the sublayer closures, the masks, eval-mode dropout
calls) costs as much as the arithmetic. The linear layers and the FFN are still called as
modules, so prepacked, bf16 and int8 models (`aiayn.inference.packed`) take this path too, and
attention goes through the model's own function, fused kernel or explicit formula as each
attention module says (``fused_kernel``), with or without the 1/√d_k as it says (``scaled``).

Beams without copying the encoder output: the decoder batch may hold K rows per sentence (the
K hypotheses of sentence i in rows i·K ... i·K+K-1) against one row of encoder output per
sentence. Encoder-decoder attention then folds the K hypotheses into the query axis, so each
sentence's keys and values serve all its beams.
"""

from __future__ import annotations

from torch import Tensor

from ..model import Transformer, scaled_dot_product_attention
from .cache import DecoderCache


def new_cache(model: Transformer, capacity: int = 16) -> DecoderCache:
    """An empty cache for ``model``'s decoder; ``capacity``: target positions expected."""
    return DecoderCache(len(model.decoder.layers), capacity)


def decode_step(model: Transformer, tokens: Tensor, memory: Tensor, memory_mask: Tensor, cache: DecoderCache) -> Tensor:
    """The decoder's output (N, 1, d_model) for ``tokens`` (N, 1), the newest position of each row.

    ``memory``: (B, S, d_model) encoder output and ``memory_mask``: (B, S) source mask, one row
    per sentence, with N a multiple of B. The model must be in eval mode (no dropout here).
    """
    b = tokens.size(0)
    pre = model.config.norm_first
    key_mask = memory_mask[:, None, None, :]
    x = model.tgt_embed(tokens, cache.offset)
    for layer, entry in zip(model.decoder.layers, cache.layers):
        self_attn, cross_attn = layer.self_attn, layer.cross_attn
        norm0, norm1, norm2 = (sub.norm for sub in layer.sublayers)
        # Masked self-attention: the new position sees every cached one, so no mask.
        h = norm0(x) if pre else x
        q, k, v = self_attn._project(self_attn.qkv_proj(h), 3)
        k, v = entry["self"].append(k, v)
        out, _ = scaled_dot_product_attention(q, k, v, fused_kernel=self_attn.fused_kernel, scaled=self_attn.scaled)
        x = x + self_attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
        if not pre:
            x = norm0(x)
        # Encoder-decoder attention: keys and values computed once, on the first step.
        h = norm1(x) if pre else x
        kv = entry["cross"]
        if "k" not in kv:
            kv["k"], kv["v"] = cross_attn._project(cross_attn.kv_proj(memory), 2)
        sentences = kv["k"].size(0)
        if b % sentences:
            raise ValueError(f"decoder batch {b} is not a multiple of the encoder batch {sentences}")
        q = cross_attn.q_proj(h).view(sentences, b // sentences, cross_attn.n_heads, cross_attn.d_k).transpose(1, 2)
        out, _ = scaled_dot_product_attention(q, kv["k"], kv["v"], key_mask, fused_kernel=cross_attn.fused_kernel,
                                              scaled=cross_attn.scaled)
        x = x + cross_attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
        if not pre:
            x = norm1(x)
        # Position-wise FFN.
        x = x + layer.ffn(norm2(x) if pre else x)
        if not pre:
            x = norm2(x)
    if model.decoder.final_norm is not None:
        x = model.decoder.final_norm(x)
    cache.offset += 1
    return x
