"""T5's relative position bias on the paged cache: the bias as an input of ``paged_attention``
(a) against the model's own attention over the layer's KV gathered from the paged cache into
dense tensors every step (b), in one decode step of a Flan-T5-base-shaped decoder (random
weights), same run; transformers' own decoder step on its DynamicCache as the reference point.

Both variants run the same step: the decoder's own projections, layer norms and feed-forward
blocks, KV appended to a paged self-attention cache, cross-attention through ``paged_attention``
(``causal=False``) over a paged encoder cache. Only the self-attention core differs:

- (a) ``paged_attention(..., scale=1.0, relative_bias=table)`` with ``table`` [Hq, 2R + 1] built
  once from the model's bias embedding and its own bucket function (R = max_distance);
- (b) the slots of every sequence gathered with one ``index_select`` per layer (the slot list
  is built once per step), the bias of layer 0 from the model's ``compute_bias`` (once per step,
  shared by the layers as in T5), and the model's attention function (``sdpa`` or ``eager``).

Every sequence of a batch has the same length, so (b) needs no padding mask (its best case).
The two variants' logits are checked to agree before timing.

    python benchmarks/bench_t5_bias.py [--lengths 128,512,2048] [--batches 1,8] [--repeat 9]

Writes benchmarks/results/t5_bias_cpu.{md,csv,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import fastdecode.ops as ops
from common import Report, time_interleaved

BLOCK = 16
ENCODER_LEN = 128


def flan_t5_base() -> T5ForConditionalGeneration:
    """Flan-T5-base's shapes (gated-gelu, untied head), random weights, float32."""
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                      num_decoder_layers=12, num_heads=12, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


def bias_table(attention) -> torch.Tensor:
    """[Hq, 2R + 1] with R = max_distance: T5's bucketed bias per relative distance j - i
    (every distance beyond R falls in the same bucket as R)."""
    r = attention.relative_attention_max_distance
    buckets = attention._relative_position_bucket(
        torch.arange(-r, r + 1), bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets, max_distance=r)
    return attention.relative_attention_bias.weight[buckets].T.contiguous()


