"""``fastdecode.AsyncEngine``: an :class:`~fastdecode.Engine` stepped by its own thread, with
``async for`` streams for asyncio servers.

The engine's contract makes this small: ``add_request`` / ``abort`` may be called from any
thread while one thread steps, and every request ends with exactly one final output delivered
by ``step()``. The loop thread steps while requests exist and sleeps on an event otherwise; it
hands each output to the asyncio queue of the request's consumer through the consumer's event
loop (``call_soon_threadsafe``), so any number of event loops may share one engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from fastdecode.engine import Engine, RequestOutput, SamplingParams

logger = logging.getLogger("fastdecode.serving")

# Consecutive failed steps after which the engine is reported unhealthy.
_UNHEALTHY_AFTER = 3
_RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


class QueueFullError(RuntimeError):
    """The engine has as many requests in flight as it accepts; retry later (HTTP 429)."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its timeout; it was aborted and its blocks freed."""


class EngineStepError(RuntimeError):
    """The engine's step failed (e.g. the model's forward pass raised); the request was aborted."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Serve an :class:`~fastdecode.Engine` to asyncio code.

    ``AsyncEngine(model, **engine_kwargs)`` builds the Engine (or pass one:
    ``AsyncEngine(engine)``). ``generate`` queues a request at once (refusals raise there) and
    ``async for out in engine.generate(prompt_ids, params)`` yields the request's
    :class:`~fastdecode.RequestOutput` each step it gets tokens, the last one with
    ``finished=True``. When the consumer goes away (the generator is closed or cancelled, e.g. a
    client disconnects) the request is aborted and its blocks freed.

    Back-pressure: at most ``max_num_seqs + max_queued`` requests are in flight; one more is
    refused at once with :class:`QueueFullError`. ``request_timeout`` (seconds, None: none) is
    the default of ``generate(timeout=...)``: past it the request is aborted and
    :class:`RequestTimeoutError` raised. A step that raises aborts the requests in flight (each
    consumer gets :class:`EngineStepError`); the loop goes on with the next requests.
    ``close()`` (or ``with AsyncEngine(...)``) stops the loop thread.
    """

    def __init__(self, engine_or_model, *, max_queued: int = 256,
                 request_timeout: Optional[float] = None, **engine_kwargs) -> None:
        if isinstance(engine_or_model, Engine):
            if engine_kwargs:
                raise TypeError(f"engine options {sorted(engine_kwargs)} given with an Engine")
            self.engine = engine_or_model
        else:
            self.engine = Engine(engine_or_model, **engine_kwargs)
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds or None, got "
                             f"{request_timeout}")
        self.max_in_flight = self.engine.scheduler.max_num_seqs + max_queued
        self.request_timeout = request_timeout
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the counters
        self._wake = threading.Event()
        self._closed = False
        self._failures = 0  # consecutive failed steps
        self._counts = {"requests": 0, "rejected": 0, "timeouts": 0, "step_failures": 0}
        self._rate: deque[tuple[float, int]] = deque()
        self._thread = threading.Thread(target=self._loop, name="fastdecode-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ consumers
    def generate(self, prompt_ids, params: Optional[SamplingParams] = None,
                 request_id: Optional[str] = None, *,
                 timeout: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Queue a request now; iterate the result (``async for``) for its outputs as they come,
        until it finishes. Call it from a coroutine (it binds to the running event loop).

        Raises at once ValueError / TypeError for a bad request (as ``Engine.add_request``),
        :class:`QueueFullError` when full, RuntimeError once closed; while iterating,
        :class:`RequestTimeoutError` or :class:`EngineStepError`.
        """
        stream = _Stream(asyncio.get_running_loop())
        rid = self._add(prompt_ids, params, request_id, stream)
        return self._outputs(rid, stream, self.request_timeout if timeout is None else timeout)

    async def _outputs(self, rid: str, stream: _Stream,
                       timeout: Optional[float]) -> AsyncIterator[RequestOutput]:
        deadline = None if timeout is None else stream.loop.time() + timeout
        finished = False
        try:
            while not finished:
                left = None if deadline is None else max(0.0, deadline - stream.loop.time())
                try:
                    item = await asyncio.wait_for(stream.queue.get(), left)
                except asyncio.TimeoutError:
                    self._count("timeouts")
                    raise RequestTimeoutError(f"request {rid!r} timed out after {timeout} s; "
                                              "it was aborted") from None
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:  # the consumer left, timed out or failed: free its blocks now
                self.engine.abort(rid)
                self._wake.set()

    def _add(self, prompt_ids, params: Optional[SamplingParams], request_id: Optional[str],
             stream: _Stream) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("AsyncEngine is closed")
            if len(self._streams) >= self.max_in_flight:
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"too many requests in flight ({len(self._streams)}; the limit is "
                    f"max_num_seqs {self.engine.scheduler.max_num_seqs} + max_queued "
                    f"{self.max_in_flight - self.engine.scheduler.max_num_seqs}); retry later")
            # Registered under the lock the loop delivers under: no output can come first.
            rid = self.engine.add_request(prompt_ids, params, request_id)
            self._streams[rid] = stream
            self._counts["requests"] += 1
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Abort a request; its consumer gets the final output with finish_reason "abort"."""
        self.engine.abort(request_id)
        self._wake.set()

    # ------------------------------------------------------------------ the loop thread
    def _loop(self) -> None:
        while not self._closed:
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as exc:  # the engine keeps its state; the requests in flight go
                self._fail_all(exc)
                continue
            self._failures = 0
            self._deliver([(out.request_id, out) for out in outs])
            self._tick()

    def _deliver(self, items: list[tuple[str, Union[RequestOutput, BaseException]]]) -> None:
        """Hand each ``(request id, output or exception)`` to its consumer's queue."""
        with self._lock:
            for rid, payload in items:
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # its consumer left; the engine already freed it
                if not isinstance(payload, RequestOutput) or payload.finished:
                    # Its last item: the request leaves the in-flight count even if its
                    # consumer never iterates (that one still reads its queue).
                    del self._streams[rid]
                try:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, payload)
                except RuntimeError:  # the consumer's event loop is closed
                    self._streams.pop(rid, None)
                    self.engine.abort(rid)

    def _fail_all(self, exc: Exception) -> None:
        logger.exception("engine step failed; aborting the requests in flight")
        self._failures += 1
        self._count("step_failures")
        with self._lock:
            ids = list(self._streams)
        error = f"the engine's step failed: {type(exc).__name__}: {exc}"
        self._deliver([(rid, EngineStepError(error)) for rid in ids])
        for rid in ids:
            self.engine.abort(rid)

    def _tick(self) -> None:
        now = time.monotonic()
        self._rate.append((now, self.engine.scheduler.num_generated))
        while len(self._rate) > 2 and now - self._rate[1][0] > _RATE_WINDOW_S:
            self._rate.popleft()

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # ------------------------------------------------------------------ state
    @property
    def is_healthy(self) -> bool:
        """The loop thread runs and the last steps did not all fail."""
        return self._thread.is_alive() and not self._closed and self._failures < _UNHEALTHY_AFTER

    @property
    def stats(self) -> dict[str, Union[int, float]]:
        """``Engine.stats`` plus: requests in flight and the limit, requests accepted /
        rejected / timed out so far, failed steps, and generated tokens/s over the last 10 s."""
        stats = dict(self.engine.stats)
        with self._lock:
            stats.update(in_flight=len(self._streams), max_in_flight=self.max_in_flight,
                         **self._counts)
        rate = list(self._rate)
        recent = rate and time.monotonic() - rate[-1][0] < _RATE_WINDOW_S
        span = rate[-1][0] - rate[0][0] if len(rate) > 1 else 0.0
        stats["tokens_per_s"] = (rate[-1][1] - rate[0][1]) / span if recent and span else 0.0
        return stats

    def close(self) -> None:
        """Stop the loop thread; requests still in flight are aborted and their consumers get
        RuntimeError."""
        with self._lock:
            self._closed = True
            ids = list(self._streams)
        self._wake.set()
        self._thread.join()
        self._deliver([(rid, RuntimeError("AsyncEngine closed")) for rid in ids])
        for rid in ids:
            self.engine.abort(rid)

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
