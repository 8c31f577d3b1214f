"""Command line: ``fastdecode generate | chat | bench | serve``.

Every error is one line on stderr, never a traceback: exit status 2 for a bad option, a checkpoint
that does not load or a prompt that does not fit, 1 for a failure while generating, 130 for
Ctrl-C. transformers is reached only through :mod:`fastdecode.hf`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from fastdecode.ops import _rules

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAILURE, USAGE_ERROR, INTERRUPTED = 1, 2, 130

DESCRIPTION = """\
Generate text with fastdecode: a Hugging Face causal language model decoded over fastdecode's
paged KV cache and fused sampling. Without --model, the small built-in model (trained on Python
docstrings) is used; nothing is downloaded.

sampling, in the order it is applied:
  repetition penalty  divides the positive logits (multiplies the negative ones) of every token
                      already in the prompt or the output by R, so repeats become less likely
  temperature         divides the logits by T: below 1 sharpens the distribution, above 1
                      flattens it
  top-k               keeps only the K most likely tokens (0 keeps all)
  top-p               keeps the smallest set of most likely tokens whose probabilities add up to P
  min-p               drops tokens less likely than P times the most likely token (0 keeps all)
  --greedy            ignores temperature, top-k, top-p and min-p and always takes the most
                      likely token
"""


class UsageError(Exception):
    """A bad option or input; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = _Parser(add_help=False)
    common.add_argument("--model", metavar="PATH", default=None,
                        help="local checkpoint directory (default: the built-in model)")
    common.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="(default: cuda if available, else cpu)")
    common.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="(default: bfloat16 on cuda, float32 on cpu)")
    _add_numbers(common, "common")
    common.add_argument("--greedy", action="store_true",
                        help="greedy decoding instead of sampling (default: sample)")
    common.add_argument("--no-stream", action="store_true",
                        help="print only the final text (default: stream tokens as they come)")
    common.add_argument("--truncate-prompt", action="store_true",
                        help="when prompt + new tokens exceed the model's context, keep the end of "
                             "the prompt with a warning (default: refuse the prompt)")
    parser = _Parser(prog="fastdecode", description=DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", parents=[common], help="complete one prompt",
                         description=DESCRIPTION, formatter_class=fmt)
    gen.add_argument("--prompt", default="The quick brown fox",
                     help="text to complete (default: %(default)r)")
    sub.add_parser("chat", parents=[common], help="interactive, streaming; quit/exit/Ctrl-C",
                   description=DESCRIPTION, formatter_class=fmt)
    bench = sub.add_parser("bench", parents=[common],
                           help="tokens/s of fastdecode.generate vs model.generate",
                           description=DESCRIPTION, formatter_class=fmt)
    _add_numbers(bench, "bench")
    from fastdecode.serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


@dataclass(frozen=True)
class _Number:
    """A numeric option: its parser (type, default, metavar, help) and its valid range."""

    type: type
    default: Optional[float]
    metavar: str
    help: str
    rule: Optional[str] = None  # the name of its range in fastdecode.ops._rules
    valid: Optional[Callable[[Any], bool]] = None  # checked first: the command line's own range
    allowed: str = ""  # ``valid`` in words
    scope: str = "common"  # "common" (every command) or "bench"
    sampling_only: bool = False  # ignored (and not checked) with --greedy


# Every numeric option of the command line and its range: sampling parameters follow the shared
# rule table of the ops (`rule`); `valid` / `allowed` add what only the command line asks.
_NUMBERS = {
    "max-new-tokens": _Number(int, 64, "N", "tokens to generate", rule="max_new_tokens"),
    "temperature": _Number(float, 0.8, "T", "sampling temperature, > 0", rule="temperature",
                           valid=lambda v: math.isfinite(v) and v > 0,
                           allowed="a finite number > 0 (or use --greedy)",
                           sampling_only=True),
    "top-k": _Number(int, 50, "K", "keep the K most likely tokens, 0 = all", rule="top_k",
                     valid=lambda v: v >= 0, allowed=">= 0 (0 keeps every token)",
                     sampling_only=True),
    "top-p": _Number(float, 0.95, "P", "nucleus mass in (0, 1], 1 = off", rule="top_p",
                     sampling_only=True),
    "min-p": _Number(float, 0.0, "P", "relative probability floor in [0, 1], 0 = off",
                     rule="min_p", sampling_only=True),
    "repetition-penalty": _Number(float, 1.0, "R", "> 0, 1 = off", rule="repetition_penalty"),
    "seed": _Number(int, None, "S", "random seed in [0, 2**63), None = a different draw each run",
                    rule="seed"),
    "prompt-len": _Number(int, 32, "N", "random prompt tokens per row", valid=lambda v: v >= 1,
                          allowed=">= 1", scope="bench"),
    "batch-size": _Number(int, 1, "B", "rows per call", valid=lambda v: v >= 1, allowed=">= 1",
                          scope="bench"),
}


