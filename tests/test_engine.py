"""Engine end to end on tiny random-weight Llama models: batch invariance against decoding each
prompt alone, preemption, packed mixed steps, streaming, abort, validation."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

# ---------------------------------------------------------------- TEMPORARY paged runner stub
# Stands in for fastdecode.hf.runner until that module lands; removed once it does.
try:
    importlib.import_module("fastdecode.hf.runner")
except ImportError:
    from transformers import AttentionInterface

    from fastdecode import ops
    from fastdecode.hf.context import PagedContext

    def _build(block_tables, seq_lens, query_lens, block_size, device, backend="auto"):
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables],
                              dtype=torch.int32, device=device)
        cu = [0]
        slots = []
        for t, s, q in zip(block_tables, seq_lens, query_lens):
            cu.append(cu[-1] + q)
            slots += [t[i // block_size] * block_size + i % block_size for i in range(s - q, s)]
        return PagedContext(tables, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                            torch.tensor(cu, dtype=torch.int32, device=device),
                            torch.tensor(slots, dtype=torch.int64, device=device),
                            all(q == 1 for q in query_lens),
                            torch.tensor(cu[1:], device=device) - 1, backend)

    PagedContext.build = staticmethod(_build)

    def _attention(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kw):
        ctx, runner = kw["fastdecode_ctx"], kw["fastdecode_runner"]
        kc, vc = runner.k_caches[module.layer_idx], runner.v_caches[module.layer_idx]
        ops.append_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), kc, vc,
                      ctx.slot_mapping, backend=ctx.backend)
        out = ops.paged_attention(query[0].transpose(0, 1).contiguous(), kc, vc,
                                  ctx.block_tables, ctx.seq_lens, cu_seqlens_q=ctx.cu_seqlens_q,
                                  scale=scaling, backend=ctx.backend)
        return out[None], None

    AttentionInterface.register("fastdecode_stub", _attention)

    class PagedRunner:
        def __init__(self, model, *, num_blocks, block_size=16, kv_dtype=None, device=None,
                     backend="auto"):
            cfg = model.config
            hkv = cfg.num_key_value_heads
            d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            shape = (num_blocks, block_size, hkv, d)
            dtype = kv_dtype or model.dtype
            self.k_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
            self.v_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
            self.model = model
            self.forward_calls = 0

        def forward(self, input_ids, positions, ctx):
            self.forward_calls += 1
            self.model.set_attn_implementation("fastdecode_stub")
            out = self.model(input_ids=input_ids[None], position_ids=positions[None],
                             use_cache=False, fastdecode_ctx=ctx, fastdecode_runner=self)
            return out.logits[0, ctx.logits_indices].float()

    stub = types.ModuleType("fastdecode.hf.runner")
    stub.PagedRunner = PagedRunner
    sys.modules["fastdecode.hf.runner"] = stub
# ---------------------------------------------------------------- end of stub

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastdecode import Engine, SamplingParams  # noqa: E402

EOS = 2
VOCAB = 97


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()
