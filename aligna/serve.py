"""An HTTP API over trained models, with dynamic batching and a page that shows attention.

    app = create_app({"de-en": aligna.load("runs/de_en")}, Settings(max_batch=32))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # or: aligna serve runs/de_en

Endpoints: POST /v1/translate, GET /v1/models, GET /healthz, GET /readyz, GET / (the page),
/openapi.json and /docs. Every model gets a `BatchWorker` (aligna/batching.py) that owns it:
requests with the same search options are decoded together. Routes only validate and wait;
every error is JSON ``{"error": "<one line>", "field": "<request field or null>", ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
from collections.abc import Hashable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import BatchWorker, WorkerStopped, check_max_wait
from .config import Config, ConfigError, DecodeConfig, check_value, config_to_dict, field_type
from .translate import TextTranslator, one_line

log = logging.getLogger("aligna")

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = ("/healthz", "/readyz", "/", "/index.html")  # and /static/*: no API key needed
SEARCH_FIELDS = ("beam_size", "nbest", "alpha", "coverage", "min_len", "no_repeat_ngram", "shortlist", "sample",
                 "temperature", "top_k", "top_p", "seed", "max_len_a", "max_len_b")  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """How the server runs and what it accepts. Each limit is checked before decoding and
    an over-limit request gets a JSON error naming the field and the limit."""

    host: str = "127.0.0.1"  # for the startup message (uvicorn binds)
    port: int = 8000
    max_batch: int = 32  # texts per decoding batch
    max_wait_ms: float = 10.0  # how long a batch waits for more requests with the same options
    max_body_bytes: int = 1 << 20  # request body -> 413
    max_texts: int = 64  # texts per request -> 422
    max_chars: int = 2000  # characters per text -> 422
    max_beam: int = 16  # beam_size -> 422
    max_output_len: int = 512  # max_len_b and min_len -> 422
    max_map_numbers: int = 2_000_000  # attention "all": the weights a request can bring back, at most -> 422
    max_len_a: float = 4.0  # output length limit a * source tokens + b: a -> 422
    api_key: str | None = None  # every endpoint but /healthz, /readyz and the page needs it
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("max_body_bytes", "max_texts", "max_chars", "max_beam", "max_output_len", "max_map_numbers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)} is out of range; allowed: integers >= 1")
        # limits that are decode settings too (a batch is decoded with batch_size max_batch)
        for key, setting in (("max_batch", "batch_size"), ("max_len_a", "max_len_a")):
            try:
                check_value(field_type(DecodeConfig, setting), getattr(self, key))
            except ConfigError as e:
                raise ValueError(f"{key}: {e}") from None
        check_max_wait(self.max_wait_ms)  # before any model loads
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is out of range; allowed: 0 to 65535")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"


def read_api_key(path: str | None) -> str | None:
    """The key from `path` (surrounding whitespace removed), else $ALIGNA_API_KEY, else None."""
    if path is not None:
        try:
            key = Path(path).read_text("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"--api-key-file {path}: not UTF-8 text") from None
        if not key:
            raise ValueError(f"--api-key-file {path}: the file is empty")
        return key
    return os.environ.get("ALIGNA_API_KEY") or None


# --------------------------------------------------------------------------- request / response models

Number = Annotated[float, Field(allow_inf_nan=False)]


class TranslateRequest(BaseModel):
    """Omitted search options take the model config's decode defaults (GET /v1/models)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="a served model's name; optional when one model is served")
    texts: list[str] = Field(description="one sentence per entry")
    beam_size: int | None = Field(None, description="1: greedy search")
    nbest: int | None = Field(None, description="hypotheses per text, <= beam_size")
    alpha: Number | None = Field(None, description="GNMT length penalty")
    coverage: Number | None = Field(None, description="GNMT coverage penalty weight")
    min_len: int | None = Field(None, description="no <eos> before this many tokens")
    no_repeat_ngram: int | None = Field(None, description="never repeat an n-gram of this size (beam search)")
    shortlist: bool | None = Field(None, description="the output layer over the model's vocabulary shortlist only")
    sample: bool | None = Field(None, description="sample instead of searching")
    temperature: Number | None = None
    top_k: int | None = None
    top_p: Number | None = None
    seed: int | None = Field(None, description="sampling seed")
    max_len_a: Number | None = Field(None, description="output length limit: a * source tokens + b")
    max_len_b: int | None = None
    attention: Literal["none", "cross", "all"] = Field(
        "none", description="cross: the map search used; all: also every layer and head of every kind"
    )


