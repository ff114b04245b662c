"""The inference engineering (aiayn.inference), pinned to the paper's model: the decoder cache
and the flat decoder step equal ``Transformer.decode``'s full recomputation, and oneDNN-packed
weights and int8 layers (aiayn.inference.packed) equal the plain layers.

The packed model computes the same function with a different summation order inside each dot
product, so logits agree to rounding and searches agree unless two candidates are (nearly) tied.
Every comparison is against the plain path on the same machine and instruction set.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

from aiayn.config import SearchConfig
from aiayn.inference import cache as cache_module
from aiayn.inference import packed
from aiayn.inference.cache import KeyValueBuffer
from aiayn.inference.packed import (
    Bf16Linear,
    Int8Linear,
    PackedFeedForward,
    PackedLinear,
    RescoredLogits,
    is_packed,
    pack_for_inference,
    product_dtype,
    quantize_int8,
    use_bf16_products,
)
from aiayn.inference.step import decode_step, new_cache
from aiayn.model import Transformer, TransformerConfig
from aiayn.search import beam_search, greedy_search, greedy_search_scored

from helpers import LENGTHS, PAD, batch_of, model_log_prob, random_ids, small_model, toy_model

needs_onednn = pytest.mark.skipif(not packed.onednn_available(), reason="this torch has no oneDNN packed linear")


@needs_onednn
def test_packing_replaces_every_linear_and_leaves_the_original_alone():
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = pack_for_inference(model)
    assert is_packed(fast) and not is_packed(model)
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert isinstance(fast.generator, PackedLinear)
    assert all(isinstance(layer.ffn, PackedFeedForward) for layer in fast.decoder.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pack_for_inference(fast) is fast  # packing twice is a no-op
    with pytest.raises(ValueError):
        quantize_int8(fast)


@needs_onednn
@pytest.mark.parametrize("shape,d_in,d_out,packed_call", [((1, 32), 32, 48, False), ((4, 32), 32, 48, False),
                                                          ((3, 5, 32), 32, 48, False), ((80, 256), 256, 512, True),
                                                          ((2, 40, 256), 256, 512, True)])
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("mkl_slow", [False, True])
def test_packed_linear_equals_linear(shape, d_in, d_out, packed_call, activation, mkl_slow):
    """Both of its paths: MKL on the plain weight for small products, the packed oneDNN call
    otherwise; and the packed call for every size where it beats MKL even at one row."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_in, d_out)
    x = torch.randn(*shape)
    expected = linear(x)
    if activation == "relu":
        expected = expected.relu()
    packed = PackedLinear(linear, activation)
    packed.packed_single_row = packed.packed_few_rows = mkl_slow  # what `packed_wins` measured on this CPU
    assert packed.plain_is_faster(x.numel() // d_in) is not (packed_call or mkl_slow)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_takes_small_products_only_where_measured_clearly_faster(monkeypatch):
    """`packed_wins` times both products: a slow MKL hands the packed call single rows and few
    rows; a margin no product can meet keeps the rules. Measured once per shape and row count."""
    packed.packed_wins.cache_clear()
    plain = packed.F.linear

    def slow(*args, **kwargs):
        time.sleep(0.002)
        return plain(*args, **kwargs)

    monkeypatch.setattr(packed.F, "linear", slow)
    layer = PackedLinear(torch.nn.Linear(32, 48))
    assert layer.packed_single_row and layer.packed_few_rows
    assert not any(layer.plain_is_faster(rows) for rows in (1, 2, 4, 64))
    if packed.onednn_available(torch.bfloat16):  # bf16 takes the packed product at every size anyway
        assert not PackedLinear(torch.nn.Linear(32, 48), dtype=torch.bfloat16).packed_single_row
    monkeypatch.setattr(packed, "PACKED_MARGIN", 0.0)
    assert packed.packed_wins(32, 49, 1) is False
    assert packed.packed_wins(32, 48, 1) is True  # the cached measurement
    layer = PackedLinear(torch.nn.Linear(32, 49))
    assert layer.plain_is_faster(1) and layer.plain_is_faster(4)  # the rules: small products take MKL
    packed.packed_wins.cache_clear()  # later tests measure for themselves


def _torch_ao_int8(model):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


@pytest.mark.parametrize("shape", [(1, 32), (4, 32), (3, 5, 32)])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_int8_linear_equals_torch_ao_module(shape, activation):
    """The same fbgemm kernel on the same packed weight: identical outputs, ReLU fused or not."""
    torch.manual_seed(0)
    reference = _torch_ao_int8(torch.nn.Sequential(torch.nn.Linear(32, 48)))[0]
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = reference(x).relu() if activation == "relu" else reference(x)
        assert torch.equal(Int8Linear(reference, activation)(x), expected)
    rows = torch.tensor([0, 7, 47])
    assert torch.equal(Int8Linear(reference).weight_rows(rows), reference.weight().dequantize()[rows])


@pytest.mark.parametrize("norm_first", [False, True])
def test_int8_model_runs_int8_linears_with_torch_ao_outputs(norm_first):
    model = toy_model(norm_first=norm_first)
    int8, reference = quantize_int8(model), _torch_ao_int8(model)
    linears = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(isinstance(layer.ffn, PackedFeedForward) and layer.ffn.w1.activation == "relu"
               for layer in int8.decoder.layers)
    src, tgt = batch_of(LENGTHS), batch_of([6] * len(LENGTHS), seed=3)
    with torch.inference_mode():
        assert torch.equal(int8(src, tgt), reference(src, tgt))
    assert beam_search(int8, src, SearchConfig(beam=4, max_len_b=8), nbest=2) == beam_search(reference, src, SearchConfig(beam=4, max_len_b=8), nbest=2)


@needs_onednn
@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_logits_equal_plain_logits(norm_first):
    model = toy_model(norm_first=norm_first)
    fast = pack_for_inference(model)
    src, tgt = batch_of(LENGTHS), batch_of([6] * len(LENGTHS), seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(fast(src, tgt), model(src, tgt), atol=1e-4, rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("activation", ["swish", "gelu"])
def test_packed_pretrained_deviations_equal_plain(activation):
    """A pretrained model's activation and logits bias (aiayn.pretrained) survive packing, int8
    and a shortlist's restricted output layer."""
    from aiayn.inference.shortlist import RestrictedOutput
    from aiayn.translator import prepare_for_inference

    model = toy_model(activation=activation, logits_bias=True)
    with torch.no_grad():
        model.generator.bias.normal_()
    fast = pack_for_inference(model)
    src, tgt = batch_of(LENGTHS), batch_of([6] * len(LENGTHS), seed=3)
    with torch.inference_mode():
        reference = model(src, tgt)
        torch.testing.assert_close(fast(src, tgt), reference, atol=1e-4, rtol=1e-4)
        int8 = prepare_for_inference(model, torch.device("cpu"), quantize="int8")
        assert (int8(src, tgt) - reference).abs().max() < 0.3  # int8 rounding, same function
        ids = torch.arange(model.config.tgt_vocab_size)
        states = model.states(src, tgt).reshape(-1, model.config.d_model)
        torch.testing.assert_close(RestrictedOutput.of(model, ids).logits(states), reference.reshape(states.size(0), -1))


@needs_onednn
def test_packed_search_equals_plain_search_up_to_ties():
    """Same hypotheses, or, where they differ, hypotheses the plain model scores the same (a tie)."""
    model, src = toy_model(), batch_of(LENGTHS)
    fast = pack_for_inference(model)
    plain_nbest = beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_b=10), nbest=4)
    fast_nbest = beam_search(fast, src, SearchConfig(beam=4, alpha=0.6, max_len_b=10), nbest=4)
    for row, (a, b) in enumerate(zip(plain_nbest, fast_nbest)):
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-4)
        for h in b:  # every packed hypothesis's log-prob is the plain model's
            assert h.log_prob == pytest.approx(model_log_prob(model, src[row], h.tokens), abs=1e-4)
    plain_greedy = greedy_search_scored(model, src, SearchConfig(max_len_b=10))
    fast_greedy = greedy_search_scored(fast, src, SearchConfig(max_len_b=10))
    for (a, la), (b, lb) in zip(plain_greedy, fast_greedy):
        assert a == b or lb == pytest.approx(la, abs=1e-4)
    # The search invariants hold on the packed path too.
    assert greedy_search(fast, src, SearchConfig(max_len_b=10)) == greedy_search(fast, src, SearchConfig(max_len_b=10), use_cache=False)
    beam1 = beam_search(fast, src, SearchConfig(beam=1, alpha=0.0, max_len_b=10))
    assert [h[0].tokens for h in beam1] == greedy_search(fast, src, SearchConfig(max_len_b=10))


