"""The model's ablation options (`aiayn.ablate`): attention without 1/√d_k (``attention_scale``),
no positional encoding (``positions: none``), and the opt-in probe of the attention logits; each
honoured by the cached decoder and refused by the Marian export."""

from __future__ import annotations

import math

import pytest
import torch

from aiayn.ablate import AttentionProbe
from aiayn.errors import UserError
from aiayn.export import check_exportable
from aiayn.inference.step import decode_step, new_cache
from aiayn.model import MultiHeadAttention, Transformer, TransformerConfig, scaled_dot_product_attention
from aiayn.precision import use_explicit_attention

from helpers import PAD, random_ids, small_config, small_model


def test_unscaled_attention_equals_the_formula_by_hand():
    """softmax(Q Kᵀ) V without 1/√d_k, in the fused and the explicit path."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    expected = torch.zeros(2, 3, 5, 6)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                scores = [float(q[b, h, i] @ k[b, h, j]) for j in range(7)]
                allowed = [j for j in range(7) if mask[b, 0, i, j]]
                top = max(scores[j] for j in allowed)
                z = sum(math.exp(scores[j] - top) for j in allowed)
                for j in allowed:
                    expected[b, h, i] += math.exp(scores[j] - top) / z * v[b, h, j]
    fused, _ = scaled_dot_product_attention(q, k, v, mask, scaled=False)
    explicit, probs = scaled_dot_product_attention(q, k, v, mask, need_weights=True, scaled=False)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    scaled, _ = scaled_dot_product_attention(q, k, v, mask)
    assert not torch.allclose(scaled, expected, atol=1e-3)  # the scale does change the function


def test_unscaled_model_uses_no_scale_in_every_attention():
    model = small_model(attention_scale=False)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attentions) == 2 + 2 * 2 and not any(a.scaled for a in attentions)
    assert all(a.scaled for a in small_model().modules() if isinstance(a, MultiHeadAttention))
    # The fused path and the explicit path compute the same unscaled model.
    src, tgt = random_ids(3, 7), random_ids(3, 6, seed=2)
    src[1, 4:] = PAD
    fused = model(src, tgt)
    explicit = use_explicit_attention(model)(src, tgt)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    # Same weights with the scale: another function.
    scaled = Transformer(small_config()).eval()
    scaled.load_state_dict(model.state_dict())
    assert not torch.allclose(scaled(src, tgt), fused, atol=1e-3)


def test_positions_none_has_no_positional_module_and_the_same_parameters():
    none, sinusoidal = small_model(positions="none"), small_model()
    assert none.src_embed.positions is None and none.tgt_embed.positions is None
    assert none.num_parameters() == sinusoidal.num_parameters()
    learned = small_model(positions="learned")
    assert learned.num_parameters() == sinusoidal.num_parameters() + 2 * 1024 * 32
    cfg = small_config(positions="none", attention_scale=False)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="positions 'nowhere'"):
        small_config(positions="nowhere")


def test_encoder_without_positions_is_permutation_equivariant():
    """Without positions, self-attention sees a set: permuting the source permutes the encoder's
    output the same way. With sinusoids it does not (the test can fail)."""
    src = random_ids(2, 9)
    perm = torch.tensor([3, 0, 8, 1, 5, 2, 7, 4, 6])
    none = small_model(positions="none")
    with torch.no_grad():
        torch.testing.assert_close(none.encode(src[:, perm]), none.encode(src)[:, perm], atol=1e-5, rtol=0)
        sinusoidal = small_model()
        assert not torch.allclose(sinusoidal.encode(src[:, perm]), sinusoidal.encode(src)[:, perm], atol=1e-3)


@pytest.mark.parametrize("overrides", [dict(attention_scale=False), dict(positions="none"),
                                       dict(attention_scale=False, positions="none", norm_first=True)])
def test_cached_decoding_equals_full_forward_with_the_ablation_options(overrides):
    model = small_model(**overrides)
    src, tgt = random_ids(3, 7), random_ids(3, 6, seed=2)
    src[2, 5:] = PAD
    with torch.no_grad():
        full = model(src, tgt)
        memory, mask = model.encode(src), model.source_mask(src)
        cache = new_cache(model)
        steps = [model.generator(decode_step(model, tgt[:, t: t + 1], memory, mask, cache)) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides,message", [(dict(attention_scale=False), "1/√d_k"),
                                               (dict(positions="none"), "no positional encoding")])
def test_export_refuses_the_ablation_options_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        check_exportable(small_config(**overrides))
    assert "\n" not in str(e.value)
    check_exportable(small_config(positions="learned"))  # still exportable


def test_the_probe_observes_only_when_active_and_changes_nothing(tmp_path):
    """The probe sees logits whose gradient it records, on active updates only; the loss and the
    gradients are those of the unprobed model."""
    model = small_model()
    model.train()
    src, tgt = random_ids(3, 7), random_ids(3, 6, seed=2)
    src[2, 5:] = PAD

    def loss_and_grads():
        model.zero_grad()
        loss = model(src, tgt).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with AttentionProbe(tmp_path / "probe.jsonl", every=2) as probe:
        assert MultiHeadAttention.probe is probe and not probe.active
        loss, grads = loss_and_grads()  # update 1: not observed
        optimizer.step()
        assert not (tmp_path / "probe.jsonl").exists() and probe.active
        loss, grads = loss_and_grads()  # update 2: observed
        optimizer.step()
    assert MultiHeadAttention.probe is None
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=0)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    import json

    records = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    layers = records[0]["layers"]
    assert sorted(layers) == ["cross.0", "cross.1", "dec_self.0", "dec_self.1", "enc_self.0", "enc_self.1"]
    assert all(v["grad_norm"] > 0 and 0 < v["saturation"] <= 1 and v["logit_std"] > 0 for v in layers.values())
    assert sorted(records[0]["mean"]) == ["cross", "dec_self", "enc_self"]