class NBestEntry(BaseModel):
    text: str
    score: float


class AttentionMaps(BaseModel):
    rows: list[str]
    cols: list[str]
    weights: list[list[list[list[float]]]] = Field(description="[layer][head][row][col]")


class AttentionRecord(BaseModel):
    src_tokens: list[str]
    tgt_tokens: list[str]
    weights: list[list[float]] | None = Field(description="a row per target token, a column per source token")
    maps: dict[str, AttentionMaps] | None = Field(
        None, description='with attention "all": cross, encoder, decoder'
    )


class TranslationResult(BaseModel):
    text: str
    tokens: list[str]
    src_tokens: list[str]
    score: float
    nbest: list[NBestEntry]
    attention: AttentionRecord | None


class TranslateResponse(BaseModel):
    model: str
    results: list[TranslationResult]


class MemberInfo(BaseModel):
    weight: float = Field(description="its weight in the ensemble's mean of probabilities")
    architecture: str
    attention: str
    has_attention: bool
    layers: dict[str, int]
    heads: int | None


class ModelInfo(BaseModel):
    name: str
    architecture: str = Field(description="transformer, rnn, rnn+ATTENTION, or ensemble (see members)")
    attention: str
    src_lang: str
    tgt_lang: str
    src_tokenizer: str
    tgt_tokenizer: str
    parameters: int
    precision: str
    engine: str  # aligna (PyTorch) or ctranslate2 (an `aligna export` directory)
    device: str
    has_attention: bool
    layers: dict[str, int] | None = Field(description="None for an ensemble")
    heads: int | None
    members: list[MemberInfo] | None = Field(description="an ensemble's models, in order; None for one model")
    max_len: int | None
    decode: dict[str, Any]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    limits: dict[str, float | int]


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [(401, "missing or wrong API key"), (404, "unknown model"), (413, "body too large"),
                       (422, "invalid request or over a limit"), (500, "decoding failed"), (503, "not running")]
}  # fmt: skip


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.extra = status, message, field, extra


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None,
                   **extra: Any) -> Response:  # fmt: skip
    """{"error": message, "field": field, ...}; ASCII JSON, so nothing a client sent can break it."""
    body = json.dumps({"error": message, "field": field, **extra}, ensure_ascii=True, default=str)
    return Response(body, status, headers=headers, media_type="application/json")


def _loc(loc: tuple | list) -> str | None:
    """("body", "texts", 3) -> "texts[3]"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


MAX_ERRORS = 20  # validation errors listed in one reply
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 when json.loads fails otherwise


def _parse_failure(cause: BaseException | None) -> str:
    """What json.loads raised other than a syntax error (Guard has checked the UTF-8)."""
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    return type(cause).__name__ if cause is not None else "unreadable"


def _validation_error(exc: RequestValidationError, content_type: str) -> Response:
    if content_type and "json" not in content_type.lower():
        message = f"body: not JSON (Content-Type: {content_type[:60]}); send a JSON object with Content-Type: application/json"
        return error_response(422, message, "body")
    errors, more = [], max(0, len(exc.errors()) - MAX_ERRORS)
    for e in exc.errors()[:MAX_ERRORS]:
        message = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            message = f"invalid JSON ({e.get('ctx', {}).get('error', 'cannot parse')})"
            loc: str | None = "body"
        else:
            loc = _loc(e.get("loc", ()))
        errors.append({"field": loc or "body", "type": e.get("type"), "message": message})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    if first["field"] == "body" and first.get("type") == "missing":
        first["message"] = 'missing: send a JSON object such as {"texts": ["..."]}'
    extra = {"more_errors": more} if more else {}  # a body of 10^5 wrong items is not answered with 10^5 errors
    return error_response(422, f"{first['field']}: {first['message']}", first["field"], errors=errors, **extra)


# --------------------------------------------------------------------------- a served model


def _architecture(config: Config) -> dict[str, Any]:
    """What the page and clients show of one model: its architecture, attention and size."""
    m = config.model
    if m.arch == "transformer":
        architecture, attention, heads = "transformer", "multi-head", m.transformer.heads
    else:
        attention, heads = m.rnn.attention, None
        architecture = f"rnn+{attention}" if attention != "none" else "rnn"
    return {"architecture": architecture, "attention": attention, "has_attention": attention != "none",
            "layers": {"encoder": m.encoder_layers, "decoder": m.decoder_layers}, "heads": heads}  # fmt: skip


def model_info(name: str, translator: TextTranslator) -> dict[str, Any]:
    """GET /v1/models's entry for a served model. An ensemble's architecture is "ensemble",
    its attention the mean of its members' ("mean"; the search's map, no layers or heads of
    its own), and "members" describes each member."""
    config = translator.config
    if translator.members:
        members = [{**_architecture(c), "weight": w} for c, w in zip(translator.members, translator.member_weights)]
        has_attention = any(m["has_attention"] for m in members)
        shape: dict[str, Any] = {"architecture": "ensemble", "attention": "mean" if has_attention else "none",
                                 "has_attention": has_attention, "layers": None, "heads": None, "members": members}  # fmt: skip
    else:
        shape = {**_architecture(config), "members": None}
    return {
        "name": name, **shape,
        "src_lang": config.data.src_lang, "tgt_lang": config.data.tgt_lang,
        "src_tokenizer": config.data.src_tokenizer.type, "tgt_tokenizer": config.data.tgt_tokenizer.type,
        "parameters": translator.parameters, "precision": translator.precision, "engine": translator.engine,
        "device": str(translator.device), "max_len": translator.max_len, "decode": config_to_dict(config.decode),
    }  # fmt: skip


def _json_bytes(content: Any) -> bytes:
    """JSON as Starlette's JSONResponse writes it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no -inf


