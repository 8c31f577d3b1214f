"""``fastdecode serve``: the OpenAI-compatible server from the command line.

One process by default; ``--replicas N`` runs N engine replicas behind Ray Serve's router
(:mod:`fastdecode.serving.ray`); ``--tensor-parallel-size N`` shards the model over N local
processes under ``torch.distributed`` (:mod:`fastdecode.serving.tp`). This module imports
neither FastAPI nor transformers until a server starts.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

API_KEY_ENV = "FASTDECODE_API_KEY"


def add_serve_parser(sub, **kwargs) -> None:
    """Add the ``serve`` subcommand to the command line's subparsers ``sub`` (``kwargs`` go to
    ``add_parser``)."""
    p = sub.add_parser("serve",
                       help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                       **kwargs)
    p.add_argument("--model", metavar="PATH", default=None,
                   help="local checkpoint directory (default: the built-in model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="(default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="(default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the "
                        "checkpoint directory's name, or 'fastdecode-default')")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: "
                        f"${API_KEY_ENV}, else none)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="tokens per forward pass (default: %(default)s)")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests waiting beyond --max-num-seqs before new ones get 429 "
                        "(default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds before a request is aborted (default: none)")
    p.add_argument("--block-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (default: sized from the free memory)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full (default: reuse cached prefix blocks)")
    p.add_argument("--replicas", type=int, default=1,
                   help="engine replicas behind Ray Serve's router (default: %(default)s: no "
                        "Ray)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="processes the model is sharded over (transformers' tp_plan, gloo on "
                        "CPU, NCCL on GPUs; default: %(default)s)")


def check(args: argparse.Namespace) -> Optional[str]:
    """A one-line complaint about the options, or None."""
    for name in ("port", "max_num_seqs", "max_batch_tokens", "block_size", "replicas",
                 "tensor_parallel_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_queued < 0:
        return f"--max-queued must be >= 0, got {args.max_queued}"
    if args.num_blocks is not None and args.num_blocks < 1:
        return f"--num-blocks must be >= 1, got {args.num_blocks}"
    if args.request_timeout is not None and not args.request_timeout > 0:
        return f"--request-timeout must be > 0, got {args.request_timeout}"
    if args.replicas > 1 and args.tensor_parallel_size > 1:
        return "--replicas and --tensor-parallel-size cannot be combined yet"
    return None


def engine_options(args: argparse.Namespace) -> dict:
    """AsyncEngine keyword arguments from the options."""
    return dict(max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                block_size=args.block_size, num_blocks=args.num_blocks,
                enable_prefix_caching=not args.no_prefix_caching, max_queued=args.max_queued,
                request_timeout=args.request_timeout)


def model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return os.path.basename(os.path.normpath(args.model)) if args.model else "fastdecode-default"


def run(args: argparse.Namespace, load) -> int:
    """Serve until interrupted. ``load(args) -> (model, tokenizer)`` loads the checkpoint."""
    problem = check(args)
    if problem:
        raise SystemExit(f"fastdecode serve: error: {problem}")
    if args.replicas > 1:
        from fastdecode.serving.ray import serve_replicas

        return serve_replicas(args)
    if args.tensor_parallel_size > 1:
        from fastdecode.serving.tp import serve_tensor_parallel

        return serve_tensor_parallel(args)
    import uvicorn

    from fastdecode.serving.async_engine import AsyncEngine
    from fastdecode.serving.server import build_app

    model, tokenizer = load(args)
    with AsyncEngine(model, **engine_options(args)) as engine:
        app = build_app(engine, tokenizer, model_name=model_name(args), api_key=args.api_key)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
