"""PagedRunner / PagedContext: packed steps over the paged cache give HF's logits."""

from __future__ import annotations

import pytest
import torch

from _hf_helpers import BACKEND
from fastdecode.hf.context import PagedContext
from fastdecode.hf.runner import PagedRunner
from tiny import tiny_model

P = 4


def test_build_slot_mapping_and_offsets():
    ctx = PagedContext.build([[5, 2], [7], [1, 3, 0]], seq_lens=[6, 3, 9], query_lens=[2, 1, 3],
                             block_size=P, device="cpu")
    # seq 0: positions 4, 5 -> block 2; seq 1: position 2 -> block 7; seq 2: 6, 7, 8 -> 3, 3, 0
    assert ctx.slot_mapping.tolist() == [8, 9, 30, 14, 15, 0]
    assert ctx.cu_seqlens_q.tolist() == [0, 2, 3, 6]
    assert ctx.logits_indices.tolist() == [1, 2, 5]
    assert ctx.block_tables.tolist() == [[5, 2, 0], [7, 0, 0], [1, 3, 0]]
    assert ctx.block_tables.dtype == ctx.seq_lens.dtype == torch.int32
    assert not ctx.decode_only and ctx.num_seqs == 3
    assert PagedContext.build([[0], [1]], [2, 3], [1, 1], P, "cpu").decode_only
    with pytest.raises(ValueError):
        PagedContext.build([[0]], [5], [1], P, "cpu")  # 5 tokens do not fit one block of 4


def _hf_last_logits(model, seqs):
    return torch.stack([model(s[None]).logits[0, -1] for s in seqs]).float()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_mixed_prefill_and_decode_step(family):
    """A step mixing a chunked prefill, a fresh prompt and a decode token, with shuffled blocks."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 200, (n,), generator=g) for n in (13, 9, 6)]
    runner = PagedRunner(model, num_blocks=12, block_size=P, backend=BACKEND)
    tables = [[9, 2, 5, 0], [1, 11, 7], [3, 8]]

    def step(spans):  # spans: (seq, start, stop) of new tokens per sequence
        ids = torch.cat([seqs[i][a:b] for i, a, b in spans])
        pos = torch.cat([torch.arange(a, b) for _, a, b in spans])
        ctx = PagedContext.build([tables[i] for i, _, _ in spans], [b for _, _, b in spans],
                                 [b - a for _, a, b in spans], P, "cpu", backend=BACKEND)
        return runner.forward(ids, pos, ctx)

    step([(0, 0, 7), (2, 0, 5)])  # first chunk of seq 0, all but the last token of seq 2
    out = step([(0, 7, 13), (1, 0, 9), (2, 5, 6)])
    torch.testing.assert_close(out, _hf_last_logits(model, seqs), atol=2e-5, rtol=1e-4)
    assert out.shape == (3, model.config.vocab_size) and out.dtype == torch.float32


def test_fast_linears_leave_the_model_untouched_and_track_weight_updates():
    from _hf_helpers import fd_generate, padded_batch

    model = tiny_model("qwen2")  # q/k/v with bias: the fused product carries the bias
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    ids, mask = padded_batch([7, 4], model.config.vocab_size, seed=8)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(fd_generate(model, ids, attention_mask=mask, max_new_tokens=6), ref)
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():  # an in-place update must reach the cached weight copies
        model.lm_head.weight[ref[0, -1]] -= 50.0
    ref2 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(ref2, ref)
    assert torch.equal(fd_generate(model, ids, attention_mask=mask, max_new_tokens=6), ref2)
