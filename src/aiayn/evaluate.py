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

Scoring streams (`Scorer`): every one of these metrics is a function of statistics summed over
the sentences (n-gram matches and totals, lengths: integers), so a `Scorer` fed a chunk of lines
at a time keeps only those sums, computed by sacreBLEU's own per-sentence code, and its result
equals sacreBLEU's ``corpus_score`` over the whole lists exactly. `score` of two lists is a
`Scorer` fed `CHUNK_LINES` at a time; ``aiayn evaluate`` feeds it from the files as they are read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from .errors import UserError

# Perl's s///g scans left to right without overlap, as re.sub does: "a-b-c" -> "a ##AT##-##AT## b-c".
_COMPOUND = re.compile(r"(\S)-(\S)")
CHUNK_LINES = 10_000  # lines scored at a time by `score` and ``aiayn evaluate``: memory is one chunk's n-grams
TOKENIZED_BLEU_METHOD = (
    "paper-comparable tokenized BLEU: 13a tokenization, compound splitting a-b -> a ##AT##-##AT## b "
    "(tensor2tensor get_ende_bleu.sh), multi-bleu style (cased, no smoothing); NOT comparable with sacreBLEU"
)


def split_compounds(text: str) -> str:
    """tensor2tensor's compound splitting: ``a-b`` -> ``a ##AT##-##AT## b``."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def _tokenized_form(lines: Sequence[str], tokenize: Tokenizer13a) -> list[str]:
    """Lines as the paper-comparable BLEU sees them: 13a-tokenized, compounds split."""
    return [split_compounds(tokenize(line)) for line in lines]


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """BLEU on tokenized, compound-split text, as multi-bleu.perl computes it."""
    tokenize = Tokenizer13a()
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(_tokenized_form(hyps, tokenize), [_tokenized_form(refs, tokenize)]).score


class Scorer:
    """The scores of `score`, fed any number of chunks: ``add(hyps, refs)`` for each chunk of
    lines (one reference per line), then ``result()``. Memory is a few dozen summed integers per
    metric plus one chunk's n-grams while it is added, whatever the number of lines.

    sacreBLEU's metrics are sums over sentences: ``corpus_score`` computes each sentence's
    statistics (`Metric._extract_corpus_statistics`), sums them, and computes the score from the
    sums (`Metric._compute_score_from_stats`). A Scorer calls the same two functions, summing
    chunk by chunk, so every figure (scores, brevity penalty, the n-gram counts in the detail
    line, the signatures) equals ``corpus_score`` over all the lines at once. sacreBLEU's warning
    about hypotheses that end in a tokenized period (" .") is given once, for the whole corpus.
    """

    def __init__(self) -> None:
        self._bleu, self._bleu_lc, self._chrf = BLEU(), BLEU(lowercase=True), CHRF()
        self._tokenized = BLEU(tokenize="none", smooth_method="none", force=True)
        # The tokenized-period check counts over the whole corpus here (`result`), not per chunk.
        self._bleu._force = self._bleu_lc._force = True
        self._tokenize = Tokenizer13a()
        self._sums: dict[str, list | None] = {"bleu": None, "bleu_lc": None, "chrf": None, "tokenized": None}
        self.sentences = 0
        self._tokenized_periods = 0

    def add(self, hyps: Sequence[str], refs: Sequence[str]) -> None:
        """Score one more chunk: ``hyps[i]`` against ``refs[i]``."""
        if len(hyps) != len(refs):
            raise UserError(f"{len(hyps)} hypotheses but {len(refs)} references")
        if not hyps:
            return
        hyps, refs = list(hyps), list(refs)
        tokenized_hyps, tokenized_refs = _tokenized_form(hyps, self._tokenize), _tokenized_form(refs, self._tokenize)
        for name, metric, h, r in (("bleu", self._bleu, hyps, refs), ("bleu_lc", self._bleu_lc, hyps, refs),
                                   ("chrf", self._chrf, hyps, refs),
                                   ("tokenized", self._tokenized, tokenized_hyps, tokenized_refs)):
            metric._check_corpus_score_args(h, [r])
            total = self._sums[name]
            for stats in metric._extract_corpus_statistics(h, [r]):
                if total is None:
                    total = list(stats)
                else:
                    for k, value in enumerate(stats):
                        total[k] += value
            self._sums[name] = total
        self.sentences += len(hyps)
        self._tokenized_periods += sum(hyp.endswith(" .") for hyp in hyps)

    def result(self) -> dict:
        """All three scores of the lines added so far (`score`'s dict)."""
        if not self.sentences:
            raise UserError("nothing to score: no sentences")
        if self._tokenized_periods >= 100:  # sacreBLEU's own warning, as corpus_score gives it
            log = logging.getLogger("sacrebleu")
            log.warning("That's 100 lines that end in a tokenized period ('.')")
            log.warning("It looks like you forgot to detokenize your test data, which may hurt your score.")
            log.warning("If you insist your data is detokenized, or don't care, you can suppress this message "
                        "with the `force` parameter.")
        bleu_result = self._bleu._compute_score_from_stats(list(self._sums["bleu"]))
        lc_result = self._bleu_lc._compute_score_from_stats(list(self._sums["bleu_lc"]))
        chrf_result = self._chrf._compute_score_from_stats(list(self._sums["chrf"]))
        tokenized_result = self._tokenized._compute_score_from_stats(list(self._sums["tokenized"]))
        return {
            "sentences": self.sentences,
            "bleu": bleu_result.score,
            "bleu_signature": str(self._bleu.get_signature()),
            "bleu_detail": str(bleu_result),
            "brevity_penalty": bleu_result.bp,  # < 1: the output is shorter than the references
            "bleu_lowercase": lc_result.score,
            "bleu_lowercase_signature": str(self._bleu_lc.get_signature()),
            "chrf": chrf_result.score,
            "chrf_signature": str(self._chrf.get_signature()),
            "tokenized_bleu": tokenized_result.score,
            "tokenized_bleu_method": TOKENIZED_BLEU_METHOD,
        }


def score(hyps: Sequence[str], refs: Sequence[str], chunk: int = CHUNK_LINES) -> dict:
    """All three scores of ``hyps`` against ``refs`` (one reference per line): a `Scorer` fed
    ``chunk`` lines at a time (the result does not depend on ``chunk``)."""
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise UserError("nothing to score: no sentences")
    scorer = Scorer()
    for start in range(0, len(hyps), chunk):
        scorer.add(hyps[start:start + chunk], refs[start:start + chunk])
    return scorer.result()


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
        *(["this model writes lowercased text (its data was prepared with --lowercase): "
           "its score is the lowercased BLEU"] if result.get("lowercased_model") else []),
    ])