# bf16 products (pack_for_inference with dtype bf16, Bf16Linear). Fast even where bf16 is
# emulated: toy sizes. bf16 keeps 8 significant bits, so tolerances are about 2^-8 of the
# values' scale, not fp32's rounding.


@pytest.mark.parametrize("norm_first", [False, True])
def test_bf16_products_compute_the_fp32_function_to_bf16_accuracy(norm_first):
    model = toy_model(norm_first=norm_first)
    half = use_bf16_products(model)
    assert product_dtype(half) == torch.bfloat16 and product_dtype(model) == torch.float32
    # every product in bf16, the pre-softmax projection's too, whose kept logits the search
    # recomputes from its fp32 weight (packed.RescoredLogits)
    assert [m for m in half.modules() if type(m) is torch.nn.Linear] == []
    assert type(half.generator) is RescoredLogits and half.generator.weight.dtype == torch.float32
    src, tgt = batch_of(LENGTHS), batch_of([6] * len(LENGTHS), seed=3)
    with torch.inference_mode():
        reference, logits = model(src, tgt), half(src, tgt)
    assert logits.dtype == torch.float32  # everything between the products stays fp32
    assert (logits - reference).abs().max() <= 0.02 * reference.abs().max()
    assert logits.argmax(-1).eq(reference.argmax(-1)).float().mean() >= 0.9
    # by hand: one product of inputs rounded to bf16, accumulated in fp32
    layer = model.decoder.layers[0].ffn.w2
    x = torch.randn(3, layer.in_features)
    expected = x.bfloat16().float() @ layer.weight.bfloat16().float().T + layer.bias.bfloat16().float()
    torch.testing.assert_close(Bf16Linear(layer)(x), expected, atol=1e-2, rtol=1e-2)


