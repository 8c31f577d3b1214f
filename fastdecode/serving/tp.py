"""Tensor parallelism: one model sharded over the ranks of ``torch.distributed`` by transformers'
own plan (:mod:`fastdecode.hf.tp`), rank 0 scheduling, every rank running each step.

Rank 0 runs an :class:`~fastdecode.Engine` whose model runner broadcasts each step's inputs
(token ids, positions, the paged-attention context, block copies) before running it; the other
ranks wait in :func:`run_worker`, run the same forward pass on the same block tables over their
own paged caches (their key/value heads only), and take part in the model's all-reduces. Only
rank 0 samples: the logits are replicated on every rank after the gathered output projection.
Block ids are the same on every rank because only rank 0 allocates them.

    fastdecode serve --model PATH --tensor-parallel-size 2     # 2 local processes (gloo on CPU)

From Python, inside an initialised process group::

    model, tokenizer = fastdecode.hf.tp.load_sharded(path)
    if dist.get_rank() == 0:
        engine = TensorParallelEngine(model, num_blocks=512)
        ...                       # use it as any Engine (or wrap it in an AsyncEngine)
        engine.stop_workers()
    else:
        run_worker(model)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdecode.engine import Engine
from fastdecode.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger("fastdecode.serving")
_TIMEOUT = timedelta(minutes=30)  # a worker may wait this long for rank 0's next step
_GRACE_S = 30.0  # after Ctrl-C, how long the ranks get to exit before they are terminated


def _broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj``, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class BroadcastingRunner(ModelRunner):
    """Rank 0's runner: every step goes to the workers first (without the sampling part)."""

    def __init__(self, model, **geometry) -> None:
        super().__init__(model, **geometry)
        # The workers build their runner with rank 0's geometry (the cache size decided here).
        _broadcast(dict(geometry, num_blocks=self.num_blocks,
                        kv_dtype=self.paged.k_caches[0].dtype))

    def run(self, step: StepInputs):
        _broadcast(dataclasses.replace(step, rows=[], seqs=[]))
        return super().run(step)


class TensorParallelEngine(Engine):
    """The Engine of rank 0 (same arguments as :class:`~fastdecode.Engine`)."""

    runner_class = BroadcastingRunner

    def stop_workers(self) -> None:
        """Let :func:`run_worker` return on every other rank."""
        _broadcast(None)


def run_worker(model) -> None:
    """The loop of every rank but 0: run each step rank 0 broadcasts until it stops us."""
    runner = ModelRunner(model, **_broadcast())
    while (step := _broadcast()) is not None:
        try:
            runner.run(step)
        except Exception:  # rank 0's forward fails alike and decides; stay in step with it
            logger.exception("tensor-parallel worker: a step failed")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    if rank != 0:  # Ctrl-C reaches every process of the terminal; rank 0 stops the others
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=_TIMEOUT)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, *args)`` in ``world`` local processes joined in one process group (gloo
    on CPU, NCCL with GPUs); returns when all are done, raises if one failed."""
    ranks = mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world,
                               start_method="spawn", join=False)
    try:
        while not ranks.join():
            pass
    except KeyboardInterrupt:  # rank 0 winds down (and stops the others); then, or at worst
        for proc in ranks.processes:  # after a grace period, every rank is gone
            proc.join(timeout=_GRACE_S)
            if proc.is_alive():
                proc.terminate()
        raise


def _serve_rank(rank: int, args) -> None:
    from fastdecode.cli import DTYPES
    from fastdecode.hf.tp import load_sharded

    dtype = DTYPES[args.dtype] if args.dtype else torch.float32
    model, tokenizer = load_sharded(args.model, dtype=dtype)
    if rank != 0:
        run_worker(model)
        return
    if tokenizer is None:
        raise SystemExit(f"fastdecode serve: error: --model {args.model}: no tokenizer in the "
                         "checkpoint directory")
    import uvicorn

    from fastdecode.serving.async_engine import AsyncEngine
    from fastdecode.serving.cli import engine_options, model_name
    from fastdecode.serving.server import build_app

    options = engine_options(args)
    queue = dict(max_queued=options.pop("max_queued"),
                 request_timeout=options.pop("request_timeout"))
    engine = TensorParallelEngine(model, **options)
    try:
        with AsyncEngine(engine, **queue) as served:
            app = build_app(served, tokenizer, model_name=model_name(args), api_key=args.api_key)
            uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop_workers()


def serve_tensor_parallel(args) -> int:
    """``fastdecode serve --tensor-parallel-size N``: N local ranks, rank 0 serving HTTP."""
    if args.model is None:
        raise SystemExit("fastdecode serve: error: --tensor-parallel-size needs --model PATH "
                         "(a checkpoint directory every rank loads its shard from)")
    try:
        launch(_serve_rank, args.tensor_parallel_size, args)
    except KeyboardInterrupt:
        pass
    return 0