@dataclass
class ServedModel:
    name: str
    translator: TextTranslator
    info: dict[str, Any]
    worker: BatchWorker | None = None
    _alone: count = field(default_factory=count)

    def key(self, options: dict[str, Any], attention: str) -> Hashable:
        """What a batch shares: the resolved search settings and the attention mode, so that a
        request gets what it would get alone. A sampled text draws from the generator of its
        seed and its place in its own request (`run_batch`), so a seed gives the same output
        whatever else shares its batch. Two kinds of job are decoded alone: sampled ones on an
        engine that samples a batch from one stream (CTranslate2), and shortlist ones, which a
        batch decodes over the union of its sentences' candidates (either engine)."""
        decode = config_to_dict(self.translator.decode_config(**options))
        decode.pop("batch_size")
        alone = decode["shortlist"] or (decode["sample"] and not self.translator.samples_each_input)
        return attention, tuple(sorted(decode.items())), next(self._alone) if alone else None

    def run_batch(self, texts: list[str], key: Hashable, places: list[int], max_batch: int) -> list[dict[str, Any]]:
        """In the worker thread: translate `texts` in one call, then build each result.
        places[i]: text i's place in its own request, which its sampling generator is seeded with."""
        attention, options, _ = key  # type: ignore[misc]
        translations = self.translator.translate_detailed(texts, max_batch, attention != "none", sample_ids=places,
                                                          **dict(options))  # fmt: skip
        results = []
        for t in translations:
            record = None
            if attention != "none":
                record = self.translator.attention_record(t, every_map=attention == "all")
            results.append({
                "text": one_line(t.text), "tokens": t.tokens, "src_tokens": t.src_tokens,
                "score": _finite(t.score), "nbest": [{"text": one_line(x), "score": _finite(s)} for x, s in t.nbest],
                "attention": record,
            })  # fmt: skip
        return results


# --------------------------------------------------------------------------- checks


def check_request(body: TranslateRequest, options: dict[str, Any], settings: Settings) -> None:
    """The server's limits, before the model's own validation (`decode_config`)."""
    s = settings
    if len(body.texts) > s.max_texts:
        raise ApiError(422, f"texts: {len(body.texts)} texts; this server takes at most {s.max_texts} per request "
                       "(--max-texts)", "texts", limit=s.max_texts)  # fmt: skip
    for i, text in enumerate(body.texts):
        if len(text) > s.max_chars:
            raise ApiError(422, f"texts[{i}]: {len(text)} characters; this server takes at most {s.max_chars} "
                           "per text (--max-chars)", f"texts[{i}]", limit=s.max_chars)  # fmt: skip
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(422, f"texts[{i}]: not valid Unicode text (a lone surrogate, "
                           f"U+{ord(text[e.start]):04X}, at character {e.start})", f"texts[{i}]") from None  # fmt: skip
    for key, value in options.items():
        _check_limit(key, value, settings, "")