class PagedCache:
    """One [N, P, H, D] key and value pool per layer; ``batch`` sequences of ``length`` tokens in
    shuffled blocks (random contents: the step's cost does not depend on them)."""

    def __init__(self, layers: int, batch: int, length: int, heads: int, head_dim: int):
        per_seq = -(-length // BLOCK)
        self.num_blocks = batch * per_seq
        order = torch.randperm(self.num_blocks, dtype=torch.int32)
        self.tables = order.view(batch, per_seq)
        self.lens = torch.full((batch,), length, dtype=torch.int32)
        shape = (self.num_blocks, BLOCK, heads, head_dim)
        self.k = [torch.randn(shape) for _ in range(layers)]
        self.v = [torch.randn(shape) for _ in range(layers)]

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] positions -> [B, S] slots."""
        blocks = self.tables.long().gather(1, positions // BLOCK)
        return blocks * BLOCK + positions % BLOCK


class DecoderStep:
    """One decode step (one new token per sequence at position ``length - 1``)."""

    def __init__(self, model, batch: int, length: int):
        cfg = model.config
        self.model, self.dec = model, model.decoder
        self.batch, self.length = batch, length
        self.heads, self.head_dim = cfg.num_heads, cfg.d_kv
        layers = cfg.num_decoder_layers
        self.self_cache = PagedCache(layers, batch, length, self.heads, self.head_dim)
        self.cross_cache = PagedCache(layers, batch, ENCODER_LEN, self.heads, self.head_dim)
        first = self.dec.block[0].layer[0].SelfAttention
        self.table = bias_table(first)
        self.first = first
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, None)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, 1))
        self.new_slots = self.self_cache.slots(torch.full((batch, 1), length - 1))[:, 0]

    def _project(self, attention, x):
        b, h, d = self.batch, self.heads, self.head_dim
        return (attention.q(x).view(b, h, d), attention.k(x).view(b, h, d),
                attention.v(x).view(b, h, d))

    def __call__(self, variant: str) -> torch.Tensor:
        c, x_cache = self.self_cache, self.cross_cache
        b, n = self.batch, self.length
        if variant == "gather":
            all_slots = c.slots(torch.arange(n).expand(b, n)).flatten()
            bias = self.first.compute_bias(1, n, past_seen_tokens=n - 1)
        h = self.dec.embed_tokens(self.ids)
        for i, block in enumerate(self.dec.block):
            sa = block.layer[0]
            q, k, v = self._project(sa.SelfAttention, sa.layer_norm(h))
            ops.append_kv_unchecked(k, v, c.k[i], c.v[i], self.new_slots)
            if variant == "bias":
                ctx = ops.paged_attention_unchecked(q, c.k[i], c.v[i], c.tables, c.lens,
                                                    scale=1.0, relative_bias=self.table)
            else:
                pool = (-1, self.heads, self.head_dim)
                dense_k = c.k[i].view(pool).index_select(0, all_slots).view(b, n, self.heads, -1)
                dense_v = c.v[i].view(pool).index_select(0, all_slots).view(b, n, self.heads, -1)
                ctx, _ = self.attend(sa.SelfAttention, q[:, :, None], dense_k.transpose(1, 2),
                                     dense_v.transpose(1, 2), None, scaling=1.0,
                                     position_bias=bias)
            h = h + sa.SelfAttention.o(ctx.reshape(b, 1, -1))
            ca = block.layer[1]
            q = ca.EncDecAttention.q(ca.layer_norm(h)).view(b, self.heads, self.head_dim)
            ctx = ops.paged_attention_unchecked(q, x_cache.k[i], x_cache.v[i], x_cache.tables,
                                                x_cache.lens, scale=1.0, causal=False)
            h = h + ca.EncDecAttention.o(ctx.reshape(b, 1, -1))
            h = block.layer[2](h)
        return self.model.lm_head(self.dec.final_layer_norm(h))[:, 0]


class HFStep:
    """transformers' own decoder step at the same length: its DynamicCache, cropped back after
    each step so that every timed step sees ``length - 1`` cached tokens."""

    def __init__(self, model, batch: int, length: int):
        self.model = model
        cfg = model.config
        self.encoder_states = torch.randn(batch, ENCODER_LEN, cfg.d_model)
        self.cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
        prompt = torch.randint(0, cfg.vocab_size, (batch, length - 1))
        with torch.inference_mode():
            model.decoder(input_ids=prompt, encoder_hidden_states=self.encoder_states,
                          past_key_values=self.cache, use_cache=True)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, 1))
        self.length = length

    def __call__(self) -> torch.Tensor:
        out = self.model.decoder(input_ids=self.ids, encoder_hidden_states=self.encoder_states,
                                 past_key_values=self.cache, use_cache=True)
        self.cache.self_attention_cache.crop(-1)  # drop the token just appended
        return self.model.lm_head(out.last_hidden_state)[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = flan_t5_base()
    rows = []
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            for length in map(int, args.lengths.split(",")):
                step = DecoderStep(model, batch, length)
                torch.testing.assert_close(step("bias"), step("gather"), rtol=1e-4, atol=1e-4)
                hf = HFStep(model, batch, length)
                times = time_interleaved({"bias": lambda: step("bias"),
                                          "gather": lambda: step("gather"), "hf": hf},
                                         repeat=args.repeat)
                a, g, h = (times[k][0] for k in ("bias", "gather", "hf"))
                rows.append(dict(batch=batch, length=length, bias_ms=a, gather_ms=g, hf_ms=h,
                                 gather_over_bias=g / a, hf_over_bias=h / a))
                print(rows[-1], flush=True)
    report = Report("t5_bias", device="cpu")
    report.add_table("Decode step of a Flan-T5-base-shaped decoder (12 layers, 12 heads, "
                     f"encoder {ENCODER_LEN} tokens), ms, median of interleaved runs", rows)
    report.add_note("`bias_ms`: (a) relative bias inside paged_attention; `gather_ms`: (b) KV "
                    "gathered into dense tensors each step, the model's own attention; `hf_ms`: "
                    "transformers' decoder step on its DynamicCache (reference point). Ratios "
                    "are against (a).")
    plot_rows = [dict(length=r["length"], ms=r[k], method=f"{k[:-3]} B={r['batch']}")
                 for r in rows for k in ("bias_ms", "gather_ms", "hf_ms")]
    report.add_plot("decode step", plot_rows, x="length", y="ms", series="method")
    paths = report.write(*([] if args.out is None else [Path(args.out)]))
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
