"""Training throughput: target tokens/s and model FLOPs utilisation (MFU).

One training step = forward, label-smoothed cross-entropy (ε_ls = 0.1, §5.4), backward, Adam
(β1 = 0.9, β2 = 0.98, ε = 1e-9, §5.3) and zeroing the gradients, with dropout 0.1 on. All three
systems get the same batch of random sentences (about 4k target tokens). Each runs its own
training code as a user of it would: aiayn its `Criterion` (the pre-softmax projection fused
with the loss, over the real target positions only, `aiayn.train.loss`); nn.Transformer and
HF Marian the full logits and ``F.cross_entropy(..., label_smoothing=0.1, ignore_index=pad)``.

Model FLOPs of one step (matmuls only, 2 FLOPs per multiply-add), with B sentences, S source
and T target positions (padded), R real target tokens, N layers, width d, FFN width d_ff,
vocabulary V:

    encoder  N·B·S·2(4d² + 2d·d_ff)          Q,K,V,O projections and the FFN, per source position
             N·B·2·2·S²·d                     QKᵀ and (softmax)·V
    decoder  N·B·T·2(6d² + 2d·d_ff)          self Q,K,V,O + cross Q,O + FFN, per target position
             N·B·S·2·2d²                      cross-attention K,V of the encoder output
             N·B·2·2·(T² + T·S)·d             self- and cross-attention scores and sums
    output   R·2·d·V                          pre-softmax projection of the real target tokens

and training costs 3× the forward pass (the backward pass computes two products per forward
one). The output term counts real tokens only: projecting padding is work no system needs,
so a system that does it spends time the formula does not credit. MFU = (model FLOPs / step
time) / (the best matmul probe's GFLOP/s of the precision the system runs in, measured in the same
rounds: in fp32 the faster of MKL and oneDNN). The same formula serves all systems, so within a
precision their MFU ratios equal their throughput ratios.

bf16, where the CPU does it natively (`aiayn.precision`): "aiayn bf16" is what ``aiayn train``
runs under ``precision: auto`` there (autocast to bf16, fp32 master weights, the explicit
attention formula), and "HF Marian bf16" the same Marian step under the same autocast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import peers
from common import Series, bf16_supported, linear_gflops, matmul_gflops, paired_ratio, timed

LABEL_SMOOTHING = 0.1


def training_flops(cfg, batch: int, s: int, t: int, real_targets: int) -> float:
    """Model FLOPs of one training step (module docstring)."""
    d, ff, v = cfg.d_model, cfg.d_ff, cfg.tgt_vocab_size
    enc = cfg.n_encoder_layers * (batch * s * 2 * (4 * d * d + 2 * d * ff) + batch * 4 * s * s * d)
    dec = cfg.n_decoder_layers * (
        batch * t * 2 * (6 * d * d + 2 * d * ff) + batch * s * 4 * d * d + batch * 4 * (t * t + t * s) * d
    )
    out = real_targets * 2 * d * v
    return 3.0 * (enc + dec + out)


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    """Label-smoothed cross-entropy over the non-pad target positions."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=peers.PAD, label_smoothing=LABEL_SMOOTHING)


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _step_fn(model: torch.nn.Module, forward: Callable[[], Tensor], target: Tensor, bf16: bool = False) -> Callable[[], float]:
    """A peer's step: full logits, then torch's label-smoothed cross-entropy (in fp32)."""
    opt = _adam(model)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with _autocast(bf16):
            logits = forward()
        loss = _loss(logits.float(), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _aiayn_step_fn(model, batch, bf16: bool = False) -> Callable[[], float]:
    """aiayn's step: its Criterion (projection fused with the loss, real positions only); in bf16
    as the trainer runs it (`aiayn.train.trainer`: explicit attention, autocast); in fp32 through
    the library the trainer's ``fp32_products: auto`` measures faster (MKL or oneDNN)."""
    from aiayn.precision import for_training
    from aiayn.train.products import choose_fp32_products, mkl_linear, use_linear_library
    from aiayn.train.step import Criterion

    cpu = torch.device("cpu")
    for_training(model, "bf16" if bf16 else "fp32", cpu)
    products = choose_fp32_products("auto", "bf16" if bf16 else "fp32", cpu, rows=batch.n_tgt_tokens,
                                    d_model=model.config.d_model, d_ff=model.config.d_ff)
    if products is not None:
        use_linear_library(model, products.library)
    criterion = Criterion(model, LABEL_SMOOTHING, products.linear if products is not None else mkl_linear)
    opt = _adam(model)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with _autocast(bf16):
            loss, _, _ = criterion(batch)
        loss = loss / batch.n_tgt_tokens
        loss.backward()
        opt.step()
        return float(loss.detach())

    step.fp32_products = products.describe() if products is not None else None
    return step


def _batch(src: Tensor, tgt_in: Tensor, target: Tensor):
    """The padded tensors as an aiayn Batch (target positions found as `collate` does)."""
    from aiayn.data.batching import Batch

    index = target.reshape(-1).ne(peers.PAD).nonzero().squeeze(1)
    return Batch(src, tgt_in, target, index, target.reshape(-1)[index], n_src_tokens=int(src.ne(peers.PAD).sum()),
                 n_tgt_tokens=int(index.numel()))


@dataclass
class TrainingResult:
    config: str
    sentences: int
    src_len: int
    tgt_len: int
    target_tokens: int
    flops_per_step: float
    tokens_per_s: dict[str, Series] = field(default_factory=dict)
    peak_gflops: Series = field(default_factory=Series)  # fp32 probe through MKL (n = 2048), each round
    peak_onednn_gflops: Series = field(default_factory=Series)  # fp32 through oneDNN, each round (where it runs)
    peak_bf16_gflops: Series = field(default_factory=Series)  # bf16 probe, each round (native bf16 only)
    loss: dict[str, float] = field(default_factory=dict)
    fp32_products: str | None = None  # MKL or oneDNN for aiayn's fp32 step, as aiayn train chooses

    def mfu(self, system: str) -> float:
        """Model FLOPs utilisation against the best probe of the system's own precision (fp32: the
        faster of MKL and oneDNN, whichever library the system itself multiplies through)."""
        step_s = self.target_tokens / self.tokens_per_s[system].median
        return self.flops_per_step / step_s / (self.peak(system.endswith("bf16")) * 1e9)

    def peak(self, bf16: bool) -> float:
        """GFLOP/s of the best probe of a precision, the median over this section's rounds."""
        if bf16:
            return self.peak_bf16_gflops.median
        return max(self.peak_gflops.median, self.peak_onednn_gflops.median if self.peak_onednn_gflops.values else 0.0)

    def ratio(self, a: str, b: str) -> float:
        return paired_ratio(self.tokens_per_s[a], self.tokens_per_s[b])


def run_training(name: str, sentences: int, min_len: int, max_len: int, rounds: int, workdir, log) -> TrainingResult:
    """Time one training step of each system per round, the systems alternating."""
    from aiayn.train.products import onednn_fp32_available

    cfg = peers.config(name)
    v = cfg.tgt_vocab_size
    src = peers.random_batch(v, sentences, min_len, max_len, seed=1)
    full = peers.random_batch(v, sentences, min_len, max_len, seed=2)  # tokens + </s>
    tgt_in = torch.cat([torch.full((sentences, 1), peers.BOS), full[:, :-1]], dim=1)  # <s> + tokens
    tgt_in = tgt_in.masked_fill(tgt_in.eq(peers.EOS), peers.PAD)  # the </s> is not an input
    target = full
    n_target = int(target.ne(peers.PAD).sum())

    ours = peers.aiayn_model(cfg)
    theirs_torch = peers.TorchTransformerMT(cfg)
    hf_dir = peers.export_hf(ours, workdir / f"hf-train-{name}", peers.tiny_sentencepiece(workdir / "spm"))
    hf = peers.load_hf(hf_dir)
    # Training sees the appended pad row as one more ordinary class (zero bias): the same work
    # as a V+1 vocabulary, and no -inf logit inside the label-smoothing sum.
    hf.final_logits_bias.zero_()
    hf_ids, hf_mask = peers.hf_inputs(src, v)
    hf_dec = tgt_in.clone()
    hf_dec[:, 0] = v  # Marian starts from its zero-embedding pad row (see aiayn.export)

    batch = _batch(src, tgt_in, target)
    steps = {
        "aiayn": _aiayn_step_fn(ours, batch),
        "nn.Transformer": _step_fn(theirs_torch, lambda: theirs_torch(src, tgt_in), target),
        "HF Marian": _step_fn(hf, lambda: hf(input_ids=hf_ids, attention_mask=hf_mask, decoder_input_ids=hf_dec).logits, target),
    }
    bf16 = bf16_supported()
    if bf16:  # each system's best CPU setting: the same steps under bf16 autocast, on copies of the weights
        ours16, hf16 = copy.deepcopy(ours), copy.deepcopy(hf)
        steps["aiayn bf16"] = _aiayn_step_fn(ours16, batch, bf16=True)
        steps["HF Marian bf16"] = _step_fn(
            hf16, lambda: hf16(input_ids=hf_ids, attention_mask=hf_mask, decoder_input_ids=hf_dec).logits, target, bf16=True)
    result = TrainingResult(name, sentences, src.size(1), tgt_in.size(1), n_target,
                            training_flops(cfg, sentences, src.size(1), tgt_in.size(1), n_target))
    result.fp32_products = steps["aiayn"].fp32_products
    log(f"training {name}: aiayn {result.fp32_products}")
    for system, step in steps.items():  # warm-up: Adam state, allocator, thread pool
        result.loss[system] = step()
        result.tokens_per_s[system] = Series()
    order = list(steps)
    for r in range(rounds):
        result.peak_gflops.add(matmul_gflops(2048, torch.float32, repeats=5))
        if onednn_fp32_available():
            result.peak_onednn_gflops.add(linear_gflops(4096, 512, 2048, "onednn-fp32", repeats=5))
        if bf16:
            result.peak_bf16_gflops.add(linear_gflops(4096, 512, 2048, "onednn-bf16", repeats=5))
        for system in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            seconds, loss = timed(steps[system])
            result.tokens_per_s[system].add(n_target / seconds)
            result.loss[system] = loss
        log(f"training {name} round {r + 1}/{rounds}: "
            + ", ".join(f"{s} {result.tokens_per_s[s].values[-1]:.0f} tok/s" for s in order)
            + f"; matmul {result.peak_gflops.values[-1]:.0f} GFLOP/s"
            + (f", oneDNN fp32 {result.peak_onednn_gflops.values[-1]:.0f}" if result.peak_onednn_gflops.values else "")
            + (f", bf16 {result.peak_bf16_gflops.values[-1]:.0f}" if bf16 else ""))
    return result  # the models are freed with this frame
