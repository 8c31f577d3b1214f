"""Reliability probes of the metadata of ``paged_attention`` / ``append_kv`` calls: degenerate
sizes, tensors on another device, non-finite or mistyped scalars, wrong shapes and dtypes (all
must raise before any kernel runs), and valid edge cases with their documented results."""

from __future__ import annotations

import torch

from probe_kit import Target, assert_close, expect_error, probe, rejects
from probes_attention import D, HKV, HQ, N, P, append, attention, entry, expected_rows

SIZES = "degenerate sizes"
DEVICES = "devices"
SCALARS = "scalars"
SHAPES = "shapes and dtypes"
EDGES = "valid edge cases"


def cache(shape, dtype=torch.float32):
    """A change: both caches replaced by zeros of ``shape``."""
    def change(args):
        return torch.zeros(shape, dtype=dtype, device=args["k_cache"].device)
    return change


def caches(shape, dtype=torch.float32) -> dict:
    return dict(k_cache=cache(shape, dtype), v_cache=cache(shape, dtype))


def moved(name: str, device: str = "meta"):
    return lambda a: a[name].to(device)


# ---------------------------------------------------------------------------- degenerate sizes
rejects("query_heads_zero", SIZES, lambda t: attention(
    t, query=lambda a: a["query"][:, :0]), ValueError, "num_qo_heads 0")
for size_name, shape in (("num_blocks", (0, P, HKV, D)), ("block_size", (N, 0, HKV, D)),
                         ("num_kv_heads", (N, P, 0, D)), ("head_dim", (N, P, HKV, 0)),
                         ("head_dim", (N, P, HKV, 257))):
    suffix = f"{size_name}_{max(shape)}" if size_name == "head_dim" else size_name
    rejects(f"cache_{suffix}", SIZES, lambda t, s=shape: attention(
        t, query=lambda a, d=s[3]: a["query"].new_zeros(2, HQ, d), **caches(s)),
        ValueError, size_name)
    rejects(f"append_cache_{suffix}", SIZES, lambda t, s=shape: append(
        t, [0], key=lambda a, s=s: a["key"].new_zeros(1, *s[2:]), value=lambda a, s=s:
        a["value"].new_zeros(1, *s[2:]), k_cache=cache(s), v_cache=cache(s)),
        ValueError, size_name)
rejects("positions_beyond_int32", SIZES, lambda t: attention(
    t, query=lambda a: a["query"].new_zeros(1, 1, 1), **caches((1, 2**20, 1, 1)),
    block_tables=lambda a: a["block_tables"].new_zeros(1, 2048),
    seq_lens=lambda a: a["seq_lens"][:1]), ValueError, "max_blocks_per_seq 2048")

# ------------------------------------------------------------------------------------- devices
for name in ("k_cache", "v_cache", "block_tables", "seq_lens"):
    rejects(f"{name}_on_meta", DEVICES, lambda t, n=name: attention(t, **{n: moved(n)}),
            ValueError, f"{name} is on meta", "one device")
rejects("out_on_meta", DEVICES, lambda t: attention(
    t, out=lambda a: torch.empty_like(a["query"], device="meta")), ValueError, "out is on meta")
rejects("cu_seqlens_q_on_meta", DEVICES, lambda t: attention(
    t, packed=True, cu_seqlens_q=moved("cu_seqlens_q")), ValueError, "cu_seqlens_q is on meta")
rejects("alibi_slopes_on_meta", DEVICES, lambda t: attention(
    t, alibi_slopes=torch.ones(HQ, device="meta")), ValueError, "alibi_slopes is on meta")
rejects("relative_bias_on_meta", DEVICES, lambda t: attention(
    t, relative_bias=torch.ones(HQ, 3, device="meta")), ValueError, "relative_bias is on meta")
rejects("workspace_on_meta", DEVICES, lambda t: attention(
    t, workspace=torch.empty(4096, device="meta")), ValueError, "workspace is on meta")
rejects("everything_on_meta", DEVICES, lambda t: attention(
    t, **{n: moved(n) for n in ("query", "k_cache", "v_cache", "block_tables", "seq_lens")}),
    ValueError, "CPU or CUDA device")
for name in ("key", "value", "v_cache", "slot_mapping"):
    rejects(f"append_{name}_on_meta", DEVICES, lambda t, n=name: append(
        t, [0, 1], **{n: moved(n)}), ValueError, f"{name} is on meta")

# ------------------------------------------------------------------------------------- scalars
for value in (float("inf"), float("nan"), 0.0, -1.0, 1e-45, 1e39):
    rejects(f"softcap_{value}", SCALARS, lambda t, v=value: attention(t, softcap=v),
            ValueError, "softcap")
for value in (float("inf"), float("-inf"), float("nan"), 1e39):
    rejects(f"scale_{value}", SCALARS, lambda t, v=value: attention(t, scale=v),
            ValueError, "scale")
