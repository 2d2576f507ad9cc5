"""The shim's ASGI app: OpenAI's HTTP API, and Anthropic's Messages API, in front of any
`Engine`.

A gateway wraps the Starlette app and handles what every request shares: a request id
(`x-request-id`, also the engine request id), API keys, metrics, the last-resort 500, so
nothing escapes to the server, whose logs could quote request data, and Anthropic's error
shape on the Messages routes.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dbloom.inference import Engine, ModelInfo

from ._aliases import AliasEngine
from ._anthropic import parse_messages
from ._anthropic_errors import AnthropicErrors
from ._call import Call
from ._errors import ApiError, internal_error, invalid
from ._keys import ApiKeys
from ._metrics import CONTENT_TYPE, Metrics
from ._openai import parse_chat, parse_completion
from ._relay import Relay, error_for, json_messages, log_failure, logger
from ._responses import parse_response
from ._sse import dumps

CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)
"""What the server's `send` raises once it is tearing the connection down (hypercorn
writes its own close while our last message is still going out: BusyResourceError)."""

MAX_BODY = 4 << 20
DEFAULT_MAX_TOKENS = 1024
"""The length limit when a chat or responses request sets none (OpenAI fills the context;
the engine needs a number before it has counted the prompt)."""
STALL_TIMEOUT = 120.0
"""How long to wait for the engine's next item, a request body, or a client to read."""
REQUEST_ID_KEY = "dbloom.request_id"
OPEN_PATHS = frozenset({"/health"})
ANTHROPIC_ROOT = "/v1/messages"
"""Where Anthropic's routes live: errors on and below it take Anthropic's shape."""
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type="application/json")


def _request_id(request: Request) -> str:
    request_id: str = request.scope[REQUEST_ID_KEY]
    return request_id


def _check_unicode(raw: bytes, body: object) -> None:
    """Refuse lone surrogates (`"\\ud800"` escapes): valid JSON, but no text a tokenizer or
    UTF-8 encoder accepts. Only such an escape can produce one, so most bodies skip the
    check."""
    if SURROGATE_ESCAPE.search(raw) is None:
        return
    try:
        dumps(body)
    except UnicodeEncodeError:
        raise invalid(
            "the request body holds an unpaired surrogate escape", code="invalid_unicode"
        ) from None


def _model_object(
    model: ModelInfo, created: int, alias_of: str | None, notice: str | None
) -> dict[str, Any]:
    extra: dict[str, Any] = {"context_length": model.context_length, "digest": model.digest}
    if alias_of is not None:
        extra["alias_of"] = alias_of
    if notice is not None:
        extra["notice"] = notice
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": "dbloom",
        "dbloom": extra,
    }


