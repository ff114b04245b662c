"""``aiayn evaluate``: sacreBLEU, chrF, and the paper-comparable tokenized BLEU.

Three scores of detokenized hypotheses against one reference per line:

* **BLEU (sacreBLEU)**: cased, detokenized text, sacreBLEU's own 13a tokenization, with its
  signature (Post, 2018). This is the number to compare across papers and toolkits today.
* **chrF2 (sacreBLEU)**: character n-gram F-score, with its signature.
* **Lowercased BLEU (sacreBLEU ``-lc``)**: the same BLEU with both sides lowercased. Papers on
  Multi30k (the multimodal-MT shared tasks and their text-only Transformer baselines) report
  BLEU of tokenized, lowercased text; sacreBLEU's 13a tokenization with ``lowercase=True``
  computes that form reproducibly, with its own signature (``case:lc``).
* **Tokenized BLEU, paper-comparable**: the paper's 28.4 / 41.8 (§6.1) were computed the way
  tensor2tensor's ``get_ende_bleu.sh`` does: tokenize both sides, split hyphenated compounds
  with the Perl substitution ``s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g`` (``a-b`` ->
  ``a ##AT##-##AT## b``), then ``multi-bleu.perl`` (cased, no smoothing). Splitting compounds
  turns one wrong German compound into several n-gram chances, which raises the score; it is
  not comparable with sacreBLEU. Here the tokenizer is sacreBLEU's 13a (mteval-v13a) rather
  than Moses' ``tokenizer.perl`` (not a dependency); the two differ in details such as
  apostrophes, so this figure approximates the paper's procedure, it does not reproduce it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from .errors import UserError

# Perl's s///g scans left to right without overlap, as re.sub does: "a-b-c" -> "a ##AT##-##AT## b-c".
_COMPOUND = re.compile(r"(\S)-(\S)")
TOKENIZED_BLEU_METHOD = (
    "paper-comparable tokenized BLEU: 13a tokenization, compound splitting a-b -> a ##AT##-##AT## b "
    "(tensor2tensor get_ende_bleu.sh), multi-bleu style (cased, no smoothing); NOT comparable with sacreBLEU"
)


def split_compounds(text: str) -> str:
    """tensor2tensor's compound splitting: ``a-b`` -> ``a ##AT##-##AT## b``."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """BLEU on tokenized, compound-split text, as multi-bleu.perl computes it."""
    tokenize = Tokenizer13a()
    prepare = lambda lines: [split_compounds(tokenize(line)) for line in lines]  # noqa: E731
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(prepare(hyps), [prepare(refs)]).score


def score(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """All three scores of ``hyps`` against ``refs`` (one reference per line)."""
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise UserError("nothing to score: no sentences")
    hyps, refs = list(hyps), list(refs)
    bleu, bleu_lc, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    bleu_result = bleu.corpus_score(hyps, [refs])
    lc_result = bleu_lc.corpus_score(hyps, [refs])
    chrf_result = chrf.corpus_score(hyps, [refs])
    return {
        "sentences": len(hyps),
        "bleu": bleu_result.score,
        "bleu_signature": str(bleu.get_signature()),
        "bleu_detail": str(bleu_result),
        "brevity_penalty": bleu_result.bp,  # < 1: the output is shorter than the references
        "bleu_lowercase": lc_result.score,
        "bleu_lowercase_signature": str(bleu_lc.get_signature()),
        "chrf": chrf_result.score,
        "chrf_signature": str(chrf.get_signature()),
        "tokenized_bleu": tokenized_bleu(hyps, refs),
        "tokenized_bleu_method": TOKENIZED_BLEU_METHOD,
    }


def format_report(result: dict) -> str:
    return "\n".join([
        f"{result['bleu_detail']}",
        f"  sacreBLEU (cased, detokenized) signature: {result['bleu_signature']}",
        f"Lowercased BLEU = {result['bleu_lowercase']:.2f}",
        f"  sacreBLEU -lc (13a-tokenized, lowercased: the Multi30k papers' form) signature: {result['bleu_lowercase_signature']}",
        f"chrF2 = {result['chrf']:.2f}",
        f"  sacreBLEU chrF signature: {result['chrf_signature']}",
        f"Tokenized BLEU (paper-comparable) = {result['tokenized_bleu']:.2f}",
        f"  {result['tokenized_bleu_method']}",
        f"sentences: {result['sentences']}",
    ])
