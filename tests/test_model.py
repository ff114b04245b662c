"""Tests that pin the model's math to the paper and to torch.nn's reference modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aiayn import Transformer, TransformerConfig
from aiayn import config as config_io
from aiayn.errors import UserError
from aiayn.model import (
    DecoderLayer,
    EncoderLayer,
    MultiHeadAttention,
    scaled_dot_product_attention,
    sinusoidal_table,
)

from helpers import PAD, random_ids, small_config, small_model

# --------------------------------------------------------------------------------------------
# §3.2.1 scaled dot-product attention
# --------------------------------------------------------------------------------------------


def test_attention_equals_formula_by_hand():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query may see at least one key
    expected = torch.zeros(2, 3, 5, 6)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(8) for j in range(7)]
                allowed = [j for j in range(7) if mask[b, 0, i, j]]
                z = sum(math.exp(scores[j]) for j in allowed)
                for j in allowed:
                    expected[b, h, i] += math.exp(scores[j]) / z * v[b, h, j]
    fused, none = scaled_dot_product_attention(q, k, v, mask)
    explicit, probs = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    assert none is None
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    assert torch.all(probs.masked_select(~mask.expand_as(probs)) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))


def test_explicit_mask_value_is_finite_in_half_precision():
    """finfo.min rather than -inf: no overflow in fp16, and a fully masked row gives no NaN."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float16) * 30 for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1:, :2] = True  # query 0 may attend to nothing
    out, probs = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert torch.all(probs[..., 1:, 2:] == 0)


# --------------------------------------------------------------------------------------------
# §3.2.2 multi-head attention vs torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


def copy_self_attention(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ours.qkv_proj.weight.copy_(ref.in_proj_weight)
        ours.qkv_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def copy_cross_attention(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    d = ref.embed_dim
    with torch.no_grad():
        ours.q_proj.weight.copy_(ref.in_proj_weight[:d])
        ours.q_proj.bias.copy_(ref.in_proj_bias[:d])
        ours.kv_proj.weight.copy_(ref.in_proj_weight[d:])
        ours.kv_proj.bias.copy_(ref.in_proj_bias[d:])
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def test_multi_head_self_attention_equals_torch_reference():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(32, 4, 8, self_attention=True).eval()
    copy_self_attention(ours, ref)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True  # torch: True = ignore
    expected, expected_w = ref(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    mask = (~pad)[:, None, None, :]
    got, _ = ours(x, mask=mask)
    got_explicit, weights = ours(x, mask=mask, need_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_explicit, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_w, atol=1e-5, rtol=1e-5)


def test_multi_head_cross_attention_equals_torch_reference():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(32, 4, 8, self_attention=False).eval()
    copy_cross_attention(ours, ref)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    expected, _ = ref(x, memory, memory)
    got, _ = ours(x, memory)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_equals_torch_reference(norm_first):
    torch.manual_seed(0)
    cfg = small_config(norm_first=norm_first)
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="relu", batch_first=True, norm_first=norm_first).eval()
    ours = EncoderLayer(cfg).eval()
    copy_self_attention(ours.self_attn, ref.self_attn)
    ours.ffn.w1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.w2.load_state_dict(ref.linear2.state_dict())
    ours.sublayers[0].norm.load_state_dict(ref.norm1.state_dict())
    ours.sublayers[1].norm.load_state_dict(ref.norm2.state_dict())
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    expected = ref(x, src_key_padding_mask=pad)
    got, _ = ours(x, (~pad)[:, None, None, :])
    real = ~pad  # torch's fast path may zero padded rows; compare the real positions
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_torch_reference(norm_first):
    torch.manual_seed(0)
    cfg = small_config(norm_first=norm_first)
    ref = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, activation="relu", batch_first=True, norm_first=norm_first).eval()
    ours = DecoderLayer(cfg).eval()
    copy_self_attention(ours.self_attn, ref.self_attn)
    copy_cross_attention(ours.cross_attn, ref.multihead_attn)
    ours.ffn.w1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.w2.load_state_dict(ref.linear2.state_dict())
    for i, norm in enumerate([ref.norm1, ref.norm2, ref.norm3]):
        ours.sublayers[i].norm.load_state_dict(norm.state_dict())
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 8, 32)
    mem_pad = torch.zeros(2, 8, dtype=torch.bool)
    mem_pad[1, 6:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=mem_pad)
    got, _, _ = ours(x, memory, Transformer.causal_mask(6), (~mem_pad)[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Whole-model invariances
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True])
def test_causality(norm_first):
    model = small_model(norm_first=norm_first)
    src, tgt = random_ids(2, 7), random_ids(2, 6, seed=2)
    logits = model(src, tgt)
    for t in range(6):
        changed = tgt.clone()
        changed[:, t + 1 :] = random_ids(2, 6 - t - 1, seed=10 + t) if t < 5 else changed[:, t + 1 :]
        torch.testing.assert_close(model(src, changed)[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
    # and the future does matter: the test above is not vacuous
    changed = tgt.clone()
    changed[:, 1] = (tgt[:, 1] + 1 - 4) % 36 + 4
    assert not torch.allclose(model(src, changed)[:, 1:], logits[:, 1:])


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_invariance(norm_first):
    model = small_model(norm_first=norm_first)
    src, tgt = random_ids(2, 7), random_ids(2, 5, seed=2)
    logits = model(src, tgt)
    padded_src = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((2, 3), PAD)], dim=1)
    torch.testing.assert_close(model(padded_src, tgt), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(src, padded_tgt)[:, :5], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(padded_src, padded_tgt)[:, :5], logits, atol=1e-5, rtol=0)
    # a batch with rows of different lengths: each row equals that row alone
    short = src[1:, :4]
    batch = torch.stack([src[0], torch.cat([short[0], torch.full((3,), PAD)])])
    torch.testing.assert_close(model(batch, tgt)[1], model(short, tgt[1:])[0], atol=1e-5, rtol=0)