for name, value in (("softcap", "3"), ("scale", True), ("sliding_window", 2.5),
                    ("sliding_window", "8"), ("causal", "yes"), ("causal", None)):
    rejects(f"{name}_{type(value).__name__}", SCALARS, lambda t, n=name, v=value: attention(
        t, **{n: v}), TypeError, name)


def bad_table(name: str, shape: tuple, value: float, dtype: torch.dtype):
    """A non-finite entry in a bias input (alibi_slopes, relative_bias)."""
    def run(t: Target) -> None:
        table = torch.zeros(shape, dtype=dtype, device=t.device)
        table.view(-1)[-1] = value
        if t.host_checked:
            expect_error(lambda: attention(t, **{name: table}), ValueError, name)
        else:  # CUDA outside the debug mode: biases are data, not ids; only no crash is owed
            attention(t, **{name: table})
    run.__name__ = f"{name}_{value}_{str(dtype).removeprefix('torch.')}"
    probe(SCALARS)(run)


for value, dtype in ((float("nan"), torch.float32), (float("inf"), torch.float32),
                     (1e39, torch.float64)):  # 1e39 is inf in float32
    bad_table("alibi_slopes", (HQ,), value, dtype)
    bad_table("relative_bias", (HQ, 5), value, dtype)

# ------------------------------------------------------------------------- shapes and dtypes
for name, change, exc, words in (
        ("query_2d", dict(query=lambda a: a["query"].flatten(1)), ValueError, "query"),
        ("query_head_dim", dict(query=lambda a: a["query"][..., :16]), ValueError, "query"),
        ("query_group", dict(query=lambda a: a["query"][:, :3]), ValueError, "num_qo_heads"),
        ("decode_tokens", dict(query=lambda a: a["query"][:1]), ValueError, "decode form"),
        ("tables_rows", dict(block_tables=lambda a: a["block_tables"][:1]), ValueError,
         "block_tables must have shape"),
        ("tables_1d", dict(block_tables=lambda a: a["block_tables"][0]), ValueError,
         "block_tables must have shape [2, *]"),
        ("seq_lens_2d", dict(seq_lens=lambda a: a["seq_lens"][:, None]), ValueError,
         "seq_lens"),
        ("query_float16", dict(query=lambda a: a["query"].half()), TypeError, "query dtype"),
        ("cache_float64", caches((N, P, HKV, D), torch.float64), TypeError, "k_cache"),
        ("v_cache_float16", dict(v_cache=lambda a: a["v_cache"].half()), TypeError, "v_cache"),
        ("cache_3d", caches((N, P, HKV * D)), ValueError, "k_cache"),
        ("cache_noncontiguous", dict(k_cache=lambda a: a["k_cache"][:, :, :, ::2],
                                     v_cache=lambda a: a["v_cache"][:, :, :, ::2],
                                     query=lambda a: a["query"][..., ::2]),
         ValueError, "contiguous"),
        ("tables_float", dict(block_tables=lambda a: a["block_tables"].float()), TypeError,
         "block_tables must be an integer"),
        ("tables_bool", dict(block_tables=lambda a: a["block_tables"] > 0), TypeError,
         "block_tables must be an integer"),
        ("tables_uint32", dict(block_tables=lambda a: a["block_tables"].to(torch.uint32)),
         TypeError, "block_tables must be an integer"),
        ("seq_lens_float", dict(seq_lens=lambda a: a["seq_lens"].double()), TypeError,
         "seq_lens"),
        ("alibi_int", dict(alibi_slopes=lambda a: torch.ones(HQ, dtype=torch.int32,
                                                             device=a["query"].device)),
         ValueError, "alibi_slopes"),
        ("alibi_shape", dict(alibi_slopes=lambda a: torch.ones(HQ + 1, device=a["query"].device)),
         ValueError, "alibi_slopes"),
        ("relative_bias_int", dict(relative_bias=lambda a: torch.ones(
            HQ, 3, dtype=torch.int32, device=a["query"].device)), ValueError, "relative_bias"),
        ("relative_bias_even_width", dict(relative_bias=lambda a: a["query"].new_ones(HQ, 4)),
         ValueError, "2 * R + 1"),
        ("relative_bias_heads", dict(relative_bias=lambda a: a["query"].new_ones(HQ + 1, 3)),
         ValueError, "relative_bias"),
        ("relative_bias_1d", dict(relative_bias=lambda a: a["query"].new_ones(HQ)), ValueError,
         "relative_bias"),
        ("out_shape", dict(out=lambda a: a["query"].new_empty(2, HQ, 16)), ValueError, "out"),
        ("out_dtype", dict(out=lambda a: a["query"].new_empty(2, HQ, D).half()), ValueError,
         "out"),
        ("out_noncontiguous", dict(out=lambda a: a["query"].new_empty(HQ, 2, D).transpose(0, 1)),
         ValueError, "out"),
        ("out_is_query", dict(out=lambda a: a["query"]), ValueError, "out overlaps query"),
        ("out_in_k_cache", dict(out=lambda a: a["k_cache"].view(-1)[: 2 * HQ * D]
                                .view(2, HQ, D)), ValueError, "out overlaps k_cache"),
        ("workspace_float16", dict(workspace=lambda a: a["query"].new_empty(4096).half()),
         ValueError, "workspace")):
    rejects(name, SHAPES, lambda t, c=change: attention(t, **c), exc, words)
