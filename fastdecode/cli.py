"""Command line: ``fastdecode generate | chat | bench | serve``.

Options follow ``model.generate``: ``--model PATH`` (a local checkpoint directory; without it the
built-in default model), ``--prompt``, ``--max-new-tokens``, ``--temperature``, ``--top-k``,
``--top-p``, ``--min-p``, ``--repetition-penalty``, ``--greedy``, ``--seed``, ``--no-stream``,
``--device cpu|cuda``, ``--dtype``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", metavar="PATH", help="local checkpoint directory "
                        "(default: the built-in model, see `fastdecode.hf.default_model`)")
    common.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    common.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    common.add_argument("--max-new-tokens", type=int, default=64)
    common.add_argument("--temperature", type=float, default=0.8)
    common.add_argument("--top-k", type=int, default=50)
    common.add_argument("--top-p", type=float, default=0.95)
    common.add_argument("--min-p", type=float, default=0.0)
    common.add_argument("--repetition-penalty", type=float, default=1.0)
    common.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--no-stream", action="store_true", help="print only the final text")
    parser = argparse.ArgumentParser(prog="fastdecode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="complete one prompt")
    gen.add_argument("--prompt", default="The quick brown fox")
    sub.add_parser("chat", parents=[common], help="interactive, streaming; quit/exit/Ctrl-C")
    bench = sub.add_parser("bench", parents=[common],
                           help="tokens/s of fastdecode.generate vs model.generate")
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--batch-size", type=int, default=1)
    from fastdecode.serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.greedy:
        if args.temperature <= 0:
            raise SystemExit(f"--temperature must be > 0 (use --greedy), got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}")
        if not 0 <= args.min_p <= 1:
            raise SystemExit(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.repetition_penalty <= 0:
        raise SystemExit(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")


def load(args: argparse.Namespace):
    """Return (model, tokenizer) on the requested device and dtype."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda"
                                                   else torch.float32)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     dtype=dtype)
    else:
        from fastdecode.hf.default_model import default_model_and_tokenizer

        model, tokenizer = default_model_and_tokenizer(dtype=dtype)
    return model.to(device).eval(), tokenizer


def _gen_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if args.greedy:
        return dict(kwargs, do_sample=False)
    return dict(kwargs, do_sample=True, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p or None)


def _complete(model, tokenizer, text: str, args: argparse.Namespace) -> str:
    import fastdecode
    from transformers import TextStreamer

    enc = tokenizer(text, return_tensors="pt").to(model.device)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = fastdecode.generate(model, **enc, streamer=streamer, **_gen_kwargs(args, tokenizer))
    reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if args.no_stream:
        print(reply, flush=True)
    return reply


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    if not args.no_stream:
        print(args.prompt, end="", flush=True)
    _complete(model, tokenizer, args.prompt, args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    print("fastdecode chat: type a message, `quit` or `exit` (or Ctrl-C) to leave.", flush=True)
    history = ""
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip().lower() in ("quit", "exit"):
            return 0
        if not line.strip():
            continue
        history += f"User: {line}\nAssistant:"
        try:
            history += _complete(model, tokenizer, history, args) + "\n"
        except KeyboardInterrupt:  # stop this reply, keep the session
            print()
        if not args.no_stream:
            print(flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    import fastdecode

    model, tokenizer = load(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.batch_size, args.prompt_len), generator=gen)
    ids = ids.to(model.device)
    kwargs = dict(_gen_kwargs(args, tokenizer), min_new_tokens=args.max_new_tokens)
    rows = []
    for name, run in (("model.generate", model.generate),
                      ("fastdecode.generate", lambda **kw: fastdecode.generate(model, **kw))):
        run(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)  # warm-up
        start = time.perf_counter()
        run(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        rows.append((name, args.batch_size * args.max_new_tokens / (time.perf_counter() - start)))
    print(f"{'':22}{'tokens/s':>10}")
    for name, tps in rows:
        print(f"{name:22}{tps:10.1f}")
    print(f"speed-up: {rows[1][1] / rows[0][1]:.2f}x")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from fastdecode.serving.cli import run

        return run(args, load)
    _check(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
