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
import dataclasses
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastdecode.serving.async_engine import (AsyncEngine, EngineStepError, QueueFullError,
                                             RequestTimeoutError)
from fastdecode.serving.metrics import CONTENT_TYPE, ServerMetrics
from fastdecode.serving.protocol import ChatCompletionRequest, CompletionRequest, RequestError
from fastdecode.serving.text import IncrementalDetokenizer, StopStrings, chat_prompt_ids

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context
_SEED_END = 2 ** 63  # SamplingParams.seed is in [0, 2**63)
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
              ) -> AsyncIterator[tuple[int, Chunk]]:
        """Queue the request's ``n`` choices now (refusals raise here, before any response is
        sent, and leave nothing queued) and return their text chunks as ``(choice index,
        chunk)``, interleaved as they come.

        The choices are independent requests sharing the prompt's cached blocks; with a
        ``seed``, choice ``i`` draws with ``seed + i`` (each reproducible, none equal).
        """
        params = body.sampling_params(len(prompt_ids), self.max_model_len, default_max_tokens)
        stops = body.stops()  # every check before the request is queued
        n = body.num_choices()
        base = uuid.uuid4().hex
        rids, streams = [], []
        try:
            for i in range(n):
                choice = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=(params.seed + i) % _SEED_END)
                rids.append(f"{base}-{i}")
                outputs = self.engine.generate(prompt_ids, choice, rids[-1])
                streams.append(self._chunks(outputs, prompt_ids, stops, time.perf_counter()))
        except BaseException:
            for rid in rids:  # ids never queued are ignored
                self.engine.abort(rid)
            raise
        return _merged(streams, lambda: [self.engine.abort(rid) for rid in rids])

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


async def _merged(streams: list[AsyncIterator[Chunk]], abort: Callable[[], object]
                  ) -> AsyncIterator[tuple[int, Chunk]]:
    """``(index, chunk)`` of every stream as they come; the first failure raises. Leaving
    early cancels the streams and calls ``abort`` (a stream cancelled before it started never
    closes its request itself)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    queue.put_nowait((i, chunk))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        abort()


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
        return StreamingResponse(_stream(chunks, body.num_choices(), head, usage, chat,
                                         body.include_usage()),
                                 media_type="text/event-stream")
    try:
        texts, lasts = await _collect(chunks, request, body.num_choices())
    except asyncio.CancelledError:  # the client left; the request was aborted
        return Response(status_code=499)
    except Exception as exc:
        return _json_error(exc)
    completion = sum(last.completion_tokens for last in lasts)
    usage.update(completion_tokens=completion, total_tokens=len(prompt_ids) + completion)
    choices = []
    for i, (text, last) in enumerate(zip(texts, lasts)):
        content = "".join(text)
        choice = ({"message": {"role": "assistant", "content": content}} if chat
                  else {"text": content, "logprobs": None})
        choices.append({"index": i, **choice, "finish_reason": last.finish_reason})
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": choices, "usage": usage}


async def _collect(chunks: AsyncIterator[tuple[int, Chunk]], request: Request, n: int
                   ) -> tuple[list[list[str]], list[Chunk]]:
    """Each choice's chunk texts and last chunk; if the client disconnects meanwhile, the
    collection is cancelled (which closes ``chunks``, aborting the request) and
    CancelledError raised."""
    async def consume() -> tuple[list[list[str]], list[Chunk]]:
        texts: list[list[str]] = [[] for _ in range(n)]
        lasts: list[Optional[Chunk]] = [None] * n
        async with aclosing(chunks):
            async for i, chunk in chunks:
                texts[i].append(chunk.text)
                lasts[i] = chunk
        return texts, lasts

    task = asyncio.ensure_future(consume())
    while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            task.cancel()
    return await task


async def _stream(chunks: AsyncIterator[tuple[int, Chunk]], n: int, head: dict, usage: dict,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events, each for one choice (its ``index``); a client that disconnects
    cancels this generator, which closes ``chunks`` and so aborts the request."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(i: int, text: Optional[str], reason: Optional[str], first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {} if text is None else {"content": text})
            choice = {"index": i, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _sse({**head, "object": obj, "choices": [choice]})

    completion = [0] * n
    async with aclosing(chunks):
        if chat:
            for i in range(n):
                yield event(i, None, None, first=True)
        try:
            async for i, chunk in chunks:
                if chunk.text:
                    yield event(i, chunk.text, None)
                if chunk.finish_reason is not None:
                    yield event(i, None, chunk.finish_reason)
                    completion[i] = chunk.completion_tokens
        except Exception as exc:  # the status line is sent: report in the stream
            yield _sse(_error(exc).body())
            return
    if include_usage:
        usage.update(completion_tokens=sum(completion),
                     total_tokens=usage["prompt_tokens"] + sum(completion))
        yield _sse({**head, "object": obj, "choices": [], "usage": usage})
    yield _sse("[DONE]")