rejects("cu_seqlens_length", SHAPES, lambda t: attention(
    t, packed=True, cu_seqlens_q=lambda a: a["cu_seqlens_q"][:2]), ValueError,
    "cu_seqlens_q must have shape [3]")
for name, change, exc, words in (
        ("append_key_shape", dict(key=lambda a: a["key"][:, :1]), ValueError, "key / value"),
        ("append_value_tokens", dict(value=lambda a: a["value"][:1]), ValueError, "key / value"),
        ("append_key_float16", dict(key=lambda a: a["key"].half()), TypeError, "key dtype"),
        ("append_slots_length", dict(slot_mapping=lambda a: a["slot_mapping"][:1]), ValueError,
         "slot_mapping must have shape [2]"),
        ("append_slots_2d", dict(slot_mapping=lambda a: a["slot_mapping"][None]), ValueError,
         "slot_mapping"),
        ("append_slots_float", dict(slot_mapping=lambda a: a["slot_mapping"].float()), TypeError,
         "slot_mapping must be an integer"),
        ("append_slots_uint64", dict(slot_mapping=lambda a: a["slot_mapping"].to(torch.uint64)),
         TypeError, "slot_mapping must be an integer"),
        ("append_cache_shapes", dict(v_cache=lambda a: a["v_cache"][:4]), ValueError,
         "v_cache shape")):
    rejects(name, SHAPES, lambda t, c=change: append(t, [0, 5], **c), exc, words)


# ---------------------------------------------------------------------------- valid edge cases
@probe(EDGES)
def attention_empty_batch(t: Target) -> None:
    for packed in (False, True):
        out = attention(t, packed, query=lambda a: a["query"][:0],
                        block_tables=lambda a: a["block_tables"][:0],
                        seq_lens=lambda a: a["seq_lens"][:0],
                        **({"cu_seqlens_q": lambda a: a["cu_seqlens_q"][:1]} if packed else {}))
        assert out.shape == (0, HQ, D), out.shape


@probe(EDGES)
def packed_without_query_tokens(t: Target) -> None:
    out = attention(t, True, query=lambda a: a["query"][:0],
                    cu_seqlens_q=lambda a: torch.zeros_like(a["cu_seqlens_q"]))
    assert out.shape == (0, HQ, D), out.shape


@probe(EDGES)
def zero_length_rows(t: Target) -> None:
    """seq_lens 0 (CUDA-graph padding) gives zeros, also with a table 0 blocks wide."""
    out = attention(t, seq_lens=lambda a: torch.zeros_like(a["seq_lens"]),
                    block_tables=lambda a: a["block_tables"][:, :0])
    assert bool((out == 0).all()), "rows of seq_lens 0 must be zeros"


@probe(EDGES)
def unread_table_entries_are_free(t: Target) -> None:
    """Table entries past a sequence's blocks are never read: any value is fine there."""
    out = attention(t, block_tables=entry("block_tables", (1, slice(1, None)), 10**8))
    assert_close(out, expected_rows(t, False), "out")


@probe(EDGES)
def index_dtypes(t: Target) -> None:
    """int64 / int16 / uint8 ids and lengths give the int32 result."""
    for dtype in (torch.int64, torch.int16, torch.uint8):
        out = attention(t, True, **{n: lambda a, n=n: a[n].to(dtype)
                                    for n in ("block_tables", "seq_lens", "cu_seqlens_q")})
        assert_close(out, expected_rows(t, True), f"{dtype}")


@probe(EDGES)
def windows_that_hide_nothing(t: Target) -> None:
    """sliding_window None, <= 0 or >= every position is no window (HF's meaning)."""
    for window in (-3, 0, 12, 2**40):
        assert_close(attention(t, sliding_window=window), expected_rows(t, False), f"{window}")


@probe(EDGES)
def odd_head_dims(t: Target) -> None:
    for d in (1, 3, 250):
        g = torch.Generator().manual_seed(d)
        kw = {n: (lambda a, x=torch.randn(*s, generator=g): x.to(a["query"].device))
              for n, s in (("query", (2, HQ, d)), ("k_cache", (N, P, HKV, d)),
                           ("v_cache", (N, P, HKV, d)))}
        assert_close(attention(t, **kw), expected_rows(t, False, **kw), f"head_dim {d}")


@probe(EDGES)
def append_nothing(t: Target) -> None:
    before, after, _ = append(t, [])
    assert torch.equal(before, after)


@probe(EDGES)
def preallocated_out(t: Target) -> None:
    out = torch.full((2, HQ, D), float("nan"), device=t.device)
    result = attention(t, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, expected_rows(t, False), "out")