def _search_limits(s: Settings) -> dict[str, tuple[float, str]]:
    """The search settings with a server limit: key -> (the most allowed, the flag that sets it)."""
    return {"beam_size": (s.max_beam, "--max-beam"), "max_len_b": (s.max_output_len, "--max-output-len"),
            "min_len": (s.max_output_len, "--max-output-len"), "max_len_a": (s.max_len_a, "--max-len-a")}  # fmt: skip


def _check_limit(key: str, value: Any, settings: Settings, whose: str) -> None:
    upper = _search_limits(settings)
    if key in upper and value > upper[key][0]:
        limit, flag = upper[key]
        how = f" ({flag})"
        raise ApiError(422, f"{key}: {value}{whose} is over this server's limit; allowed: <= {limit}{how}",
                       key, limit=limit)  # fmt: skip


def check_search(model: ServedModel, body: TranslateRequest, decode: dict[str, Any], settings: Settings) -> None:
    """The server's limits on the search as it will run (`decode`: the request's options over the
    model's decode defaults, so a default over a limit is refused too), and on the attention
    weights attention "all" can bring back: every map of every layer and head, bounded by the
    source lengths and the output limit a * |x| + b."""
    s = settings
    for key in _search_limits(settings):
        if getattr(body, key) is None:  # given ones were checked before the model's validation
            _check_limit(key, decode[key], settings, f" (model {model.name!r}'s decode default)")
    if body.attention != "all":
        return
    shape = model.info
    layers, heads = shape["layers"] or {"encoder": 1, "decoder": 1}, shape["heads"] or 1
    numbers = 0
    for text in body.texts:
        src = len(model.translator.pipeline.src_tokens(text))
        rows = int(decode["max_len_a"] * src + decode["max_len_b"]) + 1  # <sos> and every output token
        numbers += heads * (layers["encoder"] * src * src + layers["decoder"] * (rows * src + rows * rows))
    if numbers > s.max_map_numbers:
        raise ApiError(422, f"attention: \"all\" could bring back {numbers:,} attention weights for these texts (every "
                       f"layer and head, at the output length limit); this server sends at most {s.max_map_numbers:,} "
                       "(--max-map-numbers): ask for \"cross\", or for fewer or shorter texts",
                       "attention", limit=s.max_map_numbers)  # fmt: skip


_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)")  # an absolute path in a message


def public(message: str) -> str:
    """An error message for a client: absolute paths of the server's files cut to their last
    part (`/srv/models/de_en/shortlist.txt` -> `shortlist.txt`); the server log keeps them."""
    return _PATH.sub(r"\1", message)


def _decode_field(error: ConfigError) -> str | None:
    match = re.match(r"decode\.(\w+)", str(error))
    return match.group(1) if match else None


# --------------------------------------------------------------------------- the ASGI guard


