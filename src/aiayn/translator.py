"""Text in, text out: the `Translator` behind ``aiayn translate``, ``evaluate`` and ``serve``.

    prepare_for_inference  the one place that puts a model on its device and chooses its
                           arithmetic and inference layers (oneDNN-packed fp32 or bf16, or int8:
                           `aiayn.inference.packed`)
    Translator             cleans, encodes, batches (by sentences or by padded source tokens),
                           searches (`aiayn.search`, settings per call), decodes, restores order;
                           optionally in several worker processes; streams any number of lines
                           in chunks of `CHUNK_LINES` (`Translator.translate_stream`)

The search settings are a `SearchConfig` given per call; without one, the checkpoint's
recommended settings (`Checkpoint.search`: what its recipe or ``aiayn train`` recorded), else
the paper's. So one Translator serves every beam size and length penalty.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .alignment import Alignment, AlignmentSettings, align_ids
from .checkpoint import Checkpoint, load_checkpoint
from .config import SearchConfig
from .data.text import clean
from .data.tokenizer import EOS_ID
from .errors import UserError
from .inference import packed
from .inference.packed import pack_for_inference, quantize_int8, use_bf16_products
from .inference.shortlist import Shortlist
from .precision import resolve_precision
from .progress import progress_bar
from .search import Hypothesis, search

log = logging.getLogger(__name__)

QUANTIZE = ("int8",)

CHUNK_LINES = 10_000
"""Lines a translation reads, encodes, sorts longest first and batches at a time
(`Translator.translate_stream`): memory is bounded by one chunk's text, ids and translations,
whatever the input's length. Sorting within a chunk this large leaves little padding: batches of
the default 64 sentences are drawn from 10,000 sorted lengths (156 batches a chunk), so
neighbours in a batch differ by a subword or so, as when the whole input is sorted."""


def resolve_device(device: str | torch.device | None, quantize: str | None = None) -> torch.device:
    """The device to run on: ``device`` checked against this machine and this torch build
    (a `UserError` that says what is available otherwise); None: cuda if available (and no
    int8, which runs on the CPU only), else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and quantize is None else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu or cuda (cuda:N for a GPU of several)") from None
    if quantize is not None and dev.type != "cpu":
        raise UserError(f"int8 quantisation runs on the CPU only (device {device!r})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"device {device!r} is not available: {why}; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} is not available: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        if dev.type == "mps" and torch.backends.mps.is_available():
            return dev
        raise UserError(f"device {device!r} is not supported here; use cpu or cuda")
    return dev


def inference_precision(precision: str, device: torch.device, quantize: str | None = None) -> str:
    """The resolved precision of a model searched on ``device`` (`aiayn.precision.resolve_precision`).
    int8 models compute their activations in fp32: with ``quantize``, auto is fp32 and a forced
    bf16 is a `UserError`."""
    if quantize is not None:
        if precision == "bf16":
            raise UserError("int8 quantisation and precision bf16 exclude each other; choose one")
        resolve_precision(precision, device)  # checks the name
        return "fp32"
    return resolve_precision(precision, device)


def prepare_for_inference(model: nn.Module, device: torch.device, *, quantize: str | None = None,
                          precision: str = "fp32", prepack: bool = True, inplace: bool = False) -> nn.Module:
    """``model`` ready to search on ``device``: moved there, then quantised to int8
    (``quantize="int8"``, CPU only), or with its linear products in ``precision`` (resolved:
    "fp32" or "bf16", `inference_precision`; bf16 rounds each product's inputs, everything else
    stays fp32: `aiayn.inference.packed`), its CPU weights prepacked for oneDNN (``prepack``;
    the same function with faster matrix products). Without ``inplace`` the caller's model is
    not changed (quantising always copies)."""
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"unknown quantisation {quantize!r}; known: {', '.join(QUANTIZE)}")
    if quantize is not None and device.type != "cpu":
        raise UserError(f"int8 quantisation runs on the CPU only (device {device})")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"prepare_for_inference takes a resolved precision, fp32 or bf16 (got {precision!r})")
    if quantize == "int8":
        try:
            return quantize_int8(model.to("cpu") if inplace else model)
        except RuntimeError as e:
            raise UserError(str(e)) from None
    if inplace or next(model.parameters()).device == device:
        model = model.to(device)
    else:
        import copy

        model = copy.deepcopy(model).to(device)
        inplace = True
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if prepack and device.type == "cpu" and packed.onednn_available(dtype):
        model = pack_for_inference(model, inplace=inplace, dtype=dtype)
    elif precision == "bf16":
        model = use_bf16_products(model, inplace=inplace)
    return model.eval() if inplace else model


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for a block, then restored (None: unchanged).
    The setting is process-wide: concurrent translations in one process share it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Translation:
    text: str
    tokens: list[int]
    score: float  # log_prob / lp(|Y|); 0 for an empty input line
    log_prob: float
    alignment: Alignment | None = None  # its word alignment to the source, when asked for (aiayn.alignment)


