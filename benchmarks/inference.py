"""Inference: generated tokens/s of greedy and beam-4 search at batch 1 and batch 64.

Systems: aiayn (`aiayn.search`, fp32 with prepacked weights as ``aiayn translate`` runs it,
dynamic int8, and, where the CPU does bf16 natively, bf16 products as ``precision: auto`` runs
it there), Hugging Face `generate` and CTranslate2 (float32 and int8: its CPU compute types;
its ``bfloat16`` falls back to float32 on CPUs), all running the *same* weights: the aiayn model exported to
the Marian layout (`aiayn.export`), which CTranslate2's stock converter reads.

Equal work. The model has random weights with </s> (and <s>, pad) made unreachable
(`peers.make_specials_unreachable`), so every system decodes exactly T steps per sentence:
HF ``max_new_tokens=T``, CTranslate2 ``max_decoding_length=T``, aiayn ``max_len_a=0,
max_len_b=T-1`` (T-1 tokens, then the forced </s> step). No min-length option is used, so
no system pays for a logits processor the others skip. Generated tokens = decoder steps per
sentence × sentences, counted from each system's actual output (not assumed).

CTranslate2 runs in a child process (`ct2_process`: in this one it would slow the torch systems
down); each system's time is that of its search call alone. CTranslate2 is measured twice: on the
same threads as the others, and on one thread, which is faster for it at batch 1 on 2 cores; the
summary also compares aiayn with the better of the two, round by round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aiayn.config import SearchConfig
from aiayn.inference.packed import pack_for_inference, quantize_int8
from aiayn.search import beam_search, greedy_search
from aiayn.translator import prepare_for_inference

import peers
from common import Series, bf16_supported, paired_ratio, timed
from ct2_process import CT2Process

SINGLE_SENTENCES = 6  # batch 1: sentences per system and round, one search call each

SYSTEMS = ["aiayn fp32", "aiayn int8", "HF generate", "CT2 float32", "CT2 int8", "CT2 float32, 1 thread",
           "CT2 int8, 1 thread"]
if bf16_supported():
    SYSTEMS.insert(1, "aiayn bf16")


@dataclass
class InferenceResult:
    config: str
    steps: int  # T: decoder steps per sentence
    tokens_per_s: dict[tuple[str, str, int], Series] = field(default_factory=dict)  # (system, search, batch)
    greedy_agreement: dict[str, float] = field(default_factory=dict)  # vs aiayn fp32, sentence exact match
    beam_agreement: dict[str, float] = field(default_factory=dict)
    max_logit_diff: float = float("nan")  # aiayn vs HF Marian, teacher-forced
    lengths_ok: dict[str, bool] = field(default_factory=dict)
    hf_attention: str = ""  # the attention implementation transformers chose

    def median(self, system: str, search: str, batch: int) -> float:
        return self.tokens_per_s[(system, search, batch)].median

    def ratio(self, a: str, b: str, search: str, batch: int) -> float:
        return paired_ratio(self.tokens_per_s[(a, search, batch)], self.tokens_per_s[(b, search, batch)])

    def ratio_best(self, a: str, others: list[str], search: str, batch: int) -> float:
        """``a`` ÷ the fastest of ``others`` in each round (a peer's better setting), median over rounds."""
        best = Series([max(v) for v in zip(*(self.tokens_per_s[(o, search, batch)].values for o in others))])
        return paired_ratio(self.tokens_per_s[(a, search, batch)], best)


class Runner:
    """Each system as one callable per (search, batch): returns the output token lists."""

    def __init__(self, name: str, workdir, threads: int, log):
        cfg = peers.config(name)
        self.v = cfg.tgt_vocab_size
        plain = peers.aiayn_model(cfg).eval()
        peers.make_specials_unreachable(plain)
        # aiayn fp32 as `aiayn translate` runs it: oneDNN-prepacked weights (aiayn.inference.packed).
        self.model = pack_for_inference(plain)
        self.int8 = quantize_int8(plain).eval()
        self.bf16 = (prepare_for_inference(plain, torch.device("cpu"), precision="bf16")
                     if "aiayn bf16" in SYSTEMS else None)
        self.hf_dir = peers.export_hf(plain, workdir / f"hf-{name}", peers.tiny_sentencepiece(workdir / "spm"))
        self.hf = peers.load_hf(self.hf_dir)
        ct2_dir = peers.convert_ct2(self.hf_dir, workdir / f"ct2-{name}")
        self.ct2 = {t: CT2Process(ct2_dir, t) for t in sorted({threads, 1})}  # by intra_threads
        self.pieces = peers.ct2_pieces(self.hf_dir)
        self.index = {p: i for i, p in self.pieces.items()}
        self.log = log

    def run(self, system: str, search: str, src: torch.Tensor, steps: int) -> list[list[int]]:
        return self.timed_run(system, search, src, steps)[1]

    def timed_run(self, system: str, search: str, src: torch.Tensor, steps: int) -> tuple[float, list[list[int]]]:
        """Wall-clock seconds of the system's search call, and its outputs as token ids."""
        beam = 1 if search == "greedy" else 4
        if system.startswith("aiayn"):
            model = {"aiayn fp32": self.model, "aiayn int8": self.int8, "aiayn bf16": self.bf16}[system]
            if beam == 1:
                seconds, out = timed(lambda: greedy_search(model, src, SearchConfig(beam=1, max_len_a=0.0, max_len_b=steps - 1)))
            else:
                seconds, nbest = timed(lambda: beam_search(model, src, SearchConfig(beam=4, alpha=0.6, max_len_a=0.0,
                                                                                max_len_b=steps - 1)))
                out = [h[0].tokens for h in nbest]
            return seconds, [o + [peers.EOS] for o in out]  # the forced </s> was a decoder step too
        if system == "HF generate":
            ids, mask = peers.hf_inputs(src, self.v)
            options = dict(num_beams=4, early_stopping=False, length_penalty=0.6) if beam > 1 else dict(num_beams=1)
            with torch.inference_mode():
                seconds, gen = timed(lambda: self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                              max_new_tokens=steps, **options))
            return seconds, [_strip(row[1:].tolist(), pad=self.v) for row in gen]
        process = self.ct2[1 if system.endswith("1 thread") else max(self.ct2)]
        hypotheses, seconds, _ = process.translate("float32" if "float32" in system else "int8",
                                                   peers.ct2_tokens(src, self.pieces), beam_size=beam,
                                                   max_decoding_length=steps, length_penalty=0.6)
        out = []
        for tokens in hypotheses:
            ids = [self.index[p] for p in tokens]
            out.append(ids + [peers.EOS] if len(ids) < steps else ids)  # CT2 drops the final </s>
        return seconds, out

    def close(self) -> None:
        for process in self.ct2.values():
            process.close()


