"""Reliability probes of direct ``torch.ops.fastdecode.*`` calls: the C++ adapters check shapes,
dtypes, devices and scalars on every device (csrc/common/checks.h) and, on CPU, every id before a
kernel follows it; nothing a direct caller passes may crash the process."""

from __future__ import annotations

import torch

from probe_kit import Target, probe, rejects
from probes_attention import D, HKV, HQ, N, P, attn_args, entry

DIRECT = "direct torch.ops calls"
ERRORS = (ValueError, TypeError)  # as from the public ops: TypeError for dtypes
V = 50


def attention(t: Target, **change) -> torch.Tensor:
    a = attn_args(t, change.pop("packed", False), **change)
    out = a["out"] if "out" in a else torch.empty_like(a["query"])
    torch.ops.fastdecode.paged_attention(
        out, a["query"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"],
        a.get("cu_seqlens_q"), a.get("scale", 0.25), True, a.get("softcap", 0.0),
        a.get("sliding_window", 0), a.get("alibi_slopes"), a.get("relative_bias"))
    return out


def append(t: Target, slots, **change) -> None:
    dev = t.device
    a = dict(key=torch.randn(len(slots), HKV, D, device=dev),
             value=torch.randn(len(slots), HKV, D, device=dev),
             k_cache=torch.zeros(N, P, HKV, D, device=dev),
             v_cache=torch.zeros(N, P, HKV, D, device=dev),
             slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev))
    a.update({k: v(a) if callable(v) else v for k, v in change.items()})
    torch.ops.fastdecode.append_kv(a["key"], a["value"], a["k_cache"], a["v_cache"],
                                   a["slot_mapping"])


def cache(shape):
    return lambda a: torch.zeros(shape, device=a["k_cache"].device)


BOTH = ("cpu", "cuda")
for name, change, words in (
        ("query_heads_zero", dict(query=lambda a: a["query"][:, :0]), "num_qo_heads 0"),
        ("block_size_zero", dict(k_cache=cache((N, 0, HKV, D)), v_cache=cache((N, 0, HKV, D))),
         "block_size"),
        ("kv_heads_zero", dict(k_cache=cache((N, P, 0, D)), v_cache=cache((N, P, 0, D))),
         "num_kv_heads"),
        ("head_dim_zero", dict(k_cache=cache((N, P, HKV, 0)), v_cache=cache((N, P, HKV, 0)),
                               query=lambda a: a["query"][..., :0]), "head_dim"),
        ("head_dim_300", dict(k_cache=cache((N, P, HKV, 300)), v_cache=cache((N, P, HKV, 300)),
                              query=lambda a: a["query"].new_zeros(2, HQ, 300)), "head_dim"),
        ("tables_int64", dict(block_tables=lambda a: a["block_tables"].long()),
         "block_tables must be Int"),
        ("seq_lens_int64", dict(seq_lens=lambda a: a["seq_lens"].long()), "seq_lens must be Int"),
        ("tables_rows", dict(block_tables=lambda a: a["block_tables"][:1]), "seq_lens"),
        ("decode_tokens", dict(query=lambda a: a["query"][:1]), "decode form"),
        ("query_strided", dict(query=lambda a: a["query"].transpose(1, 2).contiguous()
                               .transpose(1, 2)), "contiguous last dim"),
        ("out_shape", dict(out=lambda a: a["query"].new_empty(3, HQ, D)), "out shape"),
        ("v_cache_on_meta", dict(v_cache=lambda a: a["v_cache"].to("meta")), "v_cache is on meta"),
        ("out_on_meta", dict(out=lambda a: torch.empty_like(a["query"], device="meta")),
         "on meta"),
        ("scale_nan", dict(scale=float("nan")), "scale"),
        ("softcap_inf", dict(softcap=float("inf")), "softcap"),
        ("softcap_negative", dict(softcap=-1.0), "softcap"),
        ("sliding_window_negative", dict(sliding_window=-1), "sliding_window"),
        ("sliding_window_huge", dict(sliding_window=2**40), "sliding_window"),
        ("alibi_float64", dict(alibi_slopes=lambda a: a["query"].new_ones(HQ).double()),
         "alibi_slopes must be Float"),
        ("alibi_shape", dict(alibi_slopes=lambda a: a["query"].new_ones(HQ + 1)), "alibi_slopes"),
        ("cu_seqlens_length", dict(packed=True, cu_seqlens_q=lambda a: a["cu_seqlens_q"][:2]),
         "cu_seqlens_q")):
    rejects(f"direct_{name}", DIRECT, lambda t, c=change: attention(t, **dict(c)), ERRORS, words,
            backends=BOTH)
