"""The label-smoothed cross-entropy of §5.4 (aiayn.train.loss): the reference loss and the
fused projection + loss the trainer uses."""

from __future__ import annotations

import pytest
import torch

from aiayn.train import label_smoothed_loss


def test_label_smoothed_loss_equals_hand_computation():
    torch.manual_seed(0)
    vocab, eps, pad = 7, 0.1, 0
    logits = torch.randn(2, 3, vocab)
    target = torch.tensor([[4, 5, 3], [6, 3, pad]])  # the last position is padding: ignored
    sums = label_smoothed_loss(logits, target, eps, pad)
    logp = torch.log_softmax(logits.double(), -1)
    expected_loss = expected_nll = 0.0
    for b in range(2):
        for t in range(3):
            y = int(target[b, t])
            if y == pad:
                continue
            q = [eps / (vocab - 2)] * vocab  # ε spread over the classes other than y and pad
            q[y], q[pad] = 1 - eps, 0.0
            assert sum(q) == pytest.approx(1.0)
            expected_loss += -sum(q[k] * float(logp[b, t, k]) for k in range(vocab))
            expected_nll += -float(logp[b, t, y])
    assert sums.n_tokens == 5
    assert float(sums.loss) == pytest.approx(expected_loss, rel=1e-6)
    assert float(sums.nll) == pytest.approx(expected_nll, rel=1e-6)
    # ε = 0 is plain cross-entropy with padding ignored.
    plain = label_smoothed_loss(logits, target, 0.0, pad)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=pad,
                                           reduction="sum")
    assert float(plain.loss) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_fused_projection_and_loss_equal_the_reference(eps, monkeypatch):
    """smoothed_cross_entropy (chunked, logits never materialised, gradients computed in the
    forward pass) == projecting, then the textbook log-softmax loss, then autograd."""
    import aiayn.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "MIN_ROWS", 16)  # several chunks, the last one partial
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 16 * 50)
    torch.manual_seed(0)
    n, d, vocab, pad = 75, 8, 50, 0
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    target = torch.randint(1, vocab, (n,))
    target[:5] = 7  # a repeated class
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = loss_mod.smoothed_cross_entropy(h1, w1, target, eps, pad)
    (fused.loss * 0.25).backward()  # the incoming gradient scales the stored ones
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = label_smoothed_loss(h2 @ w2.t(), target, eps, pad)
    (ref.loss * 0.25).backward()
    assert fused.n_tokens == ref.n_tokens == n
    # Both compute in fp32 (the loss never runs in lower precision): fp32 round-off apart.
    assert float(fused.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    assert float(fused.nll) == pytest.approx(float(ref.nll), rel=1e-6)
    assert int(fused.n_correct) == int(ref.n_correct)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    # Without gradients (validation) the same sums, and nothing saved for a backward pass.
    with torch.no_grad():
        assert float(loss_mod.smoothed_cross_entropy(h1, w1, target, eps, pad).loss) == pytest.approx(float(ref.loss), rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_fused_loss_under_bf16_autocast_equals_the_reference_on_bf16_products(eps, monkeypatch):
    """Under bf16 autocast the fused loss multiplies in bf16 but reduces, normalises and forms
    the gradient in fp32: it equals the textbook loss on the same bf16-rounded logits to fp32
    accuracy, and its gradients are the reference's to bf16 accuracy (the gradient of the
    logits is rounded once, to bf16, before its two products)."""
    import aiayn.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "MIN_ROWS", 16)
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 16 * 50)
    torch.manual_seed(1)
    n, d, vocab, pad = 75, 8, 50, 0
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    target = torch.randint(1, vocab, (n,))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_mod.smoothed_cross_entropy(h1, w1, target, eps, pad)
    assert fused.loss.dtype == torch.float32
    fused.loss.backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.float32
    logits = (hidden.bfloat16() @ weight.bfloat16().t()).float()  # the products autocast makes
    ref = label_smoothed_loss(logits, target, eps, pad)
    assert float(fused.loss.detach()) == pytest.approx(float(ref.loss), rel=1e-5)
    assert float(fused.nll) == pytest.approx(float(ref.nll), rel=1e-5)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    label_smoothed_loss(h2 @ w2.t(), target, eps, pad).loss.backward()
    for got, want in [(h1.grad, h2.grad), (w1.grad, w2.grad)]:
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
