"""An OpenAI-compatible HTTP server over an :class:`~fastdecode.AsyncEngine` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` by
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). With
an API key, the ``/v1`` routes need ``Authorization: Bearer KEY``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (unknown field, value
out of range, prompt too long), 401 without the key, 429 when the queue is full, 408 past the
request timeout, 500 when the engine fails. A client that disconnects (streaming or not) has
its request aborted and its blocks freed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastdecode.serving.async_engine import (AsyncEngine, EngineStepError, QueueFullError,
                                             RequestTimeoutError)
from fastdecode.serving.metrics import CONTENT_TYPE, ServerMetrics
from fastdecode.serving.protocol import ChatCompletionRequest, CompletionRequest, RequestError
from fastdecode.serving.text import IncrementalDetokenizer, StopStrings, chat_prompt_ids

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context
_DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


@dataclass
class Chunk:
    """Text a request added; ``finish_reason`` on its last chunk."""

    text: str
    finish_reason: Optional[str]
    completion_tokens: int


class OpenAIServer:
    """The state behind the routes: engine, tokenizer, served name, metrics."""

    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = ServerMetrics(engine)
        self.max_model_len = engine.engine.max_model_len

    def start(self, prompt_ids: list[int], body, default_max_tokens: Optional[int]
              ) -> AsyncIterator[Chunk]:
        """Queue the request now (refusals raise here, before any response is sent) and return
        its text chunks."""
        params = body.sampling_params(len(prompt_ids), self.max_model_len, default_max_tokens)
        stops = body.stops()  # every check before the request is queued
        outputs = self.engine.generate(prompt_ids, params)
        return self._chunks(outputs, prompt_ids, stops, time.perf_counter())

    async def _chunks(self, outputs, prompt_ids: list[int], stops: list[str],
                      arrival: float) -> AsyncIterator[Chunk]:
        text = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        stop = StopStrings(stops)
        last = None
        async with aclosing(outputs):  # leaving early (a stop string, a disconnect) aborts
            async for out in outputs:
                now = time.perf_counter()
                if out.new_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe((now - last) / len(out.new_ids))
                    last = now
                delta, stopped = stop.feed(text.push(out.new_ids))
                if out.finish_reason == "error":
                    self.metrics.finished.labels("error").inc()
                    raise EngineStepError(out.error or "the request failed")
                if stopped or out.finished:
                    reason = "stop" if stopped else out.finish_reason
                    self.metrics.finished.labels(reason).inc()
                    yield Chunk(delta + ("" if stopped else stop.flush()), reason,
                                len(out.output_ids))
                    return
                if delta:
                    yield Chunk(delta, None, len(out.output_ids))


def _error(exc: Exception) -> RequestError:
    """The HTTP error of an exception raised while serving a request."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, QueueFullError):
        return RequestError(str(exc), status=429, kind="rate_limit_error")
    if isinstance(exc, RequestTimeoutError):
        return RequestError(str(exc), status=408, kind="timeout_error")
    if isinstance(exc, (ValueError, TypeError)):  # refused by Engine.add_request
        return RequestError(str(exc))
    return RequestError(f"{type(exc).__name__}: {exc}", status=500, kind="server_error")


def _json_error(exc: Exception) -> JSONResponse:
    err = _error(exc)
    return JSONResponse(err.body(), status_code=err.status)


def _sse(payload: Union[dict, str]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: AsyncEngine, tokenizer, *, model_name: str = "fastdecode",
              api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI application serving ``engine`` under the name ``model_name``."""
    server = OpenAIServer(engine, tokenizer, model_name)
    app = FastAPI(title="fastdecode", docs_url=None, redoc_url=None)
    app.state.server = server

    async def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise RequestError("invalid or missing API key (Authorization: Bearer KEY)",
                               status=401, kind="authentication_error")

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(RequestError(message, param=where or None).body(), status_code=400)

    @app.get("/health")
    async def health():
        ok = engine.is_healthy
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok
                            else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "fastdecode"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.single_prompt()
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        return await _respond(server, request, body, ids, COMPLETION_MAX_TOKENS, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.as_dict() for m in body.messages]
        ids = chat_prompt_ids(tokenizer, messages)
        return await _respond(server, request, body, ids, None, chat=True)

    return app


async def _respond(server: OpenAIServer, request: Request, body, prompt_ids: list[int],
                   default_max_tokens: Optional[int], *, chat: bool):
    try:
        chunks = server.start(prompt_ids, body, default_max_tokens)
    except Exception as exc:
        return _json_error(exc)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": server.model_name}
    usage = {"prompt_tokens": len(prompt_ids)}
    if body.stream:
        return StreamingResponse(_stream(chunks, head, usage, chat, body.include_usage()),
                                 media_type="text/event-stream")
    try:
        text, last = await _collect(chunks, request)
    except asyncio.CancelledError:  # the client left; the request was aborted
        return Response(status_code=499)
    except Exception as exc:
        return _json_error(exc)
    usage.update(completion_tokens=last.completion_tokens,
                 total_tokens=len(prompt_ids) + last.completion_tokens)
    content = "".join(text)
    choice = ({"message": {"role": "assistant", "content": content}} if chat
              else {"text": content, "logprobs": None})
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **choice, "finish_reason": last.finish_reason}],
            "usage": usage}


async def _collect(chunks: AsyncIterator[Chunk], request: Request) -> tuple[list[str], Chunk]:
    """Every chunk's text and the last chunk; if the client disconnects meanwhile, the
    collection is cancelled (which closes ``chunks``, aborting the request) and
    CancelledError raised."""
    async def consume() -> tuple[list[str], Chunk]:
        text, last = [], None
        async with aclosing(chunks):
            async for last in chunks:
                text.append(last.text)
        return text, last

    task = asyncio.ensure_future(consume())
    while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            task.cancel()
    return await task


async def _stream(chunks: AsyncIterator[Chunk], head: dict, usage: dict, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that disconnects cancels this generator, which closes
    ``chunks`` and so aborts the request."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(text: Optional[str], reason: Optional[str], first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _sse({**head, "object": obj, "choices": [choice]})

    async with aclosing(chunks):
        if chat:
            yield event(None, None, first=True)
        try:
            async for chunk in chunks:
                if chunk.text:
                    yield event(chunk.text, None)
                if chunk.finish_reason is not None:
                    yield event(None, chunk.finish_reason)
                    usage.update(completion_tokens=chunk.completion_tokens,
                                 total_tokens=usage["prompt_tokens"] + chunk.completion_tokens)
        except Exception as exc:  # the status line is sent: report in the stream
            yield _sse(_error(exc).body())
            return
    if include_usage:
        yield _sse({**head, "object": obj, "choices": [], "usage": usage})
    yield _sse("[DONE]")
