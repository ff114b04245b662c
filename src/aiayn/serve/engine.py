"""The model side of ``aiayn serve``: settings, translation batches and attention maps.

The model runs in the engine's one thread (`Engine.executor`, which the batcher of
`aiayn.serve.batching` and the attention requests use), never on the event loop; only
`Engine.check_subwords` (the tokenizer, no model) runs on the loop, so a request too long for
the model is refused before it waits for a search. The web layer (`aiayn.serve.app`)
validates requests before they get here; what is still the request's fault at this point is a
`UserError`, which the web layer answers with a 422.

Word alignments (`Engine.align_translations`, and the ``alignment`` of `Engine.attention`) are
read off the model's encoder-decoder attention with `aiayn.alignment`'s default settings,
teacher-forced on the model thread. ``--heads FILE`` (`ServeSettings.heads`) names a heads.json
written by ``aiayn heads`` for the checkpoint: it is read and checked against the model once, at
start-up (`read_heads`), `Engine.info` passes on its roles and best alignment layer, and when it
measured the heads against reference alignments (``alignment_best``), alignments are read from
that layer and head instead of the defaults.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..alignment import AlignmentSettings, align_ids
from ..attention import KINDS, attention_maps
from ..checkpoint import Checkpoint, load_checkpoint
from ..config import PRECISIONS, SearchConfig
from ..data.text import clean
from ..errors import UserError
from ..translator import Translation, Translator

# The largest length penalty exponent a search may use. GNMT's tuned values are 0.2 to 1; far
# beyond any useful one, ((5 + |Y|) / 6) ** alpha would overflow a float for long outputs.
MAX_ALPHA = 10.0


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` if it is a finite number from 0 to `MAX_ALPHA`, else a UserError naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 <= alpha <= MAX_ALPHA:
        raise UserError(f"{name} must be a number from 0 to {MAX_ALPHA:g} (got {alpha!r})")
    return float(alpha)


@dataclass
class ServeSettings:
    """Search defaults, request limits and batching of a server (``aiayn serve``'s flags map
    one to one onto these fields: --max-beam is max_beam)."""

    # The search a request gets by default (None: the checkpoint's recommended setting, else the
    # paper's, `aiayn.config.SearchConfig`); a request may ask for another beam (1 ... max_beam)
    # and alpha.
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
    precision: str = "auto"  # auto: bf16 where the device does bf16 natively, else fp32 (aiayn.precision)
    shortlist: str | None = None  # a vocabulary shortlist file (aiayn shortlist)
    heads: str | None = None  # a heads.json of this checkpoint (aiayn heads): roles and best alignment layer

    def check(self, name: Callable[[str], str] = str) -> ServeSettings:
        """Raise a UserError for the first setting out of range, naming it by its field
        ("max_beam must be at least 1"), or by ``name(field)`` (``aiayn serve`` passes one that
        gives its flags: --max-beam). Returns self."""
        for field in ("max_beam", "max_lines", "max_chars", "max_batch_lines"):
            value = getattr(self, field)
            if value < 1:
                raise UserError(f"{name(field)} must be at least 1 (got {value})")
        if self.beam is not None and not 1 <= self.beam <= self.max_beam:
            raise UserError(f"{name('beam')} must be between 1 and {name('max_beam')} {self.max_beam} "
                            f"(got {self.beam})")
        if self.alpha is not None:
            check_alpha(self.alpha, name("alpha"))
        if not self.batch_wait_ms >= 0:  # NaN included
            raise UserError(f"{name('batch_wait_ms')} must not be negative (got {self.batch_wait_ms})")
        if self.quantize not in (None, "int8"):
            raise UserError(f"unknown {name('quantize')} {self.quantize!r}; known: int8")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown {name('precision')} {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.quantize and self.device not in (None, "cpu"):
            raise UserError(f"{name('quantize')} int8 runs on the CPU only ({name('device')} {self.device})")
        return self

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading; anything larger is refused before it is read,
        so a huge body cannot tie up the server. It is an upper bound of every request within
        the other limits: max_lines lines (or an attention request's src and tgt) of max_chars
        characters, each written as JSON escapes at worst: 12 bytes for a character outside the
        BMP ("\\ud83d\\ude00", as json.dumps writes it; Python counts it as one character), 6
        for any other. Each string adds its quotes, a comma and some spacing (16 bytes), and
        the rest of the object (field names, beam, nbest, alpha, spacing) fits in 4096."""
        return max(self.max_lines, 2) * (12 * self.max_chars + 16) + 4096