# relative_bias: checked by the CPU adapter; the CUDA kernel has none and refuses any table.
for name, change, words in (
        ("relative_bias_float64", dict(relative_bias=lambda a: a["query"].new_ones(HQ, 3)
                                       .double()), "relative_bias must be Float"),
        ("relative_bias_even_width", dict(relative_bias=lambda a: a["query"].new_ones(HQ, 4)),
         "2 * R + 1"),
        ("relative_bias_heads", dict(relative_bias=lambda a: a["query"].new_ones(HQ + 1, 3)),
         "relative_bias")):
    rejects(f"direct_{name}", DIRECT, lambda t, c=change: attention(t, **dict(c)), ERRORS, words,
            backends=("cpu",))
rejects("direct_relative_bias_on_cuda", DIRECT, lambda t: attention(
    t, relative_bias=torch.zeros(HQ, 3, device=t.device)), ERRORS, "has no relative_bias",
    backends=("cuda",))
for name, slots, change, words in (
        ("append_block_size_zero", [0], dict(k_cache=cache((N, 0, HKV, D)),
                                             v_cache=cache((N, 0, HKV, D))), "block_size"),
        ("append_slots_int32", [0], dict(slot_mapping=lambda a: a["slot_mapping"].int()),
         "slot_mapping must be Long"),
        ("append_key_heads", [0], dict(key=lambda a: a["key"][:, :1]), "key"),
        ("append_v_cache_on_meta", [0], dict(v_cache=lambda a: a["v_cache"].to("meta")),
         "v_cache is on meta")):
    rejects(f"direct_{name}", DIRECT, lambda t, s=slots, c=change: append(t, s, **c), ERRORS,
            words, backends=BOTH)

# Values: checked on the host by the CPU adapters (the CUDA kernels guard instead).
for name, change, words in (
        ("block_id_huge", dict(block_tables=entry("block_tables", (0, 1), 10**8)),
         "block_tables[0, 1] = 100000000"),
        ("block_id_minus1", dict(block_tables=entry("block_tables", (0, 1), -1)),
         "block_tables[0, 1] = -1"),
        ("seq_len_over", dict(seq_lens=entry("seq_lens", 1, 13)), "seq_lens[1] = 13"),
        ("cu_seqlens_not_monotonic", dict(packed=True, query=lambda a: a["query"][:3],
                                          cu_seqlens_q=lambda a: a["cu_seqlens_q"].new_tensor(
                                              [0, 4, 3])), "non-decreasing"),
        ("cu_seqlens_not_from_zero", dict(packed=True, cu_seqlens_q=lambda a: a[
            "cu_seqlens_q"].new_tensor([1, 3, 5])), "must run from 0"),
        ("cu_seqlens_more_queries_than_kv", dict(packed=True, seq_lens=entry("seq_lens", 0, 2)),
         "cu_seqlens_q gives seq 0"),
        ("alibi_nan", dict(alibi_slopes=lambda a: a["query"].new_full((HQ,), float("nan"))),
         "alibi_slopes[0]"),
        ("relative_bias_inf", dict(relative_bias=lambda a: a["query"].new_zeros(HQ, 3).index_fill(
            1, torch.tensor([2], device=a["query"].device), float("inf"))),
         "relative_bias[0, 2]")):
    rejects(f"direct_{name}", DIRECT, lambda t, c=change: attention(t, **dict(c)), ERRORS, words,
            backends=("cpu",))