class _Endpoints:
    """The route handlers, sharing the engine and the app's settings."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_body: int,
        default_max_tokens: int,
        stall: float,
        aliases: Mapping[str, str],
    ) -> None:
        self.engine = engine
        self.aliases = aliases
        self.notice: str | None = None
        self.metrics = metrics
        self.max_body = max_body
        self.default_max_tokens = default_max_tokens
        self.stall = stall
        self.created = int(time.time())

    async def _models(self, request: Request) -> tuple[ModelInfo, ...]:
        try:
            with trio.fail_after(self.stall):
                models: tuple[ModelInfo, ...] = await self.engine.models()
                return models
        except Exception as exc:
            raise error_for(exc, _request_id(request)) from None

    async def health(self, request: Request) -> Response:
        """Liveness for load balancers: open without a key, and cheap."""
        models = await self._models(request)
        return _json(200, {"status": "ok", "models": len(models)})

    async def metrics_text(self, request: Request) -> Response:
        """Prometheus scrape target."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def list_models(self, request: Request) -> Response:
        """`GET /v1/models`."""
        models = await self._models(request)
        data = [self._model_object(m) for m in models]
        return _json(200, {"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        """`GET /v1/models/{id}`; ids may contain slashes (`org/name`)."""
        wanted = request.path_params["model_id"]
        for model in await self._models(request):
            if model.id == wanted:
                return _json(200, self._model_object(model))
        raise ApiError(
            404, f"the model {wanted!r} does not exist", param="model", code="model_not_found"
        )

    def _model_object(self, model: ModelInfo) -> dict[str, Any]:
        return _model_object(model, self.created, self.aliases.get(model.id), self.notice)

    async def _body(self, request: Request) -> object:
        """The JSON body, at most `max_body` bytes, arriving within the stall timeout."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        pieces: list[bytes] = []
        size = 0
        try:
            with trio.fail_after(self.stall):
                async for piece in request.stream():
                    size += len(piece)
                    if size > self.max_body:
                        raise self._too_large()
                    pieces.append(piece)
        except trio.TooSlowError:
            raise ApiError(408, "the request body arrived too slowly", code="timeout") from None
        except ClientDisconnect:
            raise invalid("the client disconnected before sending its body") from None
        raw = b"".join(pieces)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            detail = f"{exc.msg} at byte {exc.pos}"
        except (ValueError, RecursionError) as exc:
            detail = type(exc).__name__
        else:
            _check_unicode(raw, body)
            return body
        raise invalid(f"the request body is not valid JSON: {detail}", code="invalid_json")

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"the request body exceeds {self.max_body} bytes", code="request_too_large"
        )

    def _relay(self, call: Call) -> Relay:
        return Relay(call, self.engine, metrics=self.metrics, stall=self.stall)

    async def chat(self, request: Request) -> Response:
        """`POST /v1/chat/completions`."""
        body = await self._body(request)
        call = parse_chat(
            body, request_id=_request_id(request), default_max_tokens=self.default_max_tokens
        )
        return self._relay(call)

    async def completions(self, request: Request) -> Response:
        """`POST /v1/completions`."""
        body = await self._body(request)
        return self._relay(parse_completion(body, request_id=_request_id(request)))

    async def responses(self, request: Request) -> Response:
        """`POST /v1/responses`."""
        body = await self._body(request)
        call = parse_response(
            body, request_id=_request_id(request), default_max_tokens=self.default_max_tokens
        )
        return self._relay(call)

    async def messages(self, request: Request) -> Response:
        """`POST /v1/messages`, Anthropic's Messages API."""
        body = await self._body(request)
        return self._relay(parse_messages(body, request_id=_request_id(request)))


KEY_HEADERS = (b"authorization", b"x-api-key")


def _presented_key(headers: dict[bytes, bytes]) -> str:
    """The key as OpenAI clients send it (`Authorization: Bearer`), else as Anthropic's do
    (`x-api-key`); empty when there is neither."""
    scheme, _, bearer = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and bearer.strip():
        return bearer.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _json(exc.status, exc.body(), exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        error = ApiError(404, f"Invalid URL ({where})", code="unknown_url")
    elif exc.status_code == 405:
        error = ApiError(405, f"Invalid method for URL ({where})", code="method_not_allowed")
    else:
        error = ApiError(exc.status_code, exc.detail)
    return _json(error.status, error.body(), {**error.headers, **(exc.headers or {})})


async def _server_error(request: Request, exc: Exception) -> Response:
    error = internal_error(_request_id(request))
    return _json(error.status, error.body())


class _Gateway:
    """What every HTTP request goes through before its route, and after."""

    def __init__(self, app: Starlette, keys: ApiKeys | None, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    def _route(self, scope: Scope) -> str:
        for route in self.app.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE and isinstance(route, Route):
                return route.path
        return "unmatched"

    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why the request may not proceed without a valid key, or None if it may."""
        if self.keys is None or scope["path"] in OPEN_PATHS:
            return None
        names = [name for name, _ in scope["headers"]]
        repeated = [n.decode() for n in KEY_HEADERS if names.count(n) > 1]
        key = _presented_key(dict(scope["headers"]))
        if repeated:  # which one counts would be the server's guess
            message = f"more than one {repeated[0]} header: send one API key"
            code = "invalid_api_key"
        elif not key:
            message = "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
            code = "missing_api_key"
        elif not self.keys.verify(key):
            message, code = "incorrect API key", "invalid_api_key"
        else:
            return None
        return ApiError(401, message, code=code, headers={"www-authenticate": "Bearer"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(16)
        scope[REQUEST_ID_KEY] = request_id
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        path: str = scope["path"]
        anthropic = path == ANTHROPIC_ROOT or path.startswith(ANTHROPIC_ROOT + "/")
        reply: Send = AnthropicErrors(send_with_id) if anthropic else send_with_id

        route = self._route(scope)
        self.metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope)
            if refusal is None:
                await self.app(scope, receive, reply)
            else:
                for message in json_messages(refusal.status, refusal.body(), refusal.headers):
                    await reply(message)
        except CONNECTION_ENDED as exc:
            # The server dropped the connection under our answer (the client hung up, or
            # announced a body it never sent): nothing is wrong here, and nobody to tell.
            logger.info(
                "request %s: the connection ended while answering (%s)",
                request_id,
                type(exc).__name__,
            )
        except Exception as exc:
            log_failure(request_id, exc)
            if status is None:
                error = internal_error(request_id)
                for message in json_messages(error.status, error.body()):
                    await reply(message)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status or 499)).inc()


Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(
    engine: Engine,
    *,
    keys: ApiKeys | None,
    max_body: int = MAX_BODY,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    stall_timeout: float = STALL_TIMEOUT,
    aliases: Mapping[str, str] | None = None,
    notice: str | None = None,
) -> ASGIApp:
    """The OpenAI-compatible app over `engine`.

    With `keys`, every route but `/health` needs a key of the store, sent as
    `Authorization: Bearer <key>` or `x-api-key: <key>` (an empty store admits nobody);
    with None the API is open, which `check_bind` allows only on loopback. `aliases` maps
    extra model names to real ones (see `AliasEngine`); `/v1/models` lists them too.
    `notice` is shown with every model (a shim run by someone else says so there).
    """
    metrics = Metrics()
    endpoints = _Endpoints(
        AliasEngine(engine, aliases) if aliases else engine,
        metrics,
        max_body=max_body,
        default_max_tokens=default_max_tokens,
        stall=stall_timeout,
        aliases=dict(aliases or {}),
    )
    endpoints.notice = notice
    routes: list[tuple[str, Endpoint, str]] = [
        ("/health", endpoints.health, "GET"),
        ("/metrics", endpoints.metrics_text, "GET"),
        ("/v1/models", endpoints.list_models, "GET"),
        ("/v1/models/{model_id:path}", endpoints.get_model, "GET"),
        ("/v1/chat/completions", endpoints.chat, "POST"),
        ("/v1/completions", endpoints.completions, "POST"),
        ("/v1/responses", endpoints.responses, "POST"),
        (ANTHROPIC_ROOT, endpoints.messages, "POST"),
    ]
    app = Starlette(
        routes=[Route(path, endpoint, methods=[method]) for path, endpoint, method in routes],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    return _Gateway(app, keys, metrics)