class Guard:
    """Before any route: the API key (401), the body size (413) and UTF-8 (422). The body is
    read here, up to the limit, and handed on as one message."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        key = self.settings.api_key
        if key is not None and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = _bearer(headers.get("authorization", b""))
            if given is None or not hmac.compare_digest(given, key.encode("utf-8")):
                why = "missing" if given is None else "wrong"
                response = error_response(401, f"{why} API key: send the header Authorization: Bearer <key>",
                                          "authorization", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.settings.max_body_bytes
        too_big = error_response(413, f"body: over this server's limit of {limit} bytes (--max-body-bytes)",
                                 "body", limit=limit)  # fmt: skip
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = body[e.start : e.end].hex(" ")
            response = error_response(422, f"body: invalid UTF-8 at byte {e.start} (bytes {bad})", "body")
            return await response(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: http.disconnect

        return await self.app(scope, replay, send)


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


# --------------------------------------------------------------------------- the app


def create_app(models: dict[str, TextTranslator], settings: Settings | None = None) -> FastAPI:
    """The API over `models` (name -> Translator). Workers start and stop with the app's
    lifespan (run it under uvicorn, or `with TestClient(app)`)."""
    settings = settings or Settings()
    if not models:
        raise ValueError("no models to serve")
    served = {name: ServedModel(name, t, model_info(name, t)) for name, t in models.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for s in served.values():
            run = s.run_batch
            s.worker = BatchWorker(lambda texts, key, places, run=run: run(texts, key, places, settings.max_batch),
                                   settings.max_batch, settings.max_wait_ms, s.name).start()  # fmt: skip
            i = s.info
            log.info("serving %r: %s, %s parameters, %s %s on %s", s.name, i["architecture"], f"{i['parameters']:,}",
                     i["engine"], i["precision"], i["device"])  # fmt: skip
        log.info("the page: %s  the API docs: %s  (POST %s)", settings.url("/"), settings.url("/docs"),
                 settings.url("/v1/translate"))  # fmt: skip
        try:
            yield
        finally:
            for s in served.values():
                if s.worker is not None:
                    s.worker.stop()
                    s.worker = None

    app = FastAPI(
        title="aligna", summary="Translate with trained aligna models; see the attention.",
        version=_version(), lifespan=lifespan,
    )  # fmt: skip
    app.state.served, app.state.settings = served, settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.field, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc, request.headers.get("content-type", ""))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:  # FastAPI's for what json.loads raised
            return error_response(422, f"body: cannot be parsed as JSON ({_parse_failure(exc.__cause__)})", "body")
        return error_response(exc.status_code, str(exc.detail), None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def lookup(name: str | None) -> ServedModel:
        names = sorted(served)
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(422, f"model: required when several models are served; choose one of {names}",
                           "model", models=names)  # fmt: skip
        if name not in served:
            raise ApiError(404, f"model: unknown model {name[:100]!r}; served models: {names}", "model",
                           models=names)  # fmt: skip
        return served[name]

    @app.post("/v1/translate", response_model=TranslateResponse, responses=ERRORS, tags=["translate"])
    async def translate(body: TranslateRequest, request: Request) -> Any:
        """Translate `texts` (one result per text, in order). Requests with the same options
        that arrive together are decoded in one batch."""
        model = lookup(body.model)
        options = {k: getattr(body, k) for k in SEARCH_FIELDS if getattr(body, k) is not None}
        check_request(body, options, settings)
        try:
            key = model.key(options, body.attention)
        except ConfigError as e:
            log.info("refused a request to %s: %s", model.name, e)
            raise ApiError(422, public(str(e)), _decode_field(e)) from None
        check_search(model, body, dict(key[1]), settings)  # type: ignore[index]
        if not body.texts:
            return JSONResponse({"model": model.name, "results": []})
        worker = model.worker
        if worker is None or not worker.running:
            raise ApiError(503, f"model {model.name!r} is not running")
        try:
            results = await _wait(worker, body.texts, key, request)
        except WorkerStopped as e:
            raise ApiError(503, str(e)) from None
        except Exception as e:  # logged with its traceback by the worker
            return error_response(
                500, f"decoding failed ({type(e).__name__}); the server log has the details"
            )
        if results is None:  # the client went away
            return Response(status_code=499)
        # attention maps can make a large answer: written out off the event loop, which goes on serving
        content = await asyncio.to_thread(_json_bytes, {"model": model.name, "results": results})
        return Response(content, media_type="application/json")

    @app.get("/v1/models", response_model=ModelsResponse, responses={401: ERRORS[401]}, tags=["models"])
    async def list_models() -> Any:
        """The served models, their architecture and their decode defaults; the server's limits."""
        limits = {k: v for k, v in asdict(settings).items() if k.startswith(("max_", "min_"))}
        return {"models": [s.info for s in served.values()], "limits": limits}

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """200 while the process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "a model's worker is not running"}})
    async def readyz() -> Response:
        """200 when every model is loaded and its worker is running, else 503."""
        states = {n: "ready" if s.worker is not None and s.worker.running else "not running"
                  for n, s in served.items()}  # fmt: skip
        ready = all(v == "ready" for v in states.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "models": states}, 200 if ready else 503
        )

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    return app


async def _wait(worker: BatchWorker, texts: list[str], key: Hashable, request: Request,
                poll: float = 0.05) -> list[Any] | None:  # fmt: skip
    """The job's results; None if the client disconnected first (the job is then dropped
    from the queue, or finishes unread if its batch had started)."""
    job = worker.submit(texts, key)
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=poll)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    except asyncio.CancelledError:
        job.cancel()
        raise


def _version() -> str:
    from . import __version__

    return __version__


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped lines on stderr for the `aligna` logger (uvicorn logs its own)."""
    if not any(getattr(h, "_aligna_serve", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._aligna_serve = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)
