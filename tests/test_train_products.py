"""aiayn.train.products: fp32 training products through oneDNN equal MKL's (forward, backward,
the fused loss), the choice "auto" makes from a measurement (mocked), and a resumed run keeping
the library its first session measured."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aiayn.errors import UserError
from aiayn.train import products, train
from aiayn.train.loss import smoothed_cross_entropy
from aiayn.train.products import (
    Fp32Products,
    OneDnnLinear,
    choose_fp32_products,
    mkl_linear,
    onednn_fp32_available,
    onednn_linear,
    onednn_mm_linear,
    use_linear_library,
)

from helpers import COPY_CONFIG, TINY, assert_same_final_state, tiny_model

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not onednn_fp32_available(), reason="this torch build has no oneDNN fp32 linear")
# Only the summation order inside each dot product differs between the libraries.
TOL = dict(rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_forward_and_backward_equal_f_linear(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=gen)  # (batch, length, d_in): 3-d, as in the model
    w = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    grad = torch.randn(3, 7, 24, generator=gen)
    results = []
    for fn in (F.linear, onednn_linear):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_onednn_linear_leaves_other_dtypes_to_f_linear():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(onednn_linear(x, w), F.linear(x, w))


@needs_onednn
def test_the_model_keeps_its_parameters_and_state_dict_and_computes_the_same():
    model = tiny_model(dropout=0.0)
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    tgt = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    keys, params = list(model.state_dict()), list(model.parameters())
    want = model(src, tgt)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    use_linear_library(model, "onednn")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDnnLinear for m in linears)
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    got = model(src, tgt)
    got.sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip((p.grad for p in params), want_grads, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    with torch.no_grad():  # without gradients (validation, search) it is a plain nn.Linear
        assert torch.equal(model(src, tgt), use_linear_library(model, "mkl")(src, tgt))
    assert all(type(m) is nn.Linear for m in linears)


@needs_onednn
def test_the_fused_loss_through_onednn_equals_it_through_mkl():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 16, generator=gen)
    weight = torch.randn(40, 16, generator=gen)
    target = torch.randint(3, 40, (50,), generator=gen)
    results = []
    for linear in (mkl_linear, onednn_mm_linear):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        sums = smoothed_cross_entropy(h, w, target, 0.1, 0, linear)
        sums.loss.backward()
        results.append((sums.loss.detach(), sums.nll, sums.n_correct, h.grad, w.grad))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


# -- the choice ---------------------------------------------------------------------------------


def _measured(monkeypatch, mkl_s: float, onednn_s: float) -> list[tuple]:
    calls = []

    def fake(rows, d_in, d_out, repeats=3):
        calls.append((rows, d_in, d_out))
        return mkl_s, onednn_s

    monkeypatch.setattr(products, "measure_fp32_products", fake)
    monkeypatch.setattr(products, "onednn_fp32_available", lambda: True)
    return calls


SHAPE = dict(rows=9000, d_model=128, d_ff=512)


@pytest.mark.parametrize("mkl_s, onednn_s, library", [
    (1.0, 0.55, "onednn"),  # a Zen 5's 1.8x
    (1.0, 0.95, "mkl"),  # within the margin: PyTorch's default stays
    (1.0, 1.30, "mkl"),
])
def test_auto_takes_onednn_only_where_it_is_measured_clearly_faster(monkeypatch, mkl_s, onednn_s, library):
    calls = _measured(monkeypatch, mkl_s, onednn_s)
    chosen = choose_fp32_products("auto", "fp32", CPU, **SHAPE)
    assert chosen.library == library
    assert calls == [(4096, 128, 512)]  # the model's first feed-forward product, rows capped
    assert chosen.record()["fp32_products_mkl_s"] == mkl_s
    assert "auto; oneDNN measured" in chosen.describe()


def test_nothing_is_measured_outside_fp32_on_a_cpu_or_when_forced(monkeypatch):
    calls = _measured(monkeypatch, 1.0, 0.5)
    assert choose_fp32_products("auto", "bf16", CPU, **SHAPE) is None
    assert choose_fp32_products("auto", "fp32", torch.device("cuda"), **SHAPE) is None
    assert choose_fp32_products("mkl", "fp32", CPU, **SHAPE) == Fp32Products("mkl", "mkl")
    assert choose_fp32_products("onednn", "fp32", CPU, **SHAPE) == Fp32Products("onednn", "onednn")
    assert calls == []


def test_without_onednn_auto_is_mkl_and_a_forced_onednn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(products, "onednn_fp32_available", lambda: False)
    assert choose_fp32_products("auto", "fp32", CPU, **SHAPE).library == "mkl"
    with pytest.raises(UserError, match="train.fp32_products onednn: this PyTorch build cannot"):
        choose_fp32_products("onednn", "fp32", CPU, **SHAPE)


# -- in training --------------------------------------------------------------------------------


def _start(run):
    return next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in line)


AUTO = [o for o in TINY if not o.startswith("train.fp32_products")] + [
    "train.fp32_products=auto", "model.dropout=0.1", "train.batch_tokens=300", "train.log_every=2",
    "train.valid_every=0", "train.save_every=1000", "train.average_last=0"]


@needs_onednn
def test_a_resumed_run_keeps_the_library_its_first_session_measured(small_copy, tmp_path, monkeypatch, capsys):
    """The first session measures oneDNN faster, the second MKL: the resumed run still multiplies
    through oneDNN and ends bitwise where one oneDNN run ends."""
    _measured(monkeypatch, 1.0, 0.5)
    train(COPY_CONFIG, small_copy, tmp_path / "reference", AUTO + ["train.max_updates=6"])
    train(COPY_CONFIG, small_copy, tmp_path / "stopped", AUTO + ["train.max_updates=3"])
    assert "fp32 products through oneDNN (auto; oneDNN measured 2.00x" in capsys.readouterr().err
    _measured(monkeypatch, 1.0, 2.0)
    train(COPY_CONFIG, small_copy, tmp_path / "stopped", AUTO + ["train.max_updates=6"], resume=True)
    assert_same_final_state(tmp_path / "stopped", tmp_path / "reference")
    starts = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert [s["fp32_products"] for s in starts] == ["onednn", "onednn"]


@needs_onednn
def test_training_through_onednn_follows_training_through_mkl(small_copy, tmp_path):
    """The same run through either library: the same losses up to rounding (a few updates, so
    the summation orders cannot drift apart)."""
    losses = {}
    for library in ("mkl", "onednn"):
        run = tmp_path / library
        train(COPY_CONFIG, small_copy, run, AUTO + [f"train.fp32_products={library}", "train.max_updates=4"])
        assert (_start(run)["fp32_products"], _start(run)["fp32_products_setting"]) == (library, library)
        losses[library] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                           if '"train"' in line]
    assert len(losses["mkl"]) == 2
    torch.testing.assert_close(torch.tensor(losses["onednn"]), torch.tensor(losses["mkl"]), rtol=1e-4, atol=1e-4)
