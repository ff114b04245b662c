"""The model side of ``aiayn serve``: settings, translation batches and attention maps.

Everything here runs in the engine's one model thread (`Engine.executor`, which the batcher of
`aiayn.serve.batching` and the attention requests use), never on the event loop. The web layer (`aiayn.serve.app`) validates requests before they get here;
what is still the request's fault at this point (a source too long for the model) is a
`UserError`, which the web layer answers with a 422.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..attention import KINDS, attention_maps
from ..checkpoint import Checkpoint, load_checkpoint
from ..data.text import clean
from ..errors import UserError
from ..translator import Translation, Translator


@dataclass
class ServeSettings:
    """Search defaults, request limits and batching, as set by ``aiayn serve``'s flags."""

    # The search a request gets by default (None: the checkpoint's recommended setting, else the
    # paper's, `aiayn.config.SearchConfig`); a request may ask for another beam (1 ... max_beam).
    beam: int | None = None
    alpha: float | None = None
    max_len_a: float | None = None
    max_len_b: int | None = None
    max_beam: int = 8
    max_lines: int = 64  # lines per /api/translate request
    max_chars: int = 1000  # characters per line (and per attention source or target)
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_batch_lines: int = 64  # lines translated in one search
    device: str | None = None  # None: cuda if available, else cpu
    quantize: str | None = None  # "int8": dynamic int8 Linear layers (CPU)
    shortlist: str | None = None  # a vocabulary shortlist file (aiayn shortlist)

    def check(self) -> ServeSettings:
        """Raise a UserError naming the flag of the first setting out of range."""
        positive = {"--max-beam": self.max_beam, "--max-lines": self.max_lines, "--max-chars": self.max_chars,
                    "--max-batch-lines": self.max_batch_lines}
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value})")
        if self.beam is not None and not 1 <= self.beam <= self.max_beam:
            raise UserError(f"--beam must be between 1 and --max-beam {self.max_beam} (got {self.beam})")
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch-wait-ms must not be negative (got {self.batch_wait_ms})")
        if self.quantize not in (None, "int8"):
            raise UserError(f"unknown --quantize {self.quantize!r}; known: int8")
        if self.quantize and self.device not in (None, "cpu"):
            raise UserError(f"--quantize int8 runs on the CPU only (--device {self.device})")
        return self

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading: max_lines lines of max_chars characters, each
        written as a 6-byte JSON escape at worst, plus room for the rest of the object. Anything
        larger is refused before it is read, so a huge body cannot tie up the server."""
        return self.max_lines * (6 * self.max_chars + 8) + 4096


class Engine:
    """One loaded checkpoint: translates batches and computes attention maps.

    One `Translator` serves every search setting (they are given per call), and the attention
    maps run on its model, so the weights are held once (packed or quantised).
    """

    def __init__(self, checkpoint: Checkpoint | str | Path, settings: ServeSettings | None = None):
        self.settings = (settings or ServeSettings()).check()
        # The one thread that runs every model operation, loading included. torch's OpenMP
        # runtime keeps a team of threads per thread that starts parallel work: a model loaded
        # (packed, quantised) on one thread and searched on another leaves two teams, more
        # threads than a small machine has cores, and libgomp then stops spinning between
        # parallel regions, so every small operation waits for a woken thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiayn-model")
        try:
            self.executor.submit(self._load, checkpoint).result()
        except BaseException:
            self.executor.shutdown(wait=False)
            raise

    def _load(self, checkpoint: Checkpoint | str | Path) -> None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint))
        s = self.settings
        # Only the directory's name (resolved, so that "." has one): /api/info must not reveal
        # the server's file tree.
        self.name = ckpt.path.resolve().name
        self.meta = ckpt.meta
        self.parameters = ckpt.model.num_parameters()  # counted before any quantisation
        self.search = ckpt.search.replace(beam=s.beam, alpha=s.alpha, max_len_a=s.max_len_a,
                                          max_len_b=s.max_len_b).check()
        if self.search.beam > s.max_beam:
            raise UserError(f"the default beam {self.search.beam} is over --max-beam {s.max_beam}")
        self.translator = Translator(ckpt, search=self.search, device=s.device, quantize=s.quantize,
                                     batch_size=s.max_batch_lines, shortlist=s.shortlist)
        self.device = self.translator.device
        self.config = ckpt.model.config
        # The attention maps run on the translator's model (packed or quantised, on its device).
        self.checkpoint = Checkpoint(model=self.translator.model, tokenizer=ckpt.tokenizer, path=ckpt.path,
                                     meta=ckpt.meta)
        self.max_subwords = self.config.max_positions - 1  # room for the EOS / the BOS

    def close(self) -> None:
        """Stop the model thread (after the work already given to it)."""
        self.executor.shutdown(wait=True)

    def translate(self, key: tuple[int, int], lines: list[str]) -> list[list[Translation]]:
        """The batch function of `DynamicBatcher`: key = (beam, nbest)."""
        beam, nbest = key
        return self.translator.translate_nbest(lines, nbest=nbest, search=self.search.replace(beam=beam))

    def attention(self, src: str, tgt: str) -> dict:
        """Tokens and every kind, layer and head of attention for one sentence pair (JSON-ready)."""
        src, tgt = clean(src), clean(tgt)
        tok = self.checkpoint.tokenizer
        for side, text in (("source", src), ("target", tgt)):
            n = len(tok.encode(text))
            if n > self.max_subwords:
                raise UserError(f"the {side} has {n} subwords; this model reads at most {self.max_subwords}")
        maps = attention_maps(self.checkpoint, src, tgt)
        rows_cols = {"encoder": (maps.src_tokens, maps.src_tokens), "decoder": (maps.tgt_tokens, maps.tgt_inputs),
                     "cross": (maps.tgt_tokens, maps.src_tokens)}
        attention = {}
        for kind, title in KINDS.items():
            rows, columns = rows_cols[kind]
            # 4 decimals: finer than a colour map can show, and a third of the JSON of full floats.
            # Rounded in float64: a float32 0.0006 would print as 0.0006000000284984708.
            weights = (maps.weights[kind].double() * 1e4).round() / 1e4
            attention[kind] = {"title": title, "rows": rows, "columns": columns, "weights": weights.tolist()}
        return {"src": src, "tgt": tgt, "src_tokens": maps.src_tokens, "tgt_tokens": maps.tgt_tokens,
                "tgt_inputs": maps.tgt_inputs, "attention": attention}

    def info(self) -> dict:
        cfg = self.config
        s = self.settings
        return {
            "name": "aiayn", "version": __version__,
            "checkpoint": self.name, "step": self.meta.get("step"), "languages": _languages(self.meta),
            "valid": self.meta.get("valid"),
            "model": cfg.to_dict(), "parameters": self.parameters,
            "vocab_size": self.checkpoint.tokenizer.vocab_size,
            "layers": {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers}, "heads": cfg.n_heads,
            "device": str(self.device), "quantize": s.quantize,
            "search": {**asdict(self.search), "shortlist": s.shortlist is not None},  # whether, not where: no paths
            "limits": {"max_lines": s.max_lines, "max_chars": s.max_chars, "max_beam": s.max_beam,
                       "max_subwords": self.max_subwords, "max_body_bytes": s.max_body_bytes},
            "batching": {"batch_wait_ms": s.batch_wait_ms, "max_batch_lines": s.max_batch_lines},
        }


def _languages(meta: dict) -> dict | None:
    """{"src": ..., "tgt": ...} from the checkpoint's meta.json. An averaged checkpoint (aiayn
    average) does not record them itself; its first source checkpoint does, when it is still
    there. Read once at start-up; requests never read files."""
    if isinstance(meta.get("languages"), dict):
        return {"src": meta["languages"].get("src"), "tgt": meta["languages"].get("tgt")}
    sources = meta.get("averaged_from")
    if isinstance(sources, list) and sources:
        try:
            first = json.loads((Path(sources[0]) / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(first.get("languages"), dict):
            return _languages({"languages": first["languages"]})
    return None
