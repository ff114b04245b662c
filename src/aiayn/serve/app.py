"""The web layer of ``aiayn serve``: a FastAPI application over an `Engine`.

    POST /api/translate   {"text": "..." | ["...", ...], "beam": 4, "alpha": 0.6, "nbest": 1, "details": false,
                           "alignment": false} -> {"translations": [...]}
    POST /api/attention   {"src": "...", "tgt": "..." (optional), "beam", "alpha"} -> tokens, every attention
                          weight and the word alignment
    GET  /api/info        the model, its languages, its default search, alignment and the server's limits
    GET  /api/health      liveness and batching counters
    GET  /                the attention explorer (static files in ./static, no build step)
    GET  /docs            the OpenAPI documentation (schema at /openapi.json)

Every error is ``{"error": "one clear sentence"}`` with a 4xx status for the client's mistakes
(400 malformed JSON, 413 over a size limit, 415 not JSON, 422 wrong types or values, 404/405
wrong route) and 500 for the server's. A request's search is the server's default (`Engine.search`:
the checkpoint's recommended one, as the server's settings change it) with the request's own
beam and alpha, if given. Requests never read or write files: the only files served are the
explorer's, from the package.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import SearchConfig
from ..errors import UserError
from .batching import DynamicBatcher
from .engine import MAX_ALPHA, Engine, check_alpha

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The explorer loads nothing from elsewhere: this makes the browser enforce it.
EXPLORER_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiError(Exception):
    """A request the server refuses: answered as {"error": message} with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- request and response bodies (also the OpenAPI schema) ------------------------------------


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not a string of characters, or None. JSON may escape half of a UTF-16
    surrogate pair alone ("\\ud800"), which Python decodes to a string that no tokenizer
    (nor UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start + 1} (half of a "
                "UTF-16 pair, not a character): send valid Unicode")
    return None


def valid_unicode(value: str | None) -> str | None:
    problem = None if value is None else unicode_problem(value)
    if problem:
        raise ValueError(f"not valid Unicode: it {problem}")
    return value