def _strip(ids: list[int], pad: int) -> list[int]:
    """HF pads finished rows after their </s>: the steps are up to and including it."""
    if peers.EOS in ids:
        return ids[: ids.index(peers.EOS) + 1]
    return [i for i in ids if i != pad]


def run_inference(name: str, batches: list[int], steps: int, rounds: int, workdir, threads: int, log) -> InferenceResult:
    runner = Runner(name, workdir, threads, log)
    result = InferenceResult(name, steps, hf_attention=str(getattr(runner.hf.config, "_attn_implementation", "?")))
    sources = {b: peers.random_batch(runner.v, b, 20, 30, seed=10 + b) for b in batches}
    # A batch-1 figure is SINGLE_SENTENCES sentences searched one call each: one sentence takes
    # ~0.1 s, short enough for one scheduling hiccup of a shared machine to move a round's figure.
    singles = peers.random_batch(runner.v, SINGLE_SENTENCES, 20, 30, seed=11)
    calls = {b: [s[None] for s in singles] if b == 1 else [sources[b]] for b in batches}

    # Same weights, same function: teacher-forced logits, then greedy and beam outputs.
    src = sources[max(batches)][:8]
    tgt = peers.random_batch(runner.v, 8, 10, 10, seed=3)[:, :-1]
    tgt[:, 0] = peers.BOS
    ids, mask = peers.hf_inputs(src, runner.v)
    dec_in = tgt.clone()
    dec_in[:, 0] = runner.v
    with torch.inference_mode():
        ours = runner.model(src, tgt)
        theirs = runner.hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in).logits[..., : runner.v]
    result.max_logit_diff = float((ours - theirs).abs().max())

    for search in ("greedy", "beam4"):
        for b in batches:
            for system in SYSTEMS:
                result.tokens_per_s[(system, search, b)] = Series()
    for search in ("greedy", "beam4"):
        reference = runner.run("aiayn fp32", search, sources[max(batches)], steps)
        agreement = result.greedy_agreement if search == "greedy" else result.beam_agreement
        for system in SYSTEMS[1:]:
            out = runner.run(system, search, sources[max(batches)], steps)
            # The first T-1 tokens: at step T aiayn emits its forced </s>, the peers a last token.
            agreement[system] = sum(a[: steps - 1] == b[: steps - 1] for a, b in zip(out, reference)) / len(reference)

    for r in range(rounds):
        for search in ("greedy", "beam4"):
            for b in batches:
                order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[: r % len(SYSTEMS)]
                for system in order:
                    if r == 0:  # untimed warm-up call of each configuration
                        runner.run(system, search, calls[b][0], steps)
                    seconds, generated = 0.0, 0
                    for src in calls[b]:
                        t, out = runner.timed_run(system, search, src, steps)
                        seconds, generated = seconds + t, generated + sum(len(o) for o in out)
                        result.lengths_ok[system] = result.lengths_ok.get(system, True) and all(len(o) == steps for o in out)
                    result.tokens_per_s[(system, search, b)].add(generated / seconds)
                log(f"inference {name} round {r + 1}/{rounds} {search} batch {b}: "
                    + ", ".join(f"{s} {result.tokens_per_s[(s, search, b)].values[-1]:.0f}" for s in SYSTEMS) + " tok/s")
    runner.close()
    return result