needs_onednn_bf16 = pytest.mark.skipif(not packed.onednn_available(torch.bfloat16),
                                       reason="oneDNN cannot pack bf16 weights on this CPU")


@needs_onednn_bf16
def test_packed_bf16_products_equal_unpacked_bf16_products():
    """The bf16 twin of the prepacked path: the same function as `Bf16Linear` (both round the
    same inputs; only the kernels' summation order and the output's rounding differ)."""
    model = toy_model()
    fast, plain = pack_for_inference(model, dtype=torch.bfloat16), use_bf16_products(model)
    assert is_packed(fast) and product_dtype(fast) == torch.bfloat16
    assert all(m.packed_weight.dtype == torch.bfloat16 for m in fast.modules() if isinstance(m, PackedLinear))
    assert isinstance(fast.generator, RescoredLogits) and fast.generator.fast.dtype == torch.bfloat16
    assert fast.generator.weight.dtype == torch.float32
    src, tgt = batch_of(LENGTHS), batch_of([6] * len(LENGTHS), seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(fast(src, tgt), plain(src, tgt), atol=2e-2, rtol=2e-2)


@needs_onednn_bf16
def test_bf16_cached_decoding_and_search_invariants():
    """decode_step with a cache equals the full forward with bf16 products too, and beam 1
    equals greedy."""
    fast = pack_for_inference(small_model(), dtype=torch.bfloat16)
    src, tgt = random_ids(3, 7), random_ids(3, 6, seed=2)
    src[2, 5:] = PAD
    with torch.inference_mode():
        full = fast(src, tgt)
        memory, mask = fast.encode(src), fast.source_mask(src)
        cache = new_cache(fast)
        steps = [fast.generator(decode_step(fast, tgt[:, t: t + 1], memory, mask, cache)) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-2, rtol=2e-2)
    src = batch_of(LENGTHS)
    greedy = greedy_search(fast, src, SearchConfig(max_len_b=10))
    assert greedy == greedy_search(fast, src, SearchConfig(max_len_b=10), use_cache=False)
    beam1 = beam_search(fast, src, SearchConfig(beam=1, alpha=0.0, max_len_b=10))
    assert [h[0].tokens for h in beam1] == greedy


@pytest.mark.parametrize("packed_weights", [False, True])
def test_rescored_logits_are_bf16_products_recomputed_in_fp32_where_asked(packed_weights):
    if packed_weights and not packed.onednn_available(torch.bfloat16):
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU")
    linear = torch.nn.Linear(16, 300)
    rescored = RescoredLogits(linear, packed=packed_weights)
    x = torch.randn(5, 16)
    ids = torch.randint(0, 300, (5, 7))
    with torch.inference_mode():
        exact = linear(x)
        fast = rescored(x)
        torch.testing.assert_close(rescored.rescore(x, ids), exact.gather(1, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, Bf16Linear(linear)(x), rtol=2e-2, atol=2e-2)
    assert fast.dtype == torch.float32 and not torch.allclose(fast, exact, rtol=1e-5, atol=1e-5)  # rounded


def test_bf16_search_steps_score_their_tokens_with_fp32_logits():
    """A search step over bf16 logits keeps the tokens and log-probabilities that fp32 logits
    give (the same bf16 stack below both): the kept logits are recomputed exactly, and Z
    differs only by the rounding of the rest of the row."""
    from aiayn.search import _top_next

    model = toy_model(vocab=300)
    half = use_bf16_products(model)
    reference = copy.deepcopy(half)
    reference.generator = copy.deepcopy(model.generator)  # fp32 logits over the same bf16 stack
    src, tgt = batch_of(LENGTHS, vocab=300), batch_of([6] * len(LENGTHS), seed=3, vocab=300)
    with torch.inference_mode():
        memory, mask = half.encode(src), half.source_mask(src)
        got_lp, got_ids = _top_next(half, tgt, memory, mask, None, None, width=8)
        want_lp, want_ids = _top_next(reference, tgt, memory, mask, None, None, width=8)
        rounded = copy.deepcopy(half)
        rounded.generator = Bf16Linear(model.generator)  # bf16 logits, not rescored
        plain_lp, _ = _top_next(rounded, tgt, memory, mask, None, None, width=8)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=2e-3)
    # without the rescoring the same logits are off by bf16's rounding, well beyond that
    assert (plain_lp - want_lp).abs().max() > 4 * (got_lp - want_lp).abs().max()


def test_bf16_without_packing_support_falls_back_to_unpacked_bf16_products(monkeypatch):
    """Where oneDNN cannot pack bf16 (an AVX2-only CPU), bf16 inference still has bf16 products."""
    from aiayn.translator import prepare_for_inference

    monkeypatch.setattr(packed, "onednn_available", lambda dtype=torch.float32: dtype == torch.float32)
    model = prepare_for_inference(toy_model(), torch.device("cpu"), precision="bf16")
    assert not is_packed(model) and product_dtype(model) == torch.bfloat16
    assert pack_for_inference(toy_model(), dtype=torch.bfloat16).__class__ is Transformer  # left as it is
    with pytest.raises(ValueError, match="plain fp32 model"):  # int8 starts from fp32 weights only
        quantize_int8(model)


def test_without_onednn_packing_falls_back_to_the_plain_model(monkeypatch):
    monkeypatch.setattr(packed, "onednn_available", lambda dtype=torch.float32: False)
    model = toy_model()
    assert pack_for_inference(model) is model
    assert not is_packed(model)


def test_int8_and_non_cpu_float_models_are_not_packed():
    model = toy_model()
    int8 = quantize_int8(model)
    assert pack_for_inference(int8) is int8
    double = toy_model().double()
    assert pack_for_inference(double) is double


@pytest.mark.parametrize("split", [False, True])
def test_key_value_buffer_grows_and_reorders_like_concatenation(split, monkeypatch):
    """Appending past the capacity, reordering rows, and dropping rows give what torch.cat and
    index_select on the full history give; also with reorders split across threads."""
    if split:
        monkeypatch.setattr(cache_module, "SPLIT_REORDER", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(0)
    buf = KeyValueBuffer(capacity=1)
    ref_k = ref_v = None
    for step, rows in enumerate([None, torch.tensor([1, 1, 0, 3]), None, torch.tensor([2, 0]), None]):
        if rows is not None:
            buf.reorder(rows)
            ref_k, ref_v = ref_k[rows], ref_v[rows]
        n = 4 if ref_k is None else ref_k.size(0)
        k, v = torch.randn(n, 2, 1 + step % 2, 3, generator=g), torch.randn(n, 2, 1 + step % 2, 3, generator=g)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], 2)
        got_k, got_v = buf.append(k, v)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert buf.length == ref_k.size(2)