rejects("direct_slot_one_past_end", DIRECT, lambda t: append(t, [3, N * P]), ERRORS,
        "slot_mapping[1] = 32", backends=("cpu",))


# ------------------------------------------------------------------------------------ sampling
def sample(t: Target, op: str = "sample", *, rows: int = 3, vocab: int = V, **change):
    dev = t.device
    a = dict(logits=torch.randn(rows, vocab, device=dev),
             temperature=torch.full((rows,), 0.8, device=dev),
             top_k=torch.full((rows,), 5, dtype=torch.int32, device=dev),
             top_p=torch.full((rows,), 0.9, device=dev), min_p=torch.zeros(rows, device=dev),
             repetition_penalty=torch.full((rows,), 1.2, device=dev),
             seen_tokens=torch.tensor([[1, -1]] * rows, device=dev).view(rows, 2),
             seeds=torch.arange(rows, device=dev), offsets=torch.zeros(rows, dtype=torch.long,
                                                                      device=dev))
    a.update({k: v(a) if callable(v) else v for k, v in change.items()})
    args = [a[k] for k in ("logits", "temperature", "top_k", "top_p", "min_p",
                           "repetition_penalty", "seen_tokens")]
    if op == "sample":
        return torch.ops.fastdecode.sample(*args, a["seeds"], a["offsets"])
    return torch.ops.fastdecode.process_logits(*args)


for name, change, words in (
        ("logits_float64", dict(logits=lambda a: a["logits"].double()), "logits must be float32"),
        ("top_k_int64", dict(top_k=lambda a: a["top_k"].long()), "top_k must be Int"),
        ("temperature_rows", dict(temperature=lambda a: a["temperature"][:2]),
         "temperature must have shape"),
        ("seeds_int32", dict(seeds=lambda a: a["seeds"].int()), "seeds must be Long"),
        ("seen_tokens_on_meta", dict(seen_tokens=lambda a: a["seen_tokens"].to("meta")),
         "seen_tokens is on meta"),
        ("seen_tokens_float", dict(seen_tokens=lambda a: a["seen_tokens"].float()),
         "seen_tokens must be Long")):
    rejects(f"direct_sample_{name}", DIRECT, lambda t, c=change: sample(t, **c), ERRORS, words,
            backends=BOTH)
rejects("direct_sample_vocab_zero", DIRECT, lambda t: sample(t, vocab=0), ERRORS, "vocab_size",
        backends=BOTH)
rejects("direct_sample_seen_tokens_outside_vocab", DIRECT, lambda t: sample(
    t, seen_tokens=lambda a: a["seen_tokens"] + V), ERRORS, "seen_tokens", backends=("cpu",))


@probe(DIRECT, backends=BOTH)
def direct_sample_empty_batch(t: Target) -> None:
    assert sample(t, rows=0).shape == (0,)


@probe(DIRECT, backends=BOTH)
def direct_sample_any_row_values(t: Target) -> None:
    """Per-row values the public ops would refuse: a direct caller gets some id in [-1, V) (or
    an error), never a crash or an id outside the vocabulary."""
    extremes = dict(temperature=[-1.0, float("nan"), float("inf"), 1e-45],
                    top_k=[2**31 - 1, -5, V, V + 1],
                    top_p=[0.0, -1.0, float("nan"), 2.0],
                    min_p=[float("nan"), -1.0, 2.0],
                    repetition_penalty=[0.0, -1.0, float("nan"), float("inf")])
    for name, values in extremes.items():
        for value in values:
            def spoil(a, n=name, v=value):
                return torch.full_like(a[n], v)
            ids = sample(t, **{name: spoil})
            assert bool(((ids >= -1) & (ids < V)).all()), f"{name}={value}: {ids.tolist()}"
