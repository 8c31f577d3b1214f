"""Speculative decoding: fastdecode.generate with and without drafts, same model, same run.

Target: the 135M Llama-shaped model (random weights), float32, batch 1, greedy (so every variant
produces the very same tokens). Variants, each timed alternately with plain decoding:

- ``draft-small``: a small random draft of the same vocabulary (2 layers, hidden 256). Random
  weights make its acceptance meaningless (near zero): this is the overhead case.
- ``draft-layers``: a draft made of the target's first ``--draft-layers`` layers with the target's
  embeddings, final norm and head (a self-speculative draft): acceptance is what a correlated draft
  gets from this target.
- ``prompt-lookup``: a prompt that repeats one phrase, drafts looked up in the sequence.
- ``engine-lookup``: the same prompt through ``fastdecode.Engine``, one request with
  ``SamplingParams(prompt_lookup_num_tokens=...)`` against the same request without it.
- ``trained-layers``: the shipped trained 3.5M default model (4 layers) as the target and its
  first ``--trained-draft-layers`` layers with its head as the draft: what a draft correlated with
  a trained target gets (random weights decorrelate the layers, so ``draft-layers`` gets little).

Acceptance rate = draft tokens kept / draft tokens proposed, counted over the timed runs.

    python benchmarks/bench_speculative.py [--new-tokens 64] [--repeats 3] [--threads N]

Writes benchmarks/results/speculative_<device>.{md,csv,png} (helpers from benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import transformers

import fastdecode
from common import Report
from fastdecode import Engine, SamplingParams
from fastdecode.engine import speculative as engine_speculative
from fastdecode.hf import speculative
from fastdecode.hf.default_model import DEFAULT_MODEL_DIR
from tiny import default_model


class Acceptance:
    """Counts kept / proposed draft tokens by wrapping the verifiers (generate's and the
    Engine's) while enabled."""

    def __init__(self):
        self.kept = self.proposed = 0
        self._call = speculative.Verifier.__call__
        self._accept = engine_speculative.accept

    def __enter__(self):
        counter, call, accept = self, self._call, self._accept

        def engine_counted(drawn, drafts):
            new = accept(drawn, drafts)
            counter.kept += sum(len(n) - 1 for n in new)
            counter.proposed += sum(map(len, drafts))
            return new
        engine_speculative.accept = engine_counted

        def counted(verifier, logits, drafts, lengths, probs):
            accepted, following = call(verifier, logits, drafts, lengths, probs)
            counter.kept += int(accepted.sum())
            counter.proposed += int(lengths.sum())
            return accepted, following
        speculative.Verifier.__call__ = counted
        return self

    def __exit__(self, *exc):
        speculative.Verifier.__call__ = self._call
        engine_speculative.accept = self._accept

    @property
    def rate(self) -> float:
        return self.kept / self.proposed if self.proposed else float("nan")


def small_draft(target) -> transformers.PreTrainedModel:
    cfg = target.config
    config = transformers.LlamaConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=640, vocab_size=cfg.vocab_size, tie_word_embeddings=True,
        max_position_embeddings=cfg.max_position_embeddings)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).eval()