def test_attention_weights_match_the_fused_forward():
    model = small_model()
    src, tgt = random_ids(2, 7), random_ids(2, 5, seed=2)
    src[0, 5:] = PAD
    maps = model.attention_weights(src, tgt)
    assert [w.shape for w in maps["encoder"]] == [(2, 4, 7, 7)] * 2
    assert [w.shape for w in maps["decoder"]] == [(2, 4, 5, 5)] * 2
    assert [w.shape for w in maps["cross"]] == [(2, 4, 5, 7)] * 2
    for w in maps["encoder"] + maps["cross"]:
        assert torch.all(w[0, :, :, 5:] == 0)  # no attention to padding
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    for w in maps["decoder"]:
        assert torch.all(w.triu(diagonal=1) == 0)  # nothing from the future


# --------------------------------------------------------------------------------------------
# §3.4-3.5 embeddings and positions
# --------------------------------------------------------------------------------------------


def test_sinusoidal_encoding_equals_the_formula():
    d = 16
    table = sinusoidal_table(50, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_concatenated_sinusoids_are_the_same_waves_sines_first():
    d = 16
    interleaved, concatenated = sinusoidal_table(40, d), sinusoidal_table(40, d, "concatenated")
    torch.testing.assert_close(concatenated[:, : d // 2], interleaved[:, 0::2], atol=0, rtol=0)
    torch.testing.assert_close(concatenated[:, d // 2:], interleaved[:, 1::2], atol=0, rtol=0)
    model = Transformer(small_config(sinusoid_layout="concatenated"))
    torch.testing.assert_close(model.src_embed.positions(40, 0), sinusoidal_table(40, 32, "concatenated"))
    d_model = model.config.d_model  # grown on demand in the same layout
    torch.testing.assert_close(model.tgt_embed.positions(3, 2000)[0], sinusoidal_table(2001, d_model, "concatenated")[2000])


@pytest.mark.parametrize("activation,reference", [
    ("relu", torch.relu), ("swish", lambda x: x * torch.sigmoid(x)),
    ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))])
def test_feed_forward_activations(activation, reference):
    torch.manual_seed(0)
    model = Transformer(small_config(activation=activation))
    ffn = model.encoder.layers[0].ffn
    x = torch.randn(3, 5, model.config.d_model)
    expected = ffn.w2(reference(ffn.w1(x)))
    torch.testing.assert_close(ffn(x), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        small_config(activation="tanh")


def test_a_logits_bias_is_added_and_never_trained():
    torch.manual_seed(0)
    model = Transformer(small_config(logits_bias=True))
    with torch.no_grad():
        model.generator.bias.normal_()
    src, tgt = random_ids(2, 6), random_ids(2, 4)
    plain = torch.nn.functional.linear(model.states(src, tgt), model.generator.weight)
    torch.testing.assert_close(model(src, tgt), plain + model.generator.bias)
    assert not model.generator.bias.requires_grad
    assert Transformer(small_config()).generator.bias is None  # the paper's: no bias


def test_embeddings_scaled_by_sqrt_d_model_plus_positions():
    model = small_model()
    ids = random_ids(1, 5)
    got = model.src_embed(ids)
    expected = model.src_embed.token.weight[ids] * math.sqrt(32) + sinusoidal_table(5, 32)
    torch.testing.assert_close(got, expected)
    # positions beyond the initial table are computed on demand
    long = random_ids(1, 1100)
    assert model.src_embed(long).shape == (1, 1100, 32)


def test_word_dropout_drops_whole_token_vectors_in_training_only():
    model = small_model(source_word_dropout=0.25)
    assert model.src_embed.word_dropout == 0.25 and model.tgt_embed.word_dropout == 0.0
    embed = model.src_embed
    embed.dropout.p = 0.0  # residual dropout off: only the word dropout acts
    ids = random_ids(64, 50)
    words = embed.token.weight[ids] * math.sqrt(32)
    positions = sinusoidal_table(50, 32)
    embed.eval()
    torch.testing.assert_close(embed(ids), words + positions)  # eval: the identity
    embed.train()
    torch.manual_seed(0)
    got = embed(ids) - positions  # positions are always added
    dropped = got.abs().amax(-1) == 0
    kept = ~dropped
    torch.testing.assert_close(got[kept], words[kept] / 0.75)  # the rest scaled by 1/(1-w)
    rate = dropped.float().mean().item()
    assert 0.2 < rate < 0.3, rate  # 3,200 tokens: 0.25 ± 6 standard deviations
    # the target side has its own rate; at 0 training mode drops no word
    target = model.tgt_embed
    target.dropout.p = 0.0
    target.train()
    torch.testing.assert_close(target(ids), words + positions)
    with pytest.raises(ValueError, match="target_word_dropout"):
        small_config(target_word_dropout=1.0)


def test_weight_tying_options():
    all_tied = small_model()
    assert all_tied.src_embed.token.weight is all_tied.tgt_embed.token.weight is all_tied.generator.weight
    dec = small_model(tie_embeddings="decoder", tgt_vocab_size=30)
    assert dec.tgt_embed.token.weight is dec.generator.weight
    assert dec.src_embed.token.weight is not dec.tgt_embed.token.weight
    assert dec(random_ids(1, 3), random_ids(1, 2, vocab=30)).shape == (1, 2, 30)
    none = small_model(tie_embeddings="none")
    assert len({id(none.src_embed.token.weight), id(none.tgt_embed.token.weight), id(none.generator.weight)}) == 3
    assert none.num_parameters() == all_tied.num_parameters() + 2 * 40 * 32
    with pytest.raises(ValueError):
        small_config(tgt_vocab_size=30)  # 'all' needs one vocabulary


# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------


def test_paper_parameter_counts():
    """Shared 37k vocabulary: the paper reports 65M (base) and 213M (big)."""
    with torch.device("meta"):  # no memory or init time: only the shapes matter
        base = Transformer(TransformerConfig.base(vocab_size=37000))
        big = Transformer(TransformerConfig.big(vocab_size=37000))
    assert base.num_parameters() == 63_082_496
    assert big.num_parameters() == 214_245_376


def test_presets_carry_the_paper_numbers():
    base, big = TransformerConfig.base(vocab_size=100), TransformerConfig.big(vocab_size=100)
    assert (base.n_encoder_layers, base.d_model, base.d_ff, base.n_heads, base.d_k, base.dropout) == (6, 512, 2048, 8, 64, 0.1)
    assert (big.n_decoder_layers, big.d_model, big.d_ff, big.n_heads, big.d_k, big.dropout) == (6, 1024, 4096, 16, 64, 0.3)
    assert not base.norm_first and base.positions == "sinusoidal" and base.tie_embeddings == "all"
    separate = TransformerConfig.base(src_vocab_size=100, tgt_vocab_size=120)
    assert separate.tie_embeddings == "decoder"
    # Table 3 row (A): h=16 with d_k=32 keeps the computation constant; row (B): d_k=16
    row_a = TransformerConfig.base(vocab_size=100, n_heads=16)
    assert row_a.d_k == 32
    with torch.device("meta"):
        row_b = Transformer(TransformerConfig.base(vocab_size=100, d_k=16))
    assert row_b.encoder.layers[0].self_attn.qkv_proj.weight.shape == (3 * 8 * 16, 512)


def test_pre_ln_adds_a_final_norm_per_stack():
    post, pre = small_model(), small_model(norm_first=True)
    assert post.encoder.final_norm is None and post.decoder.final_norm is None
    assert isinstance(pre.encoder.final_norm, nn.LayerNorm) and isinstance(pre.decoder.final_norm, nn.LayerNorm)


def from_yaml(path) -> TransformerConfig:
    """A config file's ``model:`` section, as a checkpoint's config.yaml is read."""
    return TransformerConfig.from_dict(config_io.load_yaml(path)["model"], where=str(path))


def test_yaml_round_trip_and_errors(tmp_path):
    cfg = TransformerConfig.big(vocab_size=1234, norm_first=True, positions="learned")
    config_io.save_yaml({"model": cfg.to_dict()}, tmp_path / "model.yaml")
    assert from_yaml(tmp_path / "model.yaml") == cfg
    (tmp_path / "preset.yaml").write_text("model:\n  preset: base\n  src_vocab_size: 99\n  dropout: 0.2\n")
    loaded = from_yaml(tmp_path / "preset.yaml")
    assert loaded == TransformerConfig.base(vocab_size=99, dropout=0.2)
    (tmp_path / "typo.yaml").write_text("model:\n  d_modle: 256\n")
    with pytest.raises(UserError, match="d_modle"):
        from_yaml(tmp_path / "typo.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+"):
        from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "type.yaml").write_text("model:\n  n_heads: lots\n")
    with pytest.raises(UserError, match="n_heads"):
        from_yaml(tmp_path / "type.yaml")
