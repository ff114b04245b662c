"""One update (aiayn.train.step): the loss over real target positions only, token-normalised
gradient accumulation, skipped non-finite updates, mixed precision. Models are tiny."""

from __future__ import annotations

import math

import pytest
import torch

from aiayn.data import collate
from aiayn.train import label_smoothed_loss
from aiayn.train.step import Criterion, StepContext, train_update

from helpers import adam, poison_decoder, tiny_model, train_pairs


def test_update_projects_only_real_target_positions(copy_dataset):
    """The batch's target index picks exactly the non-pad positions, and the update's loss
    equals the reference loss over the full, padded logits."""
    src, tgt = train_pairs(copy_dataset, list(range(6)))
    batch = collate(src, tgt)
    assert torch.equal(batch.tgt_index, batch.tgt_out.reshape(-1).ne(0).nonzero().squeeze(1))
    assert torch.equal(batch.tgt_labels, batch.tgt_out.reshape(-1)[batch.tgt_index])
    assert batch.tgt_out.eq(0).any()  # there is padding to leave out
    model = tiny_model()
    with torch.no_grad():
        ref = label_smoothed_loss(model.eval()(batch.src, batch.tgt_in), batch.tgt_out, 0.1, 0)
        loss, nll, correct = Criterion(model, 0.1)(batch)
    assert float(loss) == pytest.approx(float(ref.loss), rel=1e-5)
    assert float(nll) == pytest.approx(float(ref.nll), rel=1e-5)
    assert int(correct) == int(ref.n_correct)


def test_the_loss_of_a_model_with_a_logits_bias_includes_it(copy_dataset):
    """A pretrained model's fixed logits bias enters the fused loss exactly (folded in as one more
    column) and gets no gradient."""
    from aiayn.model import Transformer, TransformerConfig

    src, tgt = train_pairs(copy_dataset, list(range(6)))
    batch = collate(src, tgt)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=45, d_model=32, d_ff=64, n_heads=2, n_encoder_layers=1,
                                          n_decoder_layers=1, dropout=0.0, logits_bias=True, activation="swish"))
    with torch.no_grad():
        model.generator.bias.normal_(0.0, 2.0)
    ref = label_smoothed_loss(model.eval()(batch.src, batch.tgt_in), batch.tgt_out, 0.1, 0)
    loss, nll, correct = Criterion(model, 0.1)(batch)
    assert float(loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    assert float(nll) == pytest.approx(float(ref.nll), rel=1e-5) and int(correct) == int(ref.n_correct)
    loss.backward()
    assert model.generator.bias.grad is None and model.generator.weight.grad is not None


def test_accumulating_micro_batches_equals_one_big_batch(copy_dataset):
    src, tgt = train_pairs(copy_dataset, list(range(12)))
    ctx = StepContext(label_smoothing=0.1)
    # 3 micro-batches of different sizes, accumulated ...
    m1 = tiny_model()
    o1 = adam(m1)
    micro = [collate(src[:2], tgt[:2]), collate(src[2:7], tgt[2:7]), collate(src[7:], tgt[7:])]
    r1 = train_update(m1, o1, micro, 1e-3, ctx)
    # ... equal one batch holding all of them.
    m2 = tiny_model()
    o2 = adam(m2)
    r2 = train_update(m2, o2, [collate(src, tgt)], 1e-3, ctx)
    assert r1.n_tokens == r2.n_tokens
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
    # Gradients (kept after the step) agree to fp32 round-off. The weights after Adam are not
    # compared: gradients that are zero in exact arithmetic (the key biases: softmax ignores a
    # constant added to all scores) are ~1e-10 noise, which Adam's m/√v scales up to full steps.
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(next(m1.parameters()), next(tiny_model().parameters()))  # it did update


def test_nonfinite_loss_skips_the_update_and_leaves_weights_alone(copy_dataset):
    src, tgt = train_pairs(copy_dataset, list(range(4)))
    model = tiny_model()
    opt = adam(model)
    ctx = StepContext(label_smoothing=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = poison_decoder(model, float("nan"))
    res = train_update(model, opt, [collate(src, tgt)], 1e-3, ctx)
    hook.remove()
    assert res.skipped and not math.isfinite(res.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.state  # Adam never stepped
    assert not train_update(model, opt, [collate(src, tgt)], 1e-3, ctx).skipped


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_update_is_finite(copy_dataset, precision):
    src, tgt = train_pairs(copy_dataset, list(range(4)))
    model = tiny_model()
    opt = adam(model)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    ctx = StepContext(label_smoothing=0.1, precision=precision, scaler=scaler)
    before = next(model.parameters()).clone()
    results = [train_update(model, opt, [collate(src, tgt)], 1e-3, ctx) for _ in range(3)]
    assert all(math.isfinite(r.loss) for r in results)
    assert any(not r.skipped for r in results)
    assert not torch.equal(before, next(model.parameters()))
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_bf16_updates_follow_the_fp32_updates(copy_dataset):
    """Three updates in bf16 (autocast, explicit attention as the trainer runs it on CPUs) stay
    within bf16 accuracy of the same updates in fp32: losses to 1%, weights to a small fraction
    of what the updates changed."""
    from aiayn.precision import use_explicit_attention

    src, tgt = train_pairs(copy_dataset, list(range(8)))
    runs = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model()
        if precision == "bf16":
            use_explicit_attention(model)
        start = [p.detach().clone() for p in model.parameters()]
        opt = adam(model)
        ctx = StepContext(label_smoothing=0.1, precision=precision)
        losses = [train_update(model, opt, [collate(src, tgt)], 1e-3, ctx).loss for _ in range(3)]
        runs[precision] = (losses, start, [p.detach().clone() for p in model.parameters()])
    (l32, start, w32), (l16, _, w16) = runs["fp32"], runs["bf16"]
    assert l16 == pytest.approx(l32, rel=1e-2)
    moved = sum(float((a - s).abs().sum()) for a, s in zip(w32, start))
    apart = sum(float((a - b).abs().sum()) for a, b in zip(w32, w16))
    assert apart <= 0.25 * moved
    assert all(p.dtype == torch.float32 for p in w16)


def test_bf16_update_casts_each_weight_once_whatever_the_micro_batches(copy_dataset):
    """One autocast region per update: a second micro-batch reuses the first one's bf16 copies of
    the weights (only the gradients' casts repeat)."""
    from torch.profiler import profile

    src, tgt = train_pairs(copy_dataset, list(range(4)))
    batch = collate(src, tgt)
    model = tiny_model()
    shape = list(model.decoder.layers[0].ffn.w1.weight.shape)
    opt = adam(model)
    ctx = StepContext(label_smoothing=0.1, precision="bf16")

    def casts(micro_batches: int) -> int:
        with profile(record_shapes=True) as prof:
            train_update(model, opt, [batch] * micro_batches, 1e-3, ctx)
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == shape)

    one, two, three = casts(1), casts(2), casts(3)
    assert two - one == three - two < one  # each extra micro-batch casts less than the first