def layer_draft(target, layers: int) -> transformers.PreTrainedModel:
    """The target's first ``layers`` decoder layers with its embeddings, final norm and head."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    draft = transformers.LlamaForCausalLM(config).eval()
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing, missing
    return draft


def engine_runs(model, ids: torch.Tensor, new_tokens: int, lookup: int):
    """(plain, speculative) runs of the prompt ``ids`` [1, L] through one Engine -> [1, L + new]
    greedy sequences."""
    engine = Engine(model, num_blocks=-(-(ids.shape[1] + new_tokens) // 16) + 1,
                    enable_prefix_caching=False)

    def run(k: int) -> torch.Tensor:
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, prompt_lookup_num_tokens=k)
        out = engine.generate([ids[0].tolist()], params)[0].output_ids
        return torch.cat([ids, torch.tensor([list(out)])], 1)
    return lambda: run(0), lambda: run(lookup)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens")
    parser.add_argument("--lookup-tokens", type=int, default=10,
                        help="prompt_lookup_num_tokens")
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--trained-draft-layers", type=int, default=2)
    parser.add_argument("--variants",
                        default="draft-small,draft-layers,prompt-lookup,engine-lookup,trained-layers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    random_prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=g)
    phrase = torch.randint(3, vocab, (1, 8), generator=g)
    repetitive = phrase.repeat(1, -(-args.prompt_len // 8))[:, :args.prompt_len]
    builders = {"draft-small": lambda: small_draft(model),
                "draft-layers": lambda: layer_draft(model, args.draft_layers)}
    # min_new_tokens: a random model may emit EOS early. fallback="error": never time
    # model.generate by accident.
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, fallback="error")

    def generate_runs(target, ids, extra):
        mask = torch.ones_like(ids)
        return (lambda: fastdecode.generate(target, ids, attention_mask=mask, **common),
                lambda: fastdecode.generate(target, ids, attention_mask=mask, **common, **extra))
    variants = {}
    for name in args.variants.split(","):
        if name == "prompt-lookup":
            variants[name] = generate_runs(model, repetitive,
                                           dict(prompt_lookup_num_tokens=args.lookup_tokens))
            continue
        if name == "engine-lookup":
            variants[name] = engine_runs(model, repetitive, args.new_tokens, args.lookup_tokens)
            continue
        if name == "trained-layers":
            target = transformers.AutoModelForCausalLM.from_pretrained(
                DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
            ids = torch.randint(3, target.config.vocab_size, (1, args.prompt_len), generator=g)
            draft = layer_draft(target, args.trained_draft_layers)
        else:
            target, ids, draft = model, random_prompt, builders[name]()
        draft.generation_config.num_assistant_tokens = args.draft_tokens
        variants[name] = generate_runs(target, ids, dict(assistant_model=draft))
    rows = []
    for name, (plain_run, spec_run) in variants.items():
        assert torch.equal(plain_run(), spec_run()), (
            f"{name}: speculative output differs from plain greedy")
        times = {"plain": [], "spec": []}
        with Acceptance() as acceptance:
            for _ in range(args.repeats):
                times["plain"].append(timed(plain_run))
                times["spec"].append(timed(spec_run))
        plain_t, spec_t = statistics.median(times["plain"]), statistics.median(times["spec"])
        rows.append(dict(variant=name, new_tokens=args.new_tokens,
                         plain_tok_s=round(args.new_tokens / plain_t, 2),
                         spec_tok_s=round(args.new_tokens / spec_t, 2),
                         speedup=round(plain_t / spec_t, 2),
                         acceptance=round(acceptance.rate, 3)))
        print(rows[-1], flush=True)
    report = Report("speculative", device="cpu")
    report.add_note(
        f"fastdecode.generate greedy, batch 1, on the 135M Llama-shaped model (random weights), "
        f"float32, {args.prompt_len}-token prompts, {args.new_tokens} new tokens; "
        f"num_assistant_tokens {args.draft_tokens}, prompt_lookup_num_tokens "
        f"{args.lookup_tokens}, draft-layers = first {args.draft_layers} of "
        f"{model.config.num_hidden_layers} layers; trained-layers: the shipped 3.5M model "
        f"drafted by its first {args.trained_draft_layers} layers; engine-lookup: the Engine, "
        f"one request, with and without prompt_lookup_num_tokens. "
        f"transformers {transformers.__version__}, "
        f"fastdecode {fastdecode.__version__}. Median of {args.repeats} runs alternating with "
        "plain decoding (the machine is shared). Every variant's output was checked equal to "
        "plain greedy before timing.")
    report.add_table("Tokens per second", rows)
    report.add_plot("speed-up against acceptance", rows, x="acceptance", y="speedup",
                    series="variant", logx=False)
    for path in report.write(Path(args.out)):
        print("wrote", path)


if __name__ == "__main__":
    main()
