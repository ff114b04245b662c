"""Inference engineering beside the paper's model (`aiayn.model`), pinned to it by tests.

    cache.py      the decoder's key/value cache: KeyValueBuffer, DecoderCache
    step.py       decode_step: one decoder position with the cache, the step every search takes
    packed.py     CPU layers: oneDNN-prepacked fp32 Linear, fbgemm int8 Linear, quantize_int8
    shortlist.py  vocabulary shortlist: built from training pairs, restricts the output layer

None of this changes what the model computes (up to the summation order inside a product, and
int8 rounding where asked for); tests/test_inference.py checks each against the plain model.
"""
