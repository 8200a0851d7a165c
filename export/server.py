"""An OpenAI-compatible HTTP server for an export folder: ``mlxgpt-ort serve EXPORT_DIR``.

Endpoints: ``POST /v1/completions`` (OpenAI's legacy text-completion API, streamed as
server-sent events when ``stream`` is true), ``GET /v1/models``, ``GET /v1/models/{id}``
and ``GET /health``. Existing OpenAI clients (the ``openai`` SDKs, curl, LangChain)
talk to it by changing their base URL.

Stack: Starlette (routing, requests, streaming responses) on uvicorn (the ASGI server:
HTTP parsing, connection limits, graceful shutdown on SIGTERM), with pydantic validating
requests in strict mode. All three are small, widely used and maintained; none pulls in
MLX, ``onnx``, safetensors, tqdm or matplotlib, and neither does this module.

**Same text as** ``mlxgpt-ort generate``. A completion is the continuation of the prompt
(without the prompt), produced by :class:`~mlxgpt_export.batching.Engine` (in a process of
its own under ``serve``: :mod:`mlxgpt_export.engine_process`) with
:mod:`mlxgpt.sampling`'s rules and a per-request ``default_rng(seed)``. Settings a request
omits take the folder's ``generation_config.json`` values
(:meth:`OnnxGPT.default_settings <mlxgpt_export.runtime.OnnxGPT.default_settings>`), as
the CLI does. A prompt longer than the context window keeps its last ``block_size`` tokens
(the CLI's rule); an empty prompt starts from the tokenizer's start token. BPE models stop
at ``<|endoftext|>``; text ``stop`` sequences end a choice at their first occurrence, which
is left out of the text (OpenAI's rule). ``finish_reason`` is ``"stop"`` for either and
``"length"`` when ``max_tokens`` ran out. A list of prompts gives one choice per prompt,
each decoded as its own row of the batch.

**Refused**, with a 4xx JSON error in OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``: malformed JSON, a body that is not an object or larger than
``max_body_bytes`` (413), fields of the wrong type, unknown fields (rejected so a typo such
as ``max_token`` is not silently ignored), OpenAI fields this server does not implement
set to anything but their neutral value (``echo``, ``logprobs``, ``best_of``, penalties,
``logit_bias``, ``suffix``), ``n`` != 1, ``max_tokens`` < 0 or above ``max_tokens``
(:class:`Limits`), ``temperature`` < 0, ``top_p`` outside (0, 1], ``top_k`` < 0, an empty
prompt list or more than ``max_prompts`` prompts, a prompt of more than
``max_prompt_tokens`` tokens, characters a character-level model cannot encode, another
model name (404). When ``max_batch`` generations run and ``max_queue`` more wait, new
requests get 503 with ``Retry-After`` instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxgpt.sampling import SamplingParams, crop_prompt, with_overrides
from mlxgpt.tokenizer import StreamDecoder, Tokenizer, TokenizerError, prompt_ids
from mlxgpt_export.batching import Engine, EngineFull, Job, Limits
from mlxgpt_export.engine_process import EngineStopped, ProcessEngine
from mlxgpt_export.errors import ExportError
from mlxgpt_export.runtime import OnnxGPT

log = logging.getLogger("mlxgpt_export.server")

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
RETRY_AFTER_S = 1


class ServeError(ExportError):
    """The server cannot start (address in use, limits that contradict the folder, ...)."""


class ApiError(Exception):
    """An error sent to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- the request ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (strict: no type coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # an extension of OpenAI's API; 0 = off
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id: accepted, not used
    # OpenAI fields this server does not implement: only their neutral values are accepted.
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None


NEUTRAL = {
    "echo": (False,),
    "logprobs": (None,),
    "best_of": (None, 1),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}


def parse_request(body: bytes) -> CompletionRequest:
    """The validated request, or an :class:`ApiError` naming the offending field."""

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"][:1]) or None
        where = ".".join(str(part) for part in first["loc"])
        message = f"invalid value for '{where}': {first['msg']}"
        if first["type"] == "missing":
            message = f"'{where}' is required"
        elif first["type"] == "extra_forbidden":
            message = f"unknown field '{where}' (this server does not accept it)"
        elif param in ("prompt", "stop"):
            message = f"'{param}' must be a string or a list of strings"
        raise ApiError(400, message, param=param) from None
    for name, neutral in NEUTRAL.items():
        if getattr(request, name) not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    if request.n != 1:
        raise ApiError(400, "only n=1 is supported (send the request again)", param="n")
    stops = stop_sequences(request)
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(
            400,
            f"'stop' takes up to {MAX_STOPS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            param="stop",
        )
    return request


def stop_sequences(request: CompletionRequest) -> list[str]:
    if request.stop is None:
        return []
    return [request.stop] if isinstance(request.stop, str) else list(request.stop)


# -- one choice's text ------------------------------------------------------------------------
class TextStream:
    """One choice's text: token pieces as soon as they are complete, cut at a stop sequence.

    Text that might be the beginning of a stop sequence is held back until it is not, so a
    stream never shows part of a stop sequence; the stop sequence itself is never shown.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = list(stops)
        self.text = ""
        self.sent = 0  # text[:sent] has been released
        self.stopped = False  # a stop sequence was found

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def close(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._held_back()
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _held_back(self) -> int:
        """Length of the longest unreleased suffix that begins a stop sequence."""
        tail = self.text[self.sent :]
        for size in range(min(len(tail), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self.stops):
                return size
        return 0


@dataclass
class Choice:
    """One prompt of a request: its engine job and its text so far."""

    index: int
    job: Job
    text: TextStream
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None


class Courier:
    """Carries engine output to the event loop: at most one wake-up per burst, not per token.

    The engine thread appends to a request's :class:`Mailbox` and calls :meth:`notify`;
    the loop is woken (``call_soon_threadsafe``) only if no wake-up is pending, and then
    signals every mailbox that got mail. A mailbox is always filled before ``scheduled`` is
    read, and ``scheduled`` is cleared before mailboxes are signalled, so no mail is missed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.dirty: deque[Mailbox] = deque()
        self.scheduled = False

    def notify(self, box: Mailbox) -> None:
        self.dirty.append(box)
        if not self.scheduled:
            self.scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self.scheduled = False
        while self.dirty:
            self.dirty.popleft().ready.set()


class Mailbox:
    """One request's engine output, ``(choice index, token id or finish reason)`` items."""

    def __init__(self, courier: Courier):
        self.courier = courier
        self.items: deque[tuple[int, int | str]] = deque()
        self.ready = asyncio.Event()

    def put(self, item: tuple[int, int | str]) -> None:  # engine thread
        self.items.append(item)
        self.courier.notify(self)

    async def take(self) -> list[tuple[int, int | str]]:  # event loop
        while not self.items:
            await self.ready.wait()
            self.ready.clear()
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken


@dataclass
class ChoiceSink:
    """The engine's :class:`~mlxgpt_export.batching.Sink` for one choice of a request."""

    index: int
    mailbox: Mailbox

    def token(self, token_id: int) -> None:
        self.mailbox.put((self.index, token_id))

    def finish(self, reason: str) -> None:
        self.mailbox.put((self.index, reason))


# -- the app ----------------------------------------------------------------------------------
class Service:
    """The model, its engine and the limits behind the HTTP routes."""

    def __init__(
        self,
        model: OnnxGPT,
        model_id: str,
        limits: Limits,
        engine: Engine | ProcessEngine | None = None,
    ):
        if model.tokenizer is None:
            raise ServeError("the export folder has no tokenizer")
        base, default_max_tokens = model.default_settings()
        if default_max_tokens > limits.max_tokens:
            raise ServeError(
                f"the folder's generation_config.json asks for max_new_tokens="
                f"{default_max_tokens}, above --max-tokens-cap {limits.max_tokens}: raise the cap"
            )
        self.model, self.model_id, self.limits = model, model_id, limits
        self.tokenizer: Tokenizer = model.tokenizer
        self.base, self.default_max_tokens = base, default_max_tokens
        self.engine = engine or Engine(model, limits.max_batch, limits.max_queue)
        self.created = int(time.time())
        self.courier: Courier | None = None  # made in the event loop, at the first request

    def settings(self, request: CompletionRequest) -> tuple[SamplingParams, int]:
        """The request's settings; omitted ones come from generation_config.json (CLI rule)."""
        params = with_overrides(
            self.base,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
        )
        max_tokens = self.default_max_tokens if request.max_tokens is None else request.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is above this server's limit of {self.limits.max_tokens}",
                param="max_tokens",
            )
        return params, max_tokens

    def prompts(self, request: CompletionRequest) -> list[list[int]]:
        """Token ids of every prompt, cropped to the context window as the CLI does."""
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not texts:
            raise ApiError(400, "'prompt' is an empty list", param="prompt")
        if len(texts) > self.limits.max_prompts:
            raise ApiError(
                400,
                f"{len(texts)} prompts in one request: this server takes at most "
                f"{self.limits.max_prompts}",
                param="prompt",
            )
        ids = []
        for text in texts:
            try:
                tokens = prompt_ids(self.tokenizer, text)
            except TokenizerError as err:
                raise ApiError(400, str(err), param="prompt") from None
            if len(tokens) > self.limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"a prompt has {len(tokens)} tokens: this server takes at most "
                    f"{self.limits.max_prompt_tokens} (the model reads the last "
                    f"{self.model.config.block_size})",
                    param="prompt",
                )
            ids.append(crop_prompt(tokens, self.model.config.block_size))
        return ids

    def start(self, request: CompletionRequest) -> tuple[list[Choice], Mailbox]:
        """Validate the request and submit one job per prompt to the engine."""
        if request.model is not None and request.model != self.model_id:
            raise ApiError(
                404,
                f"the model '{request.model}' does not exist: this server serves '{self.model_id}'",
                param="model",
                code="model_not_found",
            )
        params, max_tokens = self.settings(request)
        prompts = self.prompts(request)
        loop = asyncio.get_running_loop()
        if self.courier is None or self.courier.loop is not loop:
            self.courier = Courier(loop)
        mailbox = Mailbox(self.courier)
        stops = stop_sequences(request)
        choices = [
            Choice(
                i,
                Job(ids, max_tokens, params, ChoiceSink(i, mailbox)),
                TextStream(self.tokenizer, stops),
                len(ids),
            )
            for i, ids in enumerate(prompts)
        ]
        try:
            self.engine.submit([c.job for c in choices])
        except EngineStopped as err:  # no retry helps: the server must be restarted
            raise ApiError(503, str(err), code="engine_stopped", kind="server_error") from None
        except EngineFull as err:
            raise ApiError(
                503,
                str(err),
                code="server_busy",
                kind="server_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        return choices, mailbox

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None:
                self.engine.cancel(choice.job)


async def next_pieces(
    service: Service, choices: list[Choice], mailbox: Mailbox
) -> list[tuple[Choice, str]]:
    """Wait for engine output, then take all that is ready: (choice, new text) pairs.

    Taking everything that is ready at once means a busy server sends several tokens per
    event instead of falling behind. A choice's ``finish_reason`` is set when it ends.
    """
    items = await mailbox.take()
    pieces: dict[int, str] = {}
    for index, item in items:
        choice = choices[index]
        if choice.finish_reason is not None:
            continue  # output that was already under way when a stop sequence ended it
        if isinstance(item, int):
            choice.completion_tokens += 1
            piece = choice.text.push(item)
            if choice.text.stopped:
                choice.finish_reason = "stop"
                service.engine.cancel(choice.job)
        else:
            if item == "error":
                raise ApiError(500, "generation failed on the server", kind="server_error")
            piece = choice.text.close()
            choice.finish_reason = "stop" if choice.text.stopped else item
        pieces[index] = pieces.get(index, "") + piece
    return [(choices[i], text) for i, text in pieces.items()]


def usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_object(
    service: Service, cid: str, created: int, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": service.model_id,
        "choices": choices,
    }


def choice_object(choice: Choice, text: str) -> dict[str, Any]:
    return {
        "text": text,
        "index": choice.index,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is larger than ``limit`` bytes."""
    too_large = ApiError(
        413, f"the request body is larger than this server's limit of {limit} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def until_disconnect(request: Request, work: asyncio.Future) -> Any:
    """The result of ``work``, or ``None`` after cancelling it if the client goes away."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    return None


def create_app(
    model: OnnxGPT,
    model_id: str,
    limits: Limits | None = None,
    engine: Engine | ProcessEngine | None = None,
) -> Starlette:
    """The Starlette app serving ``model`` as ``model_id`` (see the module docstring).

    ``engine``: what decodes (default: an :class:`Engine` thread in this process over
    ``model``; ``serve`` passes a :class:`ProcessEngine`).
    """
    service = Service(model, model_id, limits or Limits(), engine)

    async def completions(request: Request) -> Response:
        body = parse_request(await read_body(request, service.limits.max_body_bytes))
        choices, mailbox = service.start(body)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream(service, choices, mailbox, cid, created, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")

        async def collect() -> dict[str, Any]:
            texts = [""] * len(choices)
            while any(c.finish_reason is None for c in choices):
                for choice, piece in await next_pieces(service, choices, mailbox):
                    texts[choice.index] += piece
            objects = [choice_object(c, t) for c, t in zip(choices, texts, strict=True)]
            return {**completion_object(service, cid, created, objects), "usage": usage(choices)}

        try:
            result = await until_disconnect(request, asyncio.ensure_future(collect()))
        finally:
            service.cancel(choices)
        return JSONResponse(result) if result is not None else Response(status_code=499)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def model_info(request: Request) -> Response:
        if request.path_params["model"] != service.model_id:
            raise ApiError(
                404,
                f"the model '{request.path_params['model']}' does not exist",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(model_object())

    def model_object() -> dict[str, Any]:
        return {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "mlxgpt",
        }

    async def health(request: Request) -> Response:
        stopped = service.engine.stopped
        status = {"status": "error", "error": stopped} if stopped else {"status": "ok"}
        body = {**status, "model": service.model_id, **service.engine.load()}
        return JSONResponse(body, status_code=503 if stopped else 200)

    async def api_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, ApiError)
        return err.response()

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return ApiError(err.status_code, message, headers=err.headers).response()

    async def server_error(request: Request, err: Exception) -> Response:
        log.exception("unexpected error", exc_info=err)
        return ApiError(500, "internal server error", kind="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model_info, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


async def stream(
    service: Service,
    choices: list[Choice],
    mailbox: Mailbox,
    cid: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format, ending with ``data: [DONE]``.

    If the client disconnects, Starlette cancels this generator; ``finally`` then frees
    the request's batch slots.
    """
    try:
        while any(c.finish_reason is None for c in choices):
            try:
                pieces = await next_pieces(service, choices, mailbox)
            except ApiError as err:
                yield sse(err.body())
                return
            events = []
            for choice, text in pieces:  # one choice per chunk, as OpenAI sends them
                chunk = completion_object(service, cid, created, [choice_object(choice, text)])
                events.append(sse({**chunk, "usage": None} if include_usage else chunk))
            yield "".join(events)
        if include_usage:
            yield sse({**completion_object(service, cid, created, []), "usage": usage(choices)})
        yield sse("[DONE]")
    finally:
        service.cancel(choices)


# -- running it -------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a :class:`ServeError` that says why not.

    The socket is created with ``proto=IPPROTO_TCP``: asyncio disables Nagle's algorithm
    (``TCP_NODELAY``) only on connections of such a socket, and without that each response
    written in two parts (headers, body) waits ~40 ms for a delayed ACK.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            if os.name != "nt":  # as socket.create_server: quick restarts on POSIX
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as err:
        raise ServeError(
            f"cannot listen on {host}:{port}: {err.strerror or err} "
            "(choose another --port or --host)"
        ) from None


def make_server(
    app: Starlette, limits: Limits, shutdown_timeout: float, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn server for ``app``: in-flight requests get ``shutdown_timeout`` s to finish."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        limit_concurrency=limits.max_connections,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    model_id: str | None = None,
    threads: int | None = None,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
) -> int:
    """Serve an export folder until SIGTERM or Ctrl-C; returns 0 after a graceful shutdown.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish for up
    to ``shutdown_timeout`` seconds, cancels the rest (their batch slots are freed) and
    stops the engine.

    Decoding runs in a child process (:class:`ProcessEngine`) on POSIX systems, where the
    event loop can watch its pipe; elsewhere (Windows) in a thread of this process.
    """
    limits = limits or Limits()
    model = OnnxGPT.load(folder, threads=threads)
    engine = None
    if os.name == "posix":
        engine = ProcessEngine(model, limits.max_batch, limits.max_queue, threads)
        model.release_session()  # checked; the engine process loads its own copy
    app = create_app(model, model_id or Path(folder).resolve().name, limits, engine)
    sock = listen(host, port)
    if engine is not None:
        try:
            engine.launch()
        except EngineStopped as err:
            sock.close()
            raise ServeError(str(err)) from None
    bound_host, bound_port = sock.getsockname()[:2]
    server = make_server(app, limits, shutdown_timeout, log_level)
    print(
        f"serving {folder} as '{app.state.service.model_id}' on "
        f"http://{bound_host}:{bound_port}/v1 (OpenAI completions API)",
        flush=True,
    )
    # uvicorn re-raises the SIGTERM it handled once it has shut down; a handler of our own
    # takes it, so a requested shutdown exits with status 0 rather than dying by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        if engine is not None:
            engine.stop()  # already stopped by the app's shutdown, unless it never started
    return 0
