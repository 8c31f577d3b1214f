"""Bounded load test of ``fastdecode serve`` on loopback: ``--requests`` streaming completions
from ``--concurrency`` concurrent clients (the official ``openai`` async client), against a
server started as a subprocess. Stops by itself: every request has a client timeout, the whole
run a deadline, and the server is stopped at the end.

Reported (``results/server_load.md`` / ``.csv``): requests completed and failed, time to first
token p50 / p99 (from sending the request), request latency p50 / p99, generated tokens/s and
requests/s over the run.

    PYTHONPATH=. python benchmarks/bench_server_load.py                  # 200 requests, 32 clients
    PYTHONPATH=. python benchmarks/bench_server_load.py --requests 20 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from common import machine_info, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
OPENINGS = ["Return the", "Create a new", "Raise an exception if", "The value of",
            "Convert the given", "This function is used to", "Read the file and"]


def prompt(i: int) -> str:
    """Prompts of varied length (deterministic in the request's index)."""
    words = " ".join(OPENINGS[(i + k) % len(OPENINGS)].lower() for k in range(i % 9))
    return f"{OPENINGS[i % len(OPENINGS)]} {words}".strip()


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastdecode.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(args.concurrency), "--max-queued", str(args.requests)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("the server did not become healthy in 180 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def one(client, i: int, args) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.completions.create(
            model="fastdecode", prompt=prompt(i), max_tokens=args.max_tokens, temperature=0.8,
            seed=i, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return {"ok": first is not None and tokens > 0, "ttft": (first or t0) - t0,
                "latency": time.perf_counter() - t0, "tokens": tokens, "error": ""}
    except Exception as exc:  # counted and reported, the run goes on
        return {"ok": False, "ttft": 0.0, "latency": time.perf_counter() - t0, "tokens": 0,
                "error": f"{type(exc).__name__}: {exc}"[:200]}


async def drive(args, port: int) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                max_retries=0, timeout=args.request_timeout)
    queue = list(range(args.requests))
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await one(client, queue.pop(0), args))

    t0 = time.perf_counter()
    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    done, pending = await asyncio.wait(workers, timeout=args.deadline)
    for task in pending:  # the deadline passed: what is left counts as failed
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    results += [{"ok": False, "ttft": 0.0, "latency": 0.0, "tokens": 0,
                 "error": "not sent before the deadline"}] * len(queue)
    await client.close()
    return results, elapsed


def report(args, results: list[dict], elapsed: float) -> None:
    ok = [r for r in results if r["ok"]]
    errors = sorted({r["error"] for r in results if not r["ok"]})
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.zeros(1)
    lat = np.array([r["latency"] for r in ok]) if ok else np.zeros(1)
    tokens = sum(r["tokens"] for r in ok)
    row = {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
           "concurrency": args.concurrency, "max_tokens": args.max_tokens,
           "TTFT p50 s": float(np.percentile(ttft, 50)),
           "TTFT p99 s": float(np.percentile(ttft, 99)),
           "latency p50 s": float(np.percentile(lat, 50)),
           "latency p99 s": float(np.percentile(lat, 99)),
           "generated tokens/s": tokens / elapsed, "requests/s": len(ok) / elapsed,
           "wall s": elapsed}
    env = machine_info("cpu")
    env.pop("load average (1 min) at start", None)
    env["load average (1 min) after the run"] = f"{os.getloadavg()[0]:.2f}"
    env["command"] = "python " + " ".join(sys.argv)
    lines = ["# Server load test (loopback)", "",
             f"`fastdecode serve` ({args.model or 'the built-in default model'}) in a "
             f"subprocess; {args.requests} streaming completions (temperature 0.8, seeded, up "
             f"to {args.max_tokens} tokens) from {args.concurrency} concurrent clients of the "
             "`openai` async client; TTFT and latency from sending each request.", "",
             markdown_table([row]), ""]
    lines += [f"- errors: {'; '.join(errors)}" if errors else "- errors: none"]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_load.md").write_text("\n".join(lines) + "\n")
    with (RESULTS / "server_load.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="per request, s")
    ap.add_argument("--deadline", type=float, default=1200.0, help="whole run, s")
    ap.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS")
    args = ap.parse_args()
    from fastdecode.serving.tp import free_port

    port = free_port()
    server = start_server(args, port)
    try:
        results, elapsed = asyncio.run(drive(args, port))
    finally:
        stop_server(server)
    report(args, results, elapsed)


if __name__ == "__main__":
    main()