def _add_numbers(parser: argparse.ArgumentParser, scope: str) -> None:
    for flag, number in _NUMBERS.items():
        if number.scope == scope:
            parser.add_argument(f"--{flag}", type=number.type, default=number.default,
                                metavar=number.metavar,
                                help=f"{number.help} (default: %(default)s)")


def _check(args: argparse.Namespace) -> None:
    for flag, number in _NUMBERS.items():
        name = flag.replace("-", "_")
        if not hasattr(args, name) or (args.greedy and number.sampling_only):
            continue
        value = getattr(args, name)
        if value is None:  # an optional number left unset (--seed)
            continue
        if number.valid is not None and not number.valid(value):
            raise UsageError(f"--{flag} must be {number.allowed}; got {value}")
        if number.rule is not None:
            try:
                _rules.check(number.rule, value, label=f"--{flag}")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise UsageError("--prompt must not be empty")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")


def load(args: argparse.Namespace):
    """Return (model, tokenizer) on the requested device and dtype."""
    from fastdecode.hf import frontend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda"
                                                   else torch.float32)
    try:
        return frontend.load(args.model, device, dtype)
    except frontend.LoadError as exc:
        raise UsageError(str(exc)) from None


def _gen_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                  pad_token_id=pad)
    if args.greedy:
        return dict(kwargs, do_sample=False)
    return dict(kwargs, do_sample=True, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p or None)


def _fit(ids: torch.Tensor, model, args: argparse.Namespace) -> torch.Tensor:
    """ids: [1, L] prompt; refuse it, or keep its end, when L + new tokens exceed the context."""
    from fastdecode.hf.frontend import context_length

    context = context_length(model)
    if context is None or ids.shape[1] + args.max_new_tokens <= context:
        return ids
    room = context - args.max_new_tokens
    if room < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {context} tokens")
    if not args.truncate_prompt:
        raise UsageError(f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens "
                         f"{args.max_new_tokens} it exceeds the model's context of {context} "
                         f"tokens (--truncate-prompt keeps its last {room} tokens)")
    print(f"fastdecode: warning: prompt truncated to its last {room} of {ids.shape[1]} tokens "
          f"to fit the model's context of {context}", file=sys.stderr, flush=True)
    return ids[:, -room:]


def _complete(model, tokenizer, text: str, args: argparse.Namespace) -> str:
    import fastdecode
    from fastdecode.hf.frontend import TextStreamer

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("the prompt encodes to no tokens")
    ids = _fit(ids, model, args).to(model.device)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True,
                                                        skip_special_tokens=True)
    out = fastdecode.generate(model, ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                              **_gen_kwargs(args, tokenizer))
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
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
        turn = f"User: {line}\nAssistant:"
        try:
            history += turn + _complete(model, tokenizer, history + turn, args) + "\n"
        except KeyboardInterrupt:  # stop this reply, keep the session
            print()
        except UsageError as exc:  # e.g. the conversation outgrew the context: drop this turn
            print(f"fastdecode: error: {exc}", file=sys.stderr, flush=True)
        if not args.no_stream:
            print(flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    import fastdecode

    model, tokenizer = load(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.batch_size, args.prompt_len), generator=gen)
    ids = _fit(ids, model, args).to(model.device)
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
    """Run the command line; returns the exit status (0; 1, 2 or 130, see the module doc)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "serve":
            from fastdecode.serving.cli import run

            return run(args, load)
        _check(args)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        return {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench}[args.command](args)
    except UsageError as exc:
        print(f"fastdecode: error: {exc}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # end a half-streamed line
        print("fastdecode: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as exc:  # a failure while running: one line, not a traceback
        lines = str(exc).strip().splitlines()
        print(f"fastdecode: error: {type(exc).__name__}: {lines[0] if lines else ''}",
              file=sys.stderr, flush=True)
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())
