"""Data parallelism on Ray Serve: N engine replicas behind Ray Serve's HTTP proxy and router,
with the same OpenAI routes as ``fastdecode serve``.

Each replica is a Ray actor that loads the model, runs an :class:`AsyncEngine` and serves the
FastAPI application of :mod:`fastdecode.serving.server` (Ray Serve's ASGI ingress); Ray Serve
routes each request to a replica with the fewest requests in flight. Needs ``pip install
"ray[serve]"`` (the ``serve`` extra of fastdecode). From Python::

    from ray import serve
    from fastdecode.serving.ray import deployment

    serve.run(deployment("path/to/checkpoint", num_replicas=2), route_prefix="/")

or from the command line: ``fastdecode serve --model PATH --replicas 2``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from ray import serve


@serve.ingress()
class FastdecodeReplica:
    """One replica: the model, its AsyncEngine, and the OpenAI application over them."""

    def __init__(self, model: Optional[str], device: Optional[str], dtype: Optional[str],
                 served_model_name: str, api_key: Optional[str], engine_options: dict) -> None:
        from fastdecode.cli import load
        from fastdecode.serving.async_engine import AsyncEngine

        loaded, self.tokenizer = load(argparse.Namespace(model=model, device=device, dtype=dtype))
        self.engine = AsyncEngine(loaded, **engine_options)
        self.served_model_name = served_model_name
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        from fastdecode.serving.server import build_app

        return build_app(self.engine, self.tokenizer, model_name=self.served_model_name,
                         api_key=self.api_key)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def deployment(model: Optional[str] = None, *, num_replicas: int = 2,
               device: Optional[str] = None, dtype: Optional[str] = None,
               served_model_name: Optional[str] = None, api_key: Optional[str] = None,
               ray_actor_options: Optional[dict[str, Any]] = None, **engine_options):
    """A bound Ray Serve application of ``num_replicas`` replicas of ``model`` (a local
    checkpoint directory; None: the built-in default model). ``engine_options`` go to each
    replica's :class:`AsyncEngine` (``max_num_seqs``, ``num_blocks``, ``max_queued``, ...);
    ``ray_actor_options`` to Ray (default: one CPU per replica)."""
    from fastdecode.serving.cli import model_name

    name = served_model_name or model_name(argparse.Namespace(served_model_name=None,
                                                              model=model))
    replica = serve.deployment(FastdecodeReplica, name="fastdecode", num_replicas=num_replicas,
                               ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return replica.bind(model, device, dtype, name, api_key, engine_options)


def serve_replicas(args: argparse.Namespace) -> int:
    """``fastdecode serve --replicas N``: start Ray locally, serve until Ctrl-C."""
    import ray

    from fastdecode.serving.cli import engine_options, model_name

    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = deployment(args.model, num_replicas=args.replicas, device=args.device,
                     dtype=args.dtype, served_model_name=model_name(args), api_key=args.api_key,
                     **engine_options(args))
    serve.run(app, name="fastdecode", route_prefix="/")
    print(f"fastdecode: {args.replicas} replicas serving on http://{args.host}:{args.port}/v1 "
          "(Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