def test_a_model_with_a_small_cache_capacity_decodes_like_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=20, d_model=16, d_ff=32, n_heads=2, n_encoder_layers=1,
                                         n_decoder_layers=2, dropout=0.0)).eval()
    src, tgt = torch.randint(4, 20, (2, 5)), torch.randint(4, 20, (2, 9))
    with torch.inference_mode():
        full = model(src, tgt)
        mask, memory = model.source_mask(src), model.encode(src)
        cache = new_cache(model, capacity=2)
        steps = [model.generator(decode_step(model, tgt[:, t : t + 1], memory, mask, cache)) for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions,norm_first", [("sinusoidal", False), ("learned", False), ("sinusoidal", True)])
def test_cached_incremental_decoding_equals_full_forward(positions, norm_first):
    """`decode_step`, one position at a time with a cache, equals the teacher-forced forward."""
    model = small_model(positions=positions, norm_first=norm_first)
    src, tgt = random_ids(3, 7), random_ids(3, 6, seed=2)
    src[2, 5:] = PAD
    full = model(src, tgt)
    src_mask = model.source_mask(src)
    memory = model.encode(src)
    cache = new_cache(model)
    steps = [model.generator(decode_step(model, tgt[:, t : t + 1], memory, src_mask, cache)) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_beams_share_encoder_keys_and_values_without_copies():
    """A decoder batch of K hypotheses per sentence equals decoding with the memory repeated K times."""
    model = small_model()
    k = 3
    src, tgt = random_ids(2, 7), random_ids(2 * k, 4, seed=5)
    src[1, 4:] = PAD
    src_mask, memory = model.source_mask(src), model.encode(src)
    repeated = model.decode(tgt, memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0))

    def step(cache, tokens, memory, mask):
        return decode_step(model, tokens, memory, mask, cache)

    cache = new_cache(model)
    steps = [step(cache, tgt[:, t : t + 1], memory, src_mask) for t in range(4)]
    torch.testing.assert_close(torch.cat(steps, 1), repeated, atol=1e-5, rtol=0)
    # reordering hypotheses and dropping a sentence keep the cache consistent
    cache = new_cache(model)
    for t in range(2):
        step(cache, tgt[:, t : t + 1], memory, src_mask)
    order = torch.tensor([2, 2, 0, 4, 3, 5])  # beams stay within their sentence
    cache.reorder(order)
    got = step(cache, tgt[order, 2:3], memory, src_mask)
    full = model.decode(torch.cat([tgt[order, :2], tgt[order, 2:3]], 1), memory.repeat_interleave(k, 0),
                        src_mask.repeat_interleave(k, 0))[:, -1:]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    cache.select_sentences(torch.tensor([1]))
    cache.reorder(torch.tensor([3, 4, 5]))
    got = step(cache, tgt[order[3:], 3:4], memory[1:], src_mask[1:])
    full = model.decode(torch.cat([tgt[order[3:], :3], tgt[order[3:], 3:4]], 1), memory[1:].repeat_interleave(k, 0),
                        src_mask[1:].repeat_interleave(k, 0))[:, -1:]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