def number_or_none(value):
    """A JSON number as is; anything else (a string, a boolean) is refused, not converted."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError("must be a number")


SEARCH_DEFAULT = "the server's default search: the checkpoint's recommended one unless aiayn serve set it; see /api/info"
BEAM = f"beam size, 1 = greedy search (1 ... limits.max_beam; default: {SEARCH_DEFAULT})"
ALPHA = (f"length penalty: candidates are ranked by log P(y|x) / ((5+|y|)/6)^alpha (0 ... {MAX_ALPHA:g}; "
         f"default: {SEARCH_DEFAULT}). Requests with different settings are never batched together")


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"text": "Click OK to close the dialog.", "beam": 4, "nbest": 1},
                     {"text": ["First sentence.", "Second sentence."], "nbest": 2}]})

    text: str | list[str] = Field(description="one sentence, or a list of sentences translated separately "
                                  "(at most limits.max_lines, each at most limits.max_chars characters and "
                                  "limits.max_subwords subwords)")
    beam: StrictInt | None = Field(None, description=BEAM)
    alpha: float | None = Field(None, description=ALPHA)
    nbest: StrictInt = Field(1, description="translations per sentence, best first (1 ... beam); > 1 adds scores")
    details: StrictBool = Field(False, description="each translation as a candidate object (text, score, log_prob, "
                                "tokens) also when nbest is 1")
    alignment: StrictBool = Field(False, description="each translation as a candidate object (as with details) with "
                                  "its word alignment to its source: the model's encoder-decoder attention, "
                                  "teacher-forced on the candidate's tokens, read with the server's alignment "
                                  "settings (alignment in /api/info)")

    @field_validator("text", mode="before")
    @classmethod
    def _strings(cls, value):
        # One clear message instead of pydantic's one error per member of the union.
        if isinstance(value, str):
            return valid_unicode(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            for number, line in enumerate(value, start=1):
                if problem := unicode_problem(line):
                    raise ValueError(f"not valid Unicode: line {number} {problem}")
            return value
        raise ValueError("must be a string or a list of strings")

    _alpha = field_validator("alpha", mode="before")(number_or_none)


class WordAlignment(BaseModel):
    src_words: list[str] = Field(description="the source's words as the model read it (whitespace-separated, "
                                 "punctuation attached as written)")
    tgt_words: list[str] = Field(description="the translation's words")
    pharaoh: str = Field(description="the links as one Pharaoh line: 'i-j' pairs (source word i, target word j, "
                         "0-based), sorted by target word")
    links: list[tuple[int, int]] = Field(description="the hard links [i, j]: each target word j linked to the source "
                                         "word i it attends to most (one per target word; none for an empty side)")
    soft: list[list[float]] = Field(description="soft[j][i]: the weight of target word j on source word i (4 "
                                    "decimals); each row sums to 1")


class Candidate(BaseModel):
    text: str
    score: float = Field(description="log P(y|x) / ((5+|y|)/6)^alpha, the ranking score (|y| counts the EOS)")
    log_prob: float = Field(description="log P(y|x), natural log, output tokens and EOS")
    tokens: list[int] = Field(description="the subword ids the search produced (no BOS/EOS): give them to "
                              "/api/attention as tgt_ids to see the attention of exactly this output")
    alignment: WordAlignment | None = Field(None, description="only with alignment: true in the request: this "
                                            "candidate's word alignment to its source")


class TranslateResponse(BaseModel):
    translations: list[str] | list[list[Candidate]] = Field(
        description="one entry per input sentence: its translation (nbest = 1) or its n best candidates")


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"src": "Click OK to close the dialog."},
                     {"src": "Click OK to close the dialog.", "tgt": "Klicken Sie auf OK, um den Dialog zu schließen."}]})

    src: StrictStr = Field(description="the source sentence")
    tgt: StrictStr | None = Field(None, description="a target sentence (default: the model's own best translation, "
                                  "its own subwords)")
    beam: StrictInt | None = Field(None, description="for the translation when tgt is absent: " + BEAM)
    alpha: float | None = Field(None, description="for the translation when tgt is absent: " + ALPHA)
    tgt_ids: list[StrictInt] | None = Field(None, description="the target as subword ids (a candidate's tokens from "
                                            "/api/translate): the weights of exactly that output; tgt, if given, "
                                            "is only its text")

    _unicode = field_validator("src", "tgt")(valid_unicode)
    _alpha = field_validator("alpha", mode="before")(number_or_none)


class AttentionKind(BaseModel):
    title: str
    rows: list[str] = Field(description="the token of each row: the querying position")
    columns: list[str] = Field(description="the token of each column: the attended position")
    weights: list[list[list[list[float]]]] = Field(description="weights[layer][head][row][column]; each row sums to 1")


class AttentionResponse(BaseModel):
    src: str = Field(description="the source as the model read it (NFC, single spaces)")
    tgt: str = Field(description="the target the weights belong to (as text)")
    translated: bool = Field(description="true when tgt is the model's own translation; the tokens are then the "
                             "search's own, which encoding its text again might not give")
    src_tokens: list[str] = Field(description="source subwords, then </s>")
    tgt_tokens: list[str] = Field(description="what each decoder position predicts: y_1 ... y_n, </s>")
    tgt_inputs: list[str] = Field(description="what each decoder position reads: <s>, y_1 ... y_n")
    attention: dict[str, AttentionKind] = Field(description="encoder, decoder and cross (encoder-decoder) attention")
    alignment: WordAlignment = Field(description="the word alignment of src and tgt, read off the cross attention "
                                     "with the server's alignment settings (alignment in /api/info)")


class ErrorResponse(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed JSON", 413: "over a size limit (lines, characters, body)", 415: "the body is not JSON",
    422: "wrong types or values (a lone surrogate, a sentence longer than the model reads)",
    500: "the server failed"}.items()}


# -- the application --------------------------------------------------------------------------


def create_app(engine: Engine) -> FastAPI:
    """The ASGI application serving ``engine``. Its batcher lives as long as the application's
    lifespan (uvicorn, or ``with TestClient(app)``); the searches run in the engine's model
    thread, which lives as long as the engine."""
    settings = engine.settings
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The engine's own model thread: the one that loaded the model (see `Engine.__init__`).
        executor = engine.executor
        batcher = DynamicBatcher(engine.translate, executor, max_wait=settings.batch_wait_ms / 1000,
                                 max_items=settings.max_batch_lines)
        batcher.start()
        state.update(executor=executor, batcher=batcher)
        try:
            yield
        finally:
            await batcher.stop()
            state.clear()

    app = FastAPI(title="aiayn", version=__version__, lifespan=lifespan,
                  description="Translation and attention of a Transformer checkpoint "
                              "(Attention Is All You Need). The explorer is at /.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not media_type.endswith("json"):
            # FastAPI does not parse other media types as JSON: say so instead of "not an object".
            return JSONResponse({"error": f"send the body as JSON with Content-Type: application/json "
                                          f"(got {media_type or 'no Content-Type'})"}, status_code=415)
        status, message = describe_validation_errors(exc.errors())
        return JSONResponse({"error": message}, status_code=status)

    async def translate_lines(lines: list[str], search: SearchConfig, nbest: int):
        try:
            # The whole search is the batch key: requests with other settings never share a batch.
            return await state["batcher"].submit((search, nbest), lines)
        except UserError as e:
            raise ApiError(422, str(e)) from None
        except Exception as e:  # logged with its traceback by the batcher
            raise ApiError(500, f"translation failed: {type(e).__name__}: {e}") from None

    def check_search(beam: int | None, alpha: float | None) -> SearchConfig:
        """The request's search: the default one with the request's beam and alpha."""
        beam = engine.search.beam if beam is None else beam
        if not 1 <= beam <= settings.max_beam:
            raise ApiError(422, f"beam must be between 1 and {settings.max_beam} (got {beam})")
        if alpha is not None:
            try:
                alpha = check_alpha(alpha)
            except UserError as e:
                raise ApiError(422, str(e)) from None
        return engine.search.replace(beam=beam, alpha=alpha)

    def check_target_ids(ids: list[int]) -> list[int]:
        """tgt_ids: subword ids of the model's vocabulary, no special ids, at most max_subwords."""
        vocab = engine.tokenizer.vocab_size
        specials = {engine.tokenizer.pad_id, engine.tokenizer.bos_id, engine.tokenizer.eos_id}
        for number, i in enumerate(ids, start=1):
            if not 0 <= i < vocab or i in specials:
                raise ApiError(422, f"tgt_ids: id {number} is {i}, not a subword of this model's vocabulary "
                                    f"(0 ... {vocab - 1} without pad, bos and eos)")
        if len(ids) > engine.max_subwords:
            raise ApiError(422, f"tgt_ids has {len(ids)} subwords; this model reads at most {engine.max_subwords} "
                                "(max_subwords)")
        return list(ids)

    def check_length(text: str, what: str) -> None:
        # Characters as Python counts them: one per code point, so "😀" is one (JSON may send
        # it as two escapes, "\\ud83d\\ude00").
        if len(text) > settings.max_chars:
            raise ApiError(413, f"{what} has {len(text)} characters; the limit is {settings.max_chars}")

    def check_subwords(texts: list[str], names: list[str]) -> None:
        # Before searching: the translator would cut a longer source short (and the attention
        # maps cannot hold it), so both endpoints refuse it alike.
        try:
            engine.check_subwords(texts, names)
        except UserError as e:
            raise ApiError(422, str(e)) from None

    async def on_model_thread(what: str, function, *args):
        """``function(*args)`` on the model thread; a UserError is the request's 422, anything
        else a logged 500 naming ``what``."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(state["executor"], function, *args)
        except UserError as e:
            raise ApiError(422, str(e)) from None
        except Exception as e:
            log.error("aiayn serve: %s failed", what, exc_info=e)
            raise ApiError(500, f"{what} failed: {type(e).__name__}: {e}") from None

    # exclude_none: a candidate has its alignment only when the request asked for it.
    @app.post("/api/translate", response_model=TranslateResponse, response_model_exclude_none=True,
              responses=ERRORS)
    async def translate(body: TranslateRequest):
        """Translate one sentence or a list of sentences (batched with concurrent requests)."""
        single = isinstance(body.text, str)
        lines = [body.text] if single else body.text
        search = check_search(body.beam, body.alpha)
        if not 1 <= body.nbest <= search.beam:
            raise ApiError(422, f"nbest must be between 1 and the beam size {search.beam} (got {body.nbest})")
        if not lines:
            raise ApiError(422, "text is an empty list: give at least one sentence")
        if not any(line.strip() for line in lines):
            raise ApiError(422, "text is empty: give a sentence to translate" if single
                           else "every line of text is empty: give a sentence to translate")
        if len(lines) > settings.max_lines:
            raise ApiError(413, f"text has {len(lines)} lines; the limit is {settings.max_lines} per request")
        names = ["text"] if single else [f"line {number} of text" for number in range(1, len(lines) + 1)]
        for name, line in zip(names, lines):
            check_length(line, name)
        check_subwords(lines, names)
        results = await translate_lines(lines, search, body.nbest)
        if body.nbest == 1 and not body.details and not body.alignment:
            return {"translations": [hyps[0].text for hyps in results]}
        translations = [[{"text": h.text, "score": h.score, "log_prob": h.log_prob, "tokens": h.tokens}
                         for h in hyps] for hyps in results]
        if body.alignment:
            # Off the event loop, on the model thread, as the searches and attention maps are.
            alignments = await on_model_thread("alignment", engine.align_translations, lines, results)
            for candidates, aligned in zip(translations, alignments):
                for candidate, alignment in zip(candidates, aligned):
                    candidate["alignment"] = alignment
        return {"translations": translations}

    @app.post("/api/attention", responses={200: {"model": AttentionResponse}, **ERRORS})
    async def attention(body: AttentionRequest):
        """Every kind, layer and head of attention for one sentence, its tokens and its word
        alignment. Without tgt, the model's own best translation (beam search) is the target."""
        if not body.src.strip():
            raise ApiError(422, "src is empty: give a sentence to look at")
        search = check_search(body.beam, body.alpha)
        check_length(body.src, "src")
        translated = body.tgt is None and body.tgt_ids is None
        if body.tgt is not None:
            check_length(body.tgt, "tgt")
        check_subwords([body.src] if body.tgt is None or body.tgt_ids is not None else [body.src, body.tgt],
                       ["src", "tgt"])
        if body.tgt_ids is not None:
            tgt_ids = check_target_ids(body.tgt_ids)
            tgt = body.tgt if body.tgt is not None else engine.tokenizer.decode_line(tgt_ids)
        elif translated:
            # The search's own subwords: its text encoded again may give other ones (a byte
            # piece spelling a control character is written as a space, for instance), and the
            # weights must belong to what the model produced.
            best = (await translate_lines([body.src], search, 1))[0][0]
            tgt, tgt_ids = best.text, best.tokens
        else:
            tgt, tgt_ids = body.tgt, None
        result = await on_model_thread("attention", engine.attention, body.src, tgt, tgt_ids)
        # Returned as is: validating ~10^5 floats through the response model would cost more
        # than computing them; the schema above documents the shape.
        return JSONResponse({**result, "translated": translated})

    @app.get("/api/info")
    async def info():
        """The model (config, vocabulary, languages, checkpoint name), its default search
        (beam, alpha, max_len_a, max_len_b, whether a shortlist is on), the server's limits, the
        alignment settings (alignment: 1-based layer, head or null for the mean of the heads,
        rows) and, when the server was given --heads, each head's role (roles) and the layer
        that aligns best (alignment_best)."""
        return engine.info()

    @app.get("/api/health")
    async def health():
        """Liveness, and what the batcher has done: lines waiting, batches run."""
        batcher = state.get("batcher")
        if batcher is None:
            raise ApiError(503, "not started")
        return {"status": "ok", "pending_lines": batcher.pending, **batcher.stats.as_dict()}

    @app.get("/", include_in_schema=False)
    async def explorer():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": EXPLORER_CSP,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def describe_validation_errors(errors) -> tuple[int, str]:
    """(status, one message) for pydantic's list of errors: 400 for JSON that does not parse,
    422 for wrong fields, each named by its path in the body ("text", "text.2", "beam")."""
    for e in errors:
        if e.get("type") == "json_invalid":
            position = e["loc"][-1] if len(e.get("loc", ())) > 1 else "?"
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            return 400, f"malformed JSON at character {position}: {reason}"
    messages = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part != "body"]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
            messages.append("the request body must be a JSON object")
        elif e.get("type") == "missing":
            messages.append(f"{'.'.join(loc)} is required")
        elif e.get("type") == "extra_forbidden":
            messages.append(f"unknown field {'.'.join(loc)!r}")
        else:
            messages.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return 422, "; ".join(dict.fromkeys(messages))  # unique, in order


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with a 413, before reading them
    (Content-Length) or as soon as a streamed body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"error": message}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)
