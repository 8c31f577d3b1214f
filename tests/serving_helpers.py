"""Running a server on loopback for the serving tests (uvicorn in a thread, a free port)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import uvicorn

from fastdecode.serving.tp import free_port

__all__ = ["free_port", "running", "wait_until"]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 for the block; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)