class Translator:
    """Translate lines of text with a checkpoint (a `Checkpoint` or its directory).

    Inputs are read in chunks of `CHUNK_LINES` lines (`translate_stream`; memory is one chunk's,
    whatever the input's length); each chunk is cleaned (NFC, single spaces) and encoded, sorted
    longest first and batched by ``batch_size`` sentences or, when ``batch_tokens`` is given
    instead, by that many padded source tokens; outputs come back in input order. An empty line translates to an empty line.
    A source longer than ``max_src_len`` subwords (default ``config.max_positions - 1``, room for
    the EOS) is truncated with a warning. ``threads``: torch's intra-op threads while translating
    (default: unchanged). ``workers`` > 1 (CPU): that many worker processes translate different
    batches at once, each on ``threads`` threads (default 1), like CTranslate2's
    ``inter_threads``; a small model gains most, as its batches are too small to keep several
    threads busy. ``precision``: auto (bf16 where the device does bf16 natively, else fp32),
    fp32 or bf16, resolved once (``self.precision``). ``prepack`` and ``quantize``:
    `prepare_for_inference`. ``shortlist``: a
    vocabulary shortlist file (`aiayn.inference.shortlist`, built by ``aiayn shortlist``): each
    sentence's outputs are restricted to its candidates, which is faster and changes scores (P
    normalised over them). ``search``: the default `SearchConfig` of every call (None: the
    checkpoint's recommended settings). Every translation is one line of text: byte pieces that
    spell a newline or another control character become spaces (`Tokenizer.decode_line`), so
    output line i is always the translation of input line i.
    """

    def __init__(self, checkpoint: Checkpoint | str | Path, *, search: SearchConfig | None = None,
                 device: str | torch.device | None = None, quantize: str | None = None, precision: str = "auto",
                 prepack: bool = True,
                 batch_size: int = 64, batch_tokens: int | None = None, max_src_len: int | None = None,
                 threads: int | None = None, workers: int = 1, shortlist: str | Path | None = None):
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1 (got {threads})")
        if workers < 1:
            raise UserError(f"workers must be at least 1 (got {workers})")
        if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
            raise UserError("the batch size and the batch's token budget must be positive")
        self.device = resolve_device(device, quantize)
        self.precision = inference_precision(precision, self.device, quantize)
        owned = not isinstance(checkpoint, Checkpoint)  # loaded here: nobody else holds the model
        if workers > 1 and not owned:
            raise UserError("workers > 1 needs the checkpoint's path (each worker process loads it)")
        if workers > 1 and self.device.type != "cpu":
            raise UserError(f"worker processes run on the CPU only (device {self.device})")
        ckpt = load_checkpoint(Path(checkpoint)) if owned else checkpoint
        self.search_config = (search or ckpt.search).check()
        self.shortlist = None
        if shortlist is not None:  # read and checked before any model work
            self.shortlist = Shortlist.load(shortlist)
            self.shortlist.check(ckpt.tokenizer, path=shortlist)
        # The searches switch to eval mode (and back) themselves; a model loaded here is changed in place.
        self.model = prepare_for_inference(ckpt.model, self.device, quantize=quantize, precision=self.precision,
                                           prepack=prepack, inplace=owned)
        self.tokenizer, self.config, self.checkpoint_path = ckpt.tokenizer, ckpt.model.config, ckpt.path
        self.threads = threads
        # Worker processes (started on first use): each builds this Translator with workers=1.
        self.workers, self._pool = workers, None
        self._worker_args = dict(checkpoint=str(checkpoint), device="cpu", quantize=quantize, precision=self.precision,
                                 max_src_len=max_src_len,
                                 threads=threads or 1, prepack=prepack,
                                 shortlist=None if shortlist is None else str(shortlist))
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.max_src_len = max_src_len or self.config.max_positions - 1

    def translate(self, lines: Sequence[str], search: SearchConfig | None = None, progress: bool = False) -> list[str]:
        """The best translation of each line, in input order."""
        return [n[0].text for n in self.translate_nbest(lines, nbest=1, search=search, progress=progress)]

    def encode(self, lines: Sequence[str], first_line: int = 1) -> list[list[int]]:
        """Source ids of each line (cleaned), truncated to ``max_src_len`` with a warning that
        names the input line (``lines[0]`` is input line ``first_line``)."""
        ids = self.tokenizer.encode_batch([clean(line) for line in lines]) if lines else []
        for index, sentence in enumerate(ids):
            if len(sentence) > self.max_src_len:
                log.warning("aiayn: warning: input line %d has %d subwords; translating only the first %d",
                            first_line + index, len(sentence), self.max_src_len)
                ids[index] = sentence[: self.max_src_len]
        return ids

    def translate_nbest(self, lines: Sequence[str], nbest: int = 1, search: SearchConfig | None = None,
                        progress: bool = False, chunk: int | None = None,
                        alignment: AlignmentSettings | None = None) -> list[list[Translation]]:
        """The ``nbest`` best translations of each line, best first, in input order:
        `translate_stream` over the list, its chunks joined (the same batches, so the same
        translations, as ``aiayn translate`` of the same lines)."""
        stream = self.translate_stream(lines, nbest=nbest, search=search, chunk=chunk, progress=progress,
                                       total=len(lines), alignment=alignment)
        return [hyps for block in stream for hyps in block]

    def translate_stream(self, lines: Iterable[str], nbest: int = 1, search: SearchConfig | None = None, *,
                         chunk: int | None = None, progress: bool = False,
                         total: int | None = None,
                         alignment: AlignmentSettings | None = None) -> Iterator[list[list[Translation]]]:
        """Translate ``lines`` (any iterable, read as needed) ``chunk`` lines at a time: yields, for
        each chunk in turn, the ``nbest`` best translations of each of its lines (best first, in
        input order) as soon as that chunk is done. ``chunk`` None: `CHUNK_LINES`. Memory is one
        chunk's worth, whatever the input's length.

        Each chunk is encoded, sorted longest first, batched (`_batches`) and searched (in the
        worker processes if ``workers`` > 1); sorting only within a chunk is the one difference
        from sorting the whole input, and with the default `CHUNK_LINES` it costs little padding.
        The iterable is not read ahead of the chunk being translated, so an exception it raises
        (a bad line of a file: `aiayn.data.text.iter_input_lines`) comes after every earlier chunk
        was yielded. Truncation warnings name the line's number in the whole input. ``progress``:
        a bar over the lines (empty ones too), of ``total`` lines if given, else open-ended.
        ``search`` and ``nbest`` are checked now, before any line is read. ``alignment``: each
        translation also gets its word alignment to its (cleaned, possibly truncated) source
        (`Translation.alignment`), read from the attention these settings choose
        (`aiayn.alignment`; one teacher-forced pass of the model over each batch's outputs)."""
        config = (search or self.search_config).check()
        if alignment is not None:
            alignment.check(self.config.n_decoder_layers, self.config.n_heads)
        if not 1 <= nbest <= config.beam:
            raise UserError(f"nbest must be between 1 and the beam size {config.beam} (got {nbest})")
        chunk = CHUNK_LINES if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 line (got {chunk})")
        return self._stream(iter(lines), nbest, config, chunk, progress, total, alignment)

    def _stream(self, lines: Iterator[str], nbest: int, config: SearchConfig, chunk: int, progress: bool,
                total: int | None, alignment: AlignmentSettings | None) -> Iterator[list[list[Translation]]]:
        first_line = 1
        with progress_bar(total, "translate", "sent", enabled=progress) as bar:
            while block := list(itertools.islice(lines, chunk)):
                yield self._translate_chunk(block, nbest, config, first_line, bar, alignment)
                first_line += len(block)

    def _translate_chunk(self, lines: list[str], nbest: int, config: SearchConfig, first_line: int,
                         bar, alignment: AlignmentSettings | None = None) -> list[list[Translation]]:
        """One chunk: encode, sort longest first, batch, search, decode, in input order."""
        ids = self.encode(lines, first_line=first_line)
        results: list[list[Translation]] = [[Translation("", [], 0.0, 0.0)] for _ in ids]
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        batches = list(self._batches(order, ids))
        if self.workers > 1 and len(batches) > 1:
            pool = self._worker_pool()
            searched = (f.result() for f in [pool.submit(_worker_search, [ids[i] for i in batch], nbest, config)
                                             for batch in batches])
        else:
            searched = (self.search_ids([ids[i] for i in batch], nbest, config) for batch in batches)
        # The thread count is set only while this chunk is searched, not while the caller holds the stream.
        with _torch_threads(self.threads):
            for batch, hyps_of_batch in zip(batches, searched):
                for i, hyps in zip(batch, hyps_of_batch):
                    results[i] = [Translation(self.tokenizer.decode_line(h.tokens), h.tokens, h.score, h.log_prob)
                                  for h in hyps]
                if alignment is not None:
                    self._align([ids[i] for i in batch], [results[i] for i in batch], alignment)
                bar.update(len(batch))
        if alignment is not None:  # the empty lines: nothing to align
            for i in range(len(ids)):
                if not ids[i]:
                    results[i][0].alignment = Alignment([], [], [], [])
        bar.update(len(ids) - len(order))  # the empty lines
        return results

    def _align(self, sources: list[list[int]], translations: list[list[Translation]],
               settings: AlignmentSettings) -> None:
        """Set the alignment of every translation of a batch (all n best of each source)."""
        pairs = [(src, t) for src, ts in zip(sources, translations) for t in ts]
        found = align_ids(self.model, self.tokenizer, [src for src, _ in pairs], [t.tokens for _, t in pairs],
                          settings)
        for (_, t), a in zip(pairs, found):
            t.alignment = a

    def _worker_pool(self):
        """``workers`` processes, each with its own copy of the model. Spawned, not forked: a fork of a
        process whose OpenMP threads are running is unsafe. They inherit the environment (the same
        memory allocator) and end with this Translator (`close`) or with the process."""
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self._worker_args,))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes, if any (a later translation starts them again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _batches(self, order: list[int], ids: list[list[int]]) -> Iterator[list[int]]:
        """Consecutive runs of ``order`` (longest first) within the token budget, if one is
        given, else within the sentence count."""
        batch: list[int] = []
        for i in order:
            if batch:
                longest = len(ids[batch[0]]) + 1  # + EOS; the first is the longest
                full = ((len(batch) + 1) * longest > self.batch_tokens if self.batch_tokens is not None
                        else len(batch) >= self.batch_size)
                if full:
                    yield batch
                    batch = []
            batch.append(i)
        if batch:
            yield batch

    def search_ids(self, sentences: list[list[int]], nbest: int = 1,
                   config: SearchConfig | None = None) -> list[list[Hypothesis]]:
        """Search a batch of encoded sentences (subword ids without EOS)."""
        src = torch.full((len(sentences), max(map(len, sentences)) + 1), self.config.pad_id, dtype=torch.long)
        for row, sentence in enumerate(sentences):
            src[row, : len(sentence) + 1] = torch.tensor(sentence + [EOS_ID])
        return search(self.model, src.to(self.device), config or self.search_config, nbest, shortlist=self.shortlist)


_WORKER: Translator | None = None  # in a worker process: its own Translator


def _worker_init(kwargs: dict) -> None:
    global _WORKER
    torch.set_num_threads(kwargs["threads"])
    _WORKER = Translator(**kwargs)


def _worker_search(sentences: list[list[int]], nbest: int, config: SearchConfig) -> list[list[Hypothesis]]:
    return _WORKER.search_ids(sentences, nbest, config)

