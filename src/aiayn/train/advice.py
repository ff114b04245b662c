"""What a run tells its user: which limit stops it, warnings about a recipe that cannot work on
the data, and the commands to continue.

Which limit stops a run. ``max_updates`` and ``max_epochs`` end at an update known in advance
(an epoch's update count is ``micro-batches per epoch / update_freq``; the batches of an epoch
differ a little from epoch to epoch, so it is an estimate); whichever of the two comes first
(by more than 5%) is the one named. ``max_minutes`` and ``patience`` depend on the machine and
on the model, so they are named beside it ("whichever comes first"); under a time budget the
trainer projects, after its first updates, the update at which the budget ends.

A vocabulary too large for the data. Every subword has an embedding row (tied with the output
layer's, §3.4) that learns only from the tokens that use it. Below `MIN_TOKENS_PER_SUBWORD`
training tokens (source and target together) per vocabulary entry most entries are seen a handful
of times. Counted on Multi30k: the corpus of configs/multi30k.yaml (29k pairs) with the joint 8k
vocabulary has 106 tokens per subword, the median subword occurring 22 times; its first 3,000
pairs with the same 8k vocabulary have 10.5 (median 2; 75% of the subwords occur fewer than 5
times), with a 4k vocabulary 23.5 (median 7) and with a 2k one 55 (median 20, like the full
corpus with 8k). Sennrich & Zhang (2019, "Revisiting Low-Resource Neural Machine Translation")
likewise shrink the BPE vocabulary with the training data.

A budget that ends inside the warm-up. The learning rate rises linearly for ``warmup`` updates
(§5.3); a run that stops before that has not trained at its intended rate at all.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import TrainConfig

MIN_TOKENS_PER_SUBWORD = 50
# The first estimate of a time budget's end: after PACE_UPDATES updates of this session and
# PACE_SECONDS of training (or PACE_SHARE of the budget left, if that is less).
PACE_UPDATES, PACE_SECONDS, PACE_SHARE = 10, 30.0, 0.05


def warn(text: str | None) -> None:
    """One line on standard error, ``aiayn: warning: TEXT`` (nothing for None)."""
    if text:
        print(f"aiayn: warning: {text}", file=sys.stderr, flush=True)


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def stop_limits(tc: TrainConfig, *, epochs_end: int | None = None, elapsed_s: float = 0.0) -> str:
    """'stops at update 200 or after 10 minutes, whichever comes first': the limits that can end
    the run. ``epochs_end``: the update at which ``max_epochs`` ends (an estimate; None without
    an epoch limit); ``elapsed_s``: training time already spent (a resumed run)."""
    parts = []
    updates_first = epochs_end is None or tc.max_updates <= 0.95 * epochs_end
    epochs_first = epochs_end is not None and epochs_end <= 0.95 * tc.max_updates
    if not epochs_first:
        parts.append(f"at update {tc.max_updates}")
    if tc.max_epochs and not updates_first:
        parts.append(f"after {_plural(tc.max_epochs, 'epoch')} (about update {epochs_end})")
    if tc.max_minutes > 0:
        spent = f" of training ({elapsed_s / 60:.1f} done)" if elapsed_s > 0 else ""
        parts.append(f"after {_plural(tc.max_minutes, 'minute')}{spent}")
    if tc.patience > 0:
        row = " in a row" if tc.patience > 1 else ""
        parts.append(f"after {_plural(tc.patience, 'validation')}{row} without a better BLEU")
    if len(parts) == 1:
        return f"stops {parts[0]}"
    return f"stops {', '.join(parts[:-1])} or {parts[-1]}, whichever comes first"


def cooldown_line(tc: TrainConfig, *, epochs_end: int | None = None) -> tuple[str, str | None]:
    """What train.cooldown does in this run (``tc.cooldown`` > 0): the line that says it, and a
    warning when max_epochs ends the run before the rate reaches zero (None otherwise)."""
    budget = f"update {tc.max_updates}"
    if tc.max_minutes > 0:
        budget += f" or {_plural(tc.max_minutes, 'minute')}, whichever ends first"
    line = (f"the learning rate falls linearly to zero over the last {tc.cooldown:.0%} of the budget "
            f"({budget}; train.cooldown={tc.cooldown:g})")
    warning = None
    if epochs_end is not None and epochs_end <= 0.95 * tc.max_updates and tc.max_minutes <= 0:
        warning = (f"max_epochs ends the run near update {epochs_end}, before the cool-down (which counts "
                   f"max_updates={tc.max_updates}) brings the rate to zero; set train.max_updates to the run's "
                   "length instead")
    return line, warning


def vocabulary_warning(vocab_size: int, train_tokens: int) -> str | None:
    """The warning for a vocabulary with fewer than `MIN_TOKENS_PER_SUBWORD` training tokens
    (both sides) per entry, else None."""
    if train_tokens >= MIN_TOKENS_PER_SUBWORD * vocab_size:
        return None
    per = train_tokens / max(vocab_size, 1)
    smaller = train_tokens // MIN_TOKENS_PER_SUBWORD // 100 * 100
    size = f" (at most about {smaller} here)" if 100 <= smaller < vocab_size else ""
    return (f"the vocabulary has {vocab_size} subwords for {train_tokens} training tokens ({per:.1f} per subword, "
            f"fewer than {MIN_TOKENS_PER_SUBWORD}): most subwords occur too rarely to be learned; prepare the data "
            f"with a smaller --vocab-size{size}; a recipe for small corpora: aiayn train --config small-data")


def warmup_warning(end_update: int, warmup: int, what: str) -> str | None:
    """The warning for a run that ends (at ``end_update``, described by ``what``) inside the
    learning-rate warm-up, else None."""
    if end_update > warmup:
        return None
    return (f"{what}, inside the learning-rate warm-up (train.warmup={warmup}): the learning rate is still rising "
            "when training stops, and a model trained this little may translate nothing; lower the warm-up (e.g. "
            f"train.warmup={max(1, end_update // 4)}, a quarter of the run) or train for longer")


def resume_command(config: str | Path, data: str | Path, out: str | Path, overrides: Sequence[str], *,
                   has_checkpoint: bool = True, world_size: int = 1, local_world_size: int = 1,
                   init: str | Path | None = None) -> str:
    """The command that continues a run (``--resume``), or starts it again where it has no
    checkpoint to continue from (``--force``); under torchrun on one machine, the torchrun
    command (several machines: the aiayn part, which each machine's launch runs)."""
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out),
            "--resume" if has_checkpoint else "--force", *(["--init", str(init)] if init is not None else []),
            *overrides]
    if world_size > 1 and local_world_size == world_size:
        return shlex.join(["torchrun", "--standalone", f"--nproc_per_node={world_size}", "-m", "aiayn", *args])
    return shlex.join(["aiayn", *args])