class Engine:
    """One loaded checkpoint: translates batches and computes attention maps.

    One `Translator` serves every search setting (they are given per call), and the attention
    maps run on its model, so the weights are held once (packed or quantised).
    """

    def __init__(self, checkpoint: Checkpoint | str | Path, settings: ServeSettings | None = None):
        self.settings = (settings or ServeSettings()).check()
        if self.settings.heads is not None and not Path(self.settings.heads).is_file():
            # Before the model loads: a wrong path fails fast.
            raise UserError("heads file not found (write one with aiayn heads)", path=self.settings.heads)
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
        # Checked against the model before the translator is built: a wrong file fails fast.
        self.heads = read_heads(s.heads, ckpt.model.config) if s.heads is not None else None
        # Only the directory's name (resolved, so that "." has one): /api/info must not reveal
        # the server's file tree.
        self.name = ckpt.path.resolve().name
        self.meta = ckpt.meta
        self.parameters = ckpt.model.num_parameters()  # counted before any quantisation
        # The default search: the checkpoint's recommended one, with the settings given.
        self.search = ckpt.search.replace(beam=s.beam, alpha=s.alpha, max_len_a=s.max_len_a,
                                          max_len_b=s.max_len_b).check()
        check_alpha(self.search.alpha, "the default alpha")
        if self.search.beam > s.max_beam:
            raise UserError(f"the checkpoint's recommended beam {self.search.beam} is over max_beam "
                            f"{s.max_beam}: choose a beam, or a larger max_beam")
        self.translator = Translator(ckpt, search=self.search, device=s.device, quantize=s.quantize,
                                     precision=s.precision, batch_size=s.max_batch_lines, shortlist=s.shortlist)
        self.device = self.translator.device
        self.config = ckpt.model.config
        self.tokenizer = ckpt.tokenizer
        # The attention maps run on the translator's model (packed or quantised, on its device).
        self.checkpoint = Checkpoint(model=self.translator.model, tokenizer=ckpt.tokenizer, path=ckpt.path,
                                     meta=ckpt.meta)
        self.max_subwords = self.config.max_positions - 1  # room for the EOS / the BOS
        # Word alignments: aiayn.alignment's defaults, or the layer and head that agreed best with a
        # reference aligner when the heads file measured one (checked against this decoder).
        best = self.heads["alignment_best"] if self.heads else None
        chosen = AlignmentSettings(layer=best["layer"], head=best["head"]) if best else AlignmentSettings()
        self.alignment_settings = chosen.check(self.config.n_decoder_layers, self.config.n_heads)

    def close(self) -> None:
        """Stop the model thread (after the work already given to it)."""
        self.executor.shutdown(wait=True)

    def check_subwords(self, texts: Sequence[str], names: Sequence[str]) -> None:
        """A UserError naming the first text (by its name in ``names``) longer than the model
        reads: the `Translator` would cut it short, and the attention maps cannot hold it.
        Texts are counted as they will be read (cleaned, then encoded)."""
        counts = [len(ids) for ids in self.tokenizer.encode_batch([clean(t) for t in texts])] if texts else []
        for name, n in zip(names, counts):
            if n > self.max_subwords:
                raise UserError(f"{name} has {n} subwords; this model reads at most {self.max_subwords} "
                                "(max_subwords)")

    def translate(self, key: tuple[SearchConfig, int], lines: list[str]) -> list[list[Translation]]:
        """The batch function of `DynamicBatcher`: key = (search, nbest), so requests with
        different search settings never share a batch."""
        search, nbest = key
        return self.translator.translate_nbest(lines, nbest=nbest, search=search)

    # Pairs teacher-forced at once when aligning: a (B, h, T, S) map per decoder layer is kept.
    ALIGN_BATCH = 32

    def align(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[dict]:
        """`aiayn.alignment.Alignment.to_dict` of each (source ids, target ids) pair (ids without
        BOS/EOS), teacher-forced through the served model with the default settings
        (`alignment_settings`). Pairs are batched by length, `ALIGN_BATCH` at a time."""
        order = sorted(range(len(sources)), key=lambda i: (len(sources[i]), len(targets[i])))
        out: list[dict | None] = [None] * len(sources)
        for start in range(0, len(order), self.ALIGN_BATCH):
            chunk = order[start: start + self.ALIGN_BATCH]
            found = align_ids(self.translator.model, self.tokenizer, [list(sources[i]) for i in chunk],
                              [list(targets[i]) for i in chunk], self.alignment_settings)
            for i, alignment in zip(chunk, found):
                out[i] = alignment.to_dict()
        return out

    def align_translations(self, lines: Sequence[str], results: Sequence[Sequence[Translation]]) -> list[list[dict]]:
        """The alignment of every candidate in ``results`` (as `translate` gives them, one list
        per line) against its line: the source as the translator read it (cleaned, encoded),
        the candidate's own tokens as the target."""
        source_ids = self.translator.encode(list(lines))  # the ids the search read
        sources = [source_ids[n] for n, hyps in enumerate(results) for _ in hyps]
        targets = [h.tokens for hyps in results for h in hyps]
        flat = iter(self.align(sources, targets))
        return [[next(flat) for _ in hyps] for hyps in results]

    def attention(self, src: str, tgt: str, tgt_ids: list[int] | None = None) -> dict:
        """Tokens and every kind, layer and head of attention for one sentence pair, and its
        word alignment (default settings; JSON-ready). The target is ``tgt_ids`` when given (a
        search's own tokens; ``tgt`` is then their text), else ``tgt`` encoded."""
        src, tgt = clean(src), clean(tgt)
        self.check_subwords([src] if tgt_ids is not None else [src, tgt], ["the source", "the target"])
        if tgt_ids is not None and len(tgt_ids) > self.max_subwords:
            raise UserError(f"the target has {len(tgt_ids)} subwords; this model reads at most {self.max_subwords}")
        maps = attention_maps(self.checkpoint, src, tgt, tgt_ids=tgt_ids)
        rows_cols = {"encoder": (maps.src_tokens, maps.src_tokens), "decoder": (maps.tgt_tokens, maps.tgt_inputs),
                     "cross": (maps.tgt_tokens, maps.src_tokens)}
        attention = {}
        for kind, title in KINDS.items():
            rows, columns = rows_cols[kind]
            # 4 decimals: finer than a colour map can show, and a third of the JSON of full floats.
            # Rounded in float64: a float32 0.0006 would print as 0.0006000000284984708.
            weights = (maps.weights[kind].double() * 1e4).round() / 1e4
            attention[kind] = {"title": title, "rows": rows, "columns": columns, "weights": weights.tolist()}
        src_ids = self.tokenizer.encode(src, "src")
        target = list(tgt_ids) if tgt_ids is not None else self.tokenizer.encode(tgt, "tgt")
        (alignment,) = self.align([src_ids], [target])
        return {"src": src, "tgt": tgt, "src_tokens": maps.src_tokens, "tgt_tokens": maps.tgt_tokens,
                "tgt_inputs": maps.tgt_inputs, "attention": attention, "alignment": alignment}

    def info(self) -> dict:
        cfg = self.config
        s = self.settings
        return {
            "name": "aiayn", "version": __version__,
            "checkpoint": self.name, "step": self.meta.get("step"), "languages": _languages(self.meta),
            "valid": self.meta.get("valid"),
            "model": cfg.to_dict(), "parameters": self.parameters,
            "vocab_size": self.tokenizer.vocab_size,
            # True for a model trained on `aiayn prepare --lowercase` data: it writes lowercase.
            "lowercase": self.tokenizer.lowercases,
            "layers": {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers}, "heads": cfg.n_heads,
            "device": str(self.device), "quantize": s.quantize,
            # The arithmetic in use (resolved: fp32 or bf16) and what was asked for (auto, ...).
            "precision": self.translator.precision, "precision_setting": s.precision,
            # The default search (a request may choose its beam and alpha); whether a shortlist
            # is on, not where its file is: no paths.
            "search": {**asdict(self.search), "shortlist": s.shortlist is not None},
            "limits": {"max_lines": s.max_lines, "max_chars": s.max_chars, "max_beam": s.max_beam,
                       "max_alpha": MAX_ALPHA, "max_subwords": self.max_subwords,
                       "max_body_bytes": s.max_body_bytes},
            "batching": {"batch_wait_ms": s.batch_wait_ms, "max_batch_lines": s.max_batch_lines},
            # What word alignments are read from (1-based layer, resolved; head None: the mean of
            # the layer's heads), and, with --heads, each head's role and the layer (and head)
            # whose alignment agreed best with a reference aligner.
            "alignment": self.alignment_info(),
            "roles": self.heads["roles"] if self.heads else None,
            "alignment_best": self.heads["alignment_best"] if self.heads else None,
        }

    def alignment_info(self) -> dict:
        a = self.alignment_settings
        return {"layer": a.resolve_layer(self.config.n_decoder_layers) + 1, "head": a.head, "rows": a.rows}


def read_heads(path: str | Path, config) -> dict:
    """The roles and best alignment of a heads.json written by ``aiayn heads``, checked against
    a model ``config``: {"roles": {kind: [[role of each head] of each layer]}, "alignment_best":
    {"layer", "head", "aer"} or None}. A file that is missing, not JSON, not of that shape, or
    of a model with other layer or head counts is a one-line `UserError` naming the file."""
    path = Path(path)

    def fail(message: str) -> UserError:
        return UserError(f"{message}; give the heads.json that 'aiayn heads' wrote for this checkpoint", path=path)

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("heads file not found (write one with aiayn heads)", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the heads file: {e}", path=path) from None
    except json.JSONDecodeError as e:
        raise fail(f"not JSON ({e})") from None
    if isinstance(data, dict) and data.get("format", "aiayn-heads") != "aiayn-heads":
        raise fail(f"not a heads.json: its format is {data['format']!r}, not 'aiayn-heads'")
    if not isinstance(data, dict) or not isinstance(data.get("roles"), dict):
        raise fail("not a heads.json: it has no \"roles\" object")
    layers = {"encoder": config.n_encoder_layers, "decoder": config.n_decoder_layers,
              "cross": config.n_decoder_layers}
    heads = config.n_heads
    roles = {}
    for kind, n_layers in layers.items():
        table = data["roles"].get(kind)
        if not isinstance(table, list) or not all(
                isinstance(layer, list) and all(isinstance(role, str) for role in layer) for layer in table):
            raise fail(f"roles.{kind} is not a list of layers, each a list of role strings")
        if len(table) != n_layers or any(len(layer) != heads for layer in table):
            counts = sorted({len(layer) for layer in table})
            raise fail(f"roles.{kind} has {len(table)} layer(s) of {'/'.join(map(str, counts)) or 0} head(s), "
                       f"but this model's {kind} attention has {n_layers} layer(s) of {heads} heads")
        roles[kind] = table
    best = data.get("alignment_best")
    if best is not None:
        n_layers = config.n_decoder_layers

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(best, dict) or not integer(best.get("layer")):
            raise fail("alignment_best is not an object with a layer")
        if not 1 <= best["layer"] <= n_layers:
            raise fail(f"alignment_best.layer is {best['layer']}, but this model's decoder has {n_layers} layer(s)")
        head = best.get("head")
        if head is not None and not (integer(head) and 1 <= head <= heads):
            raise fail(f"alignment_best.head is {head!r}, not null or a head 1 ... {heads}")
        aer = best.get("aer")
        if aer is not None and (isinstance(aer, bool) or not isinstance(aer, (int, float)) or not math.isfinite(aer)):
            raise fail(f"alignment_best.aer is {aer!r}, not a number")
        best = {"layer": best["layer"], "head": head, "aer": aer}
    return {"roles": roles, "alignment_best": best}


def _languages(meta: dict) -> dict | None:
    """{"src": ..., "tgt": ...} from the checkpoint's own meta.json (``aiayn average`` carries
    them into an averaged checkpoint's), else None. Nothing else is read: requests never read
    files, and start-up reads only the checkpoint's own directory."""
    languages = meta.get("languages")
    if isinstance(languages, dict):
        return {"src": languages.get("src"), "tgt": languages.get("tgt")}
    return None
